"""Conformance suite for :class:`takakrypt.keys.backend.KeyBackend` implementations.

Every backend (local keystore, KMIP, ...) runs this same suite.  A backend's test
module subclasses :class:`BackendConformance` (the name does not start with
``Test`` so pytest does not collect the base class itself) and provides fixtures::

    class TestMyBackendConformance(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            b = MyBackend(...)          # a fresh, EMPTY store
            yield b
            b.close()

        @pytest.fixture
        def reopen(self, ...):
            # optional: a callable returning a NEW backend instance on the same
            # store as ``backend`` (used by the persistence tests); the suite closes it
            return lambda: MyBackend(...)

If ``reopen`` is not overridden the persistence tests are skipped.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Callable
from datetime import datetime, timezone

import msgspec
import pytest

from takakrypt.errors import Error, KeyExists, KeyNotFound, UsageError
from takakrypt.keys.backend import KeyBackend, KeyInfo, KeyVersionInfo
from takakrypt.keys.secret import wipe

VALID_NAMES = [
    "a",
    "Z",
    "0",
    "_x",
    "payroll",
    "Key.Name_1-2",
    "a..b",
    "x" * 63,
    "9.-_",
]

INVALID_NAMES = [
    "",
    ".hidden",
    "-flag",
    "a b",
    "a/b",
    "../x",
    "a\nb",
    "abc\n",
    "a\x00b",
    "é",
    "naïve",
    "x" * 64,
    "key:1",
    "key*",
    " lead",
]

NON_STR_NAMES = [None, b"abc", 1, ["a"]]

_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def _parse_time(s: str) -> datetime:
    assert _RFC3339_UTC.fullmatch(s), s
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _material_forms(key: bytes) -> list[bytes]:
    """Ways a key could leak into text: raw, hex, base64 (and url-safe base64)."""
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
        base64.b64encode(key).rstrip(b"="),
    ]


class BackendConformance:
    """The behaviour every KeyBackend must have (see KeyBackend's docstring)."""

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture
    def backend(self) -> KeyBackend:  # pragma: no cover - overridden
        raise NotImplementedError("subclasses provide a `backend` fixture")

    @pytest.fixture
    def reopen(self) -> Callable[[], KeyBackend] | None:
        return None

    def _reopen(self, reopen: Callable[[], KeyBackend] | None) -> KeyBackend:
        if reopen is None:
            pytest.skip("backend does not provide a `reopen` fixture")
        return reopen()

    # ------------------------------------------------------------------ create

    def test_is_keybackend(self, backend: KeyBackend) -> None:
        assert isinstance(backend, KeyBackend)

    def test_empty_store_lists_nothing(self, backend: KeyBackend) -> None:
        assert backend.list() == []

    def test_create_returns_info(self, backend: KeyBackend) -> None:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        info = backend.create("payroll")
        after = datetime.now(timezone.utc)
        assert isinstance(info, KeyInfo)
        assert info.name == "payroll"
        assert info.current_version == 1
        assert [v.version for v in info.versions] == [1]
        assert all(isinstance(v, KeyVersionInfo) for v in info.versions)
        assert info.versions[0].state == "active"
        assert before <= _parse_time(info.versions[0].created) <= after
        assert info.algorithm == "AES-256"
        assert isinstance(info.backend, str) and info.backend
        assert info == backend.info("payroll")

    def test_create_existing_raises_keyexists_and_keeps_key(self, backend: KeyBackend) -> None:
        backend.create("k")
        k1 = backend.get("k")
        with pytest.raises(KeyExists) as ei:
            backend.create("k")
        assert "k" in str(ei.value)
        assert backend.get("k") == k1
        assert backend.info("k").current_version == 1

    def test_keyinfo_is_frozen(self, backend: KeyBackend) -> None:
        info = backend.create("k")
        with pytest.raises(AttributeError):
            info.name = "other"  # type: ignore[misc]

    # --------------------------------------------------------------------- get

    def test_get_returns_32_byte_bytearray(self, backend: KeyBackend) -> None:
        backend.create("k")
        key = backend.get("k")
        assert type(key) is bytearray
        assert len(key) == 32
        assert key != bytearray(32)

    def test_get_is_stable(self, backend: KeyBackend) -> None:
        backend.create("k")
        assert backend.get("k") == backend.get("k") == backend.get("k", 1)

    def test_get_returns_fresh_buffer(self, backend: KeyBackend) -> None:
        backend.create("k")
        a = backend.get("k")
        saved = bytes(a)
        b = backend.get("k")
        assert a is not b
        wipe(a)
        assert a == bytearray(32)
        assert backend.get("k") == saved == b

    def test_get_unknown_name(self, backend: KeyBackend) -> None:
        with pytest.raises(KeyNotFound) as ei:
            backend.get("nope")
        assert "nope" in str(ei.value)
        with pytest.raises(KeyNotFound):
            backend.get("nope", 1)

    @pytest.mark.parametrize("version", [2, 3, 1000, 0, -1])
    def test_get_unknown_version(self, backend: KeyBackend, version: int) -> None:
        backend.create("k")
        with pytest.raises(KeyNotFound) as ei:
            backend.get("k", version)
        msg = str(ei.value)
        assert "k" in msg and str(version) in msg

    @pytest.mark.parametrize("version", ["1", 1.0, True, b"1"])
    def test_get_bad_version_type(self, backend: KeyBackend, version: object) -> None:
        backend.create("k")
        with pytest.raises(UsageError):
            backend.get("k", version)  # type: ignore[arg-type]

    def test_info_unknown(self, backend: KeyBackend) -> None:
        with pytest.raises(KeyNotFound) as ei:
            backend.info("ghost")
        assert "ghost" in str(ei.value)

    # ------------------------------------------------------------------ rotate

    def test_rotate_adds_version_and_keeps_old(self, backend: KeyBackend) -> None:
        backend.create("k")
        v1 = bytes(backend.get("k"))
        info = backend.rotate("k")
        assert info.name == "k"
        assert info.current_version == 2
        assert [v.version for v in info.versions] == [1, 2]
        assert all(v.state == "active" for v in info.versions)
        assert info == backend.info("k")
        v2 = bytes(backend.get("k"))
        assert v2 != v1
        assert backend.get("k", 1) == v1
        assert backend.get("k", 2) == v2
        assert backend.get("k", None) == v2

    def test_rotate_many(self, backend: KeyBackend) -> None:
        backend.create("k")
        for i in range(2, 8):
            assert backend.rotate("k").current_version == i
        info = backend.info("k")
        assert [v.version for v in info.versions] == list(range(1, 8))
        mats = {bytes(backend.get("k", v)) for v in range(1, 8)}
        assert len(mats) == 7
        created = [_parse_time(v.created) for v in info.versions]
        assert created == sorted(created)

    def test_rotate_unknown(self, backend: KeyBackend) -> None:
        with pytest.raises(KeyNotFound) as ei:
            backend.rotate("ghost")
        assert "ghost" in str(ei.value)
        assert backend.list() == []

    def test_rotate_does_not_touch_other_keys(self, backend: KeyBackend) -> None:
        backend.create("a")
        backend.create("b")
        b1 = bytes(backend.get("b"))
        backend.rotate("a")
        assert backend.info("b").current_version == 1
        assert backend.get("b") == b1

    # ------------------------------------------------------------------ retire

    def test_retire_destroys_an_old_version_only(self, backend: KeyBackend) -> None:
        from takakrypt.errors import KeyRetired

        backend.create("k")
        backend.create("other")
        backend.rotate("k")
        backend.rotate("k")
        v2, v3 = bytes(backend.get("k", 2)), bytes(backend.get("k", 3))
        o1 = bytes(backend.get("other"))
        info = backend.retire("k", 1)
        assert info.current_version == 3
        assert [(v.version, v.state) for v in info.versions] == [
            (1, "retired"), (2, "active"), (3, "active")]
        assert info == backend.info("k")
        with pytest.raises(KeyRetired) as ei:
            backend.get("k", 1)
        assert isinstance(ei.value, KeyNotFound)
        assert "'k'" in str(ei.value) and "1" in str(ei.value)
        assert backend.get("k", 2) == v2 and backend.get("k") == v3
        assert backend.get("other") == o1
        assert backend.retire("k", 1) == backend.info("k")  # again: no change
        assert backend.rotate("k").current_version == 4  # versions still count on

    def test_retire_refuses_the_current_version_and_unknown(self, backend: KeyBackend) -> None:
        from takakrypt.errors import KeyInUse

        backend.create("k")
        with pytest.raises(KeyInUse):
            backend.retire("k", 1)
        assert bytes(backend.get("k", 1))
        with pytest.raises(KeyNotFound):
            backend.retire("k", 2)
        with pytest.raises(KeyNotFound):
            backend.retire("ghost", 1)
        with pytest.raises(UsageError):
            backend.retire("bad/name", 1)

    # -------------------------------------------------------------------- list

    def test_list_sorted_by_name(self, backend: KeyBackend) -> None:
        names = ["zeta", "Alpha", "beta", "_u", "0num", "alpha", "beta.2"]
        for n in names:
            backend.create(n)
        backend.rotate("beta")
        listed = backend.list()
        assert [i.name for i in listed] == sorted(names)
        assert all(isinstance(i, KeyInfo) for i in listed)
        by_name = {i.name: i for i in listed}
        assert by_name["beta"].current_version == 2
        assert by_name["zeta"].current_version == 1
        assert by_name["beta"] == backend.info("beta")

    # ------------------------------------------------------------------- names

    @pytest.mark.parametrize("name", VALID_NAMES)
    def test_valid_names(self, backend: KeyBackend, name: str) -> None:
        assert backend.create(name).name == name
        assert len(backend.get(name)) == 32
        assert backend.rotate(name).current_version == 2
        assert [i.name for i in backend.list()] == [name]

    @pytest.mark.parametrize("name", INVALID_NAMES + NON_STR_NAMES)
    def test_invalid_names(self, backend: KeyBackend, name: object) -> None:
        for op in (backend.create, backend.get, backend.info, backend.rotate):
            with pytest.raises(UsageError):
                op(name)  # type: ignore[operator]
        assert backend.list() == []

    # ---------------------------------------------------------------- material

    def test_distinct_keys(self, backend: KeyBackend) -> None:
        mats = set()
        for i in range(20):
            backend.create(f"k{i}")
            mats.add(bytes(backend.get(f"k{i}")))
        assert len(mats) == 20

    def test_info_and_repr_contain_no_material(self, backend: KeyBackend) -> None:
        backend.create("k")
        backend.rotate("k")
        keys = [bytes(backend.get("k", v)) for v in (1, 2)]
        texts = [
            msgspec.json.encode(backend.info("k")),
            msgspec.json.encode(backend.list()),
            repr(backend.info("k")).encode(),
            repr(backend).encode(),
            str(backend).encode(),
        ]
        for key in keys:
            for form in _material_forms(key):
                for t in texts:
                    assert form not in t

    def test_errors_are_takakrypt_errors(self, backend: KeyBackend) -> None:
        backend.create("k")
        for call in (
            lambda: backend.get("missing"),
            lambda: backend.get("k", 9),
            lambda: backend.create("k"),
            lambda: backend.info("missing"),
            lambda: backend.rotate("missing"),
            lambda: backend.create("bad name"),
        ):
            with pytest.raises(Error):
                call()

    # ------------------------------------------------------------- concurrency

    def test_concurrent_creates_distinct_names(self, backend: KeyBackend) -> None:
        n = 16
        errors: list[BaseException] = []
        barrier = threading.Barrier(n)

        def work(i: int) -> None:
            try:
                barrier.wait()
                backend.create(f"t{i:02d}")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert [i.name for i in backend.list()] == [f"t{i:02d}" for i in range(n)]
        assert len({bytes(backend.get(f"t{i:02d}")) for i in range(n)}) == n

    def test_concurrent_creates_same_name(self, backend: KeyBackend) -> None:
        n = 8
        results: list[object] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n)

        def work() -> None:
            barrier.wait()
            try:
                r: object = backend.create("same")
            except KeyExists as e:
                r = e
            except BaseException as e:  # pragma: no cover
                r = ("unexpected", e)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=work) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if isinstance(r, KeyInfo)]
        exists = [r for r in results if isinstance(r, KeyExists)]
        assert len(ok) == 1 and len(exists) == n - 1, results
        assert backend.info("same").current_version == 1

    def test_concurrent_rotates_lose_nothing(self, backend: KeyBackend) -> None:
        backend.create("r")
        n = 8
        got: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n)

        def work() -> None:
            barrier.wait()
            v = backend.rotate("r").current_version
            with lock:
                got.append(v)

        threads = [threading.Thread(target=work) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(2, n + 2))
        assert backend.info("r").current_version == n + 1
        assert len({bytes(backend.get("r", v)) for v in range(1, n + 2)}) == n + 1

    # ------------------------------------------------------------- persistence

    def test_persistence_across_reopen(
        self, backend: KeyBackend, reopen: Callable[[], KeyBackend] | None
    ) -> None:
        backend.create("p")
        backend.rotate("p")
        backend.create("q")
        before = {(n, v): bytes(backend.get(n, v)) for n, v in [("p", 1), ("p", 2), ("q", 1)]}
        infos = backend.list()
        backend.close()
        other = self._reopen(reopen)
        try:
            assert other.list() == infos
            for (n, v), m in before.items():
                assert other.get(n, v) == m
        finally:
            other.close()

    def test_changes_visible_to_other_instance(
        self, backend: KeyBackend, reopen: Callable[[], KeyBackend] | None
    ) -> None:
        other = self._reopen(reopen)
        try:
            backend.create("shared")
            assert other.info("shared").current_version == 1
            other.rotate("shared")
            assert backend.info("shared").current_version == 2
            assert backend.get("shared", 2) == other.get("shared", 2)
        finally:
            other.close()

    # --------------------------------------------------------------- lifecycle

    def test_close_is_idempotent_and_blocks_use(self, backend: KeyBackend) -> None:
        backend.create("k")
        backend.close()
        backend.close()
        for call in (
            lambda: backend.get("k"),
            lambda: backend.create("k2"),
            lambda: backend.rotate("k"),
        ):
            with pytest.raises(UsageError):
                call()

    def test_context_manager_closes(self, backend: KeyBackend) -> None:
        with backend as b:
            assert b is backend
            b.create("k")
        with pytest.raises(UsageError):
            backend.get("k")
