"""Tests of the local keystore: the backend conformance suite plus keystore specifics
(credentials, file format, tamper detection, modes, crash safety, multi-process)."""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import takakrypt
from takakrypt.errors import (
    Error,
    KeystoreCorrupt,
    KeystoreLocked,
    UsageError,
)
from takakrypt.keys import (
    DEFAULT_KDF_PARAMS,
    Argon2Params,
    Keystore,
    Secret,
    generate_master_key_file,
    open_keystore,
    wipe,
)
from takakrypt.keys import local

try:
    from keys_conformance import BackendConformance, _material_forms
except ImportError:  # tests/ is a package
    from tests.keys_conformance import BackendConformance, _material_forms

FAST = Argon2Params(memory_kib=8, iterations=1, lanes=1)
PW = "correct horse battery staple"
SRC = str(Path(takakrypt.__file__).resolve().parent.parent)
STEPS = ["tmp-created", "tmp-written", "tmp-fsynced", "renamed", "dir-fsynced"]
PRE_RENAME = STEPS[:3]


def _ks(path: Path, **kw: Any) -> Keystore:
    kw.setdefault("passphrase", PW)
    if "passphrase" in kw and kw["passphrase"] is not None and kw.get("create"):
        kw.setdefault("kdf_params", FAST)
    return open_keystore(path, **kw)


@pytest.fixture
def ks_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "keystore.json"


@pytest.fixture
def ks(ks_path: Path) -> Iterator[Keystore]:
    k = _ks(ks_path, create=True)
    yield k
    k.close()


@pytest.fixture
def mk_file(tmp_path: Path) -> Path:
    p = tmp_path / "master.key"
    generate_master_key_file(p)
    return p


# ======================================================================= conformance


class TestPassphraseKeystoreConformance(BackendConformance):
    @pytest.fixture
    def backend(self, ks_path: Path) -> Iterator[Keystore]:
        k = _ks(ks_path, create=True)
        yield k
        k.close()

    @pytest.fixture
    def reopen(self, ks_path: Path) -> Callable[[], Keystore]:
        return lambda: _ks(ks_path)


class TestMasterKeyKeystoreConformance(BackendConformance):
    @pytest.fixture
    def backend(self, ks_path: Path, mk_file: Path) -> Iterator[Keystore]:
        k = open_keystore(ks_path, master_key_file=mk_file, create=True)
        yield k
        k.close()

    @pytest.fixture
    def reopen(self, ks_path: Path, mk_file: Path) -> Callable[[], Keystore]:
        return lambda: open_keystore(ks_path, master_key_file=mk_file)


# ====================================================================== credentials


def test_wrong_passphrase_is_locked(ks: Keystore, ks_path: Path) -> None:
    ks.create("k")
    with pytest.raises(KeystoreLocked) as ei:
        _ks(ks_path, passphrase="Zq9-not-it")
    assert str(ei.value) == f"wrong passphrase or master key for keystore {ks_path}"
    assert "Zq9" not in repr(ei.value)
    assert ei.value.exit_code == 7


def test_wrong_master_key_is_locked(ks_path: Path, mk_file: Path, tmp_path: Path) -> None:
    open_keystore(ks_path, master_key_file=mk_file, create=True).close()
    other = tmp_path / "other.key"
    generate_master_key_file(other)
    with pytest.raises(KeystoreLocked, match="wrong passphrase or master key"):
        open_keystore(ks_path, master_key_file=other)
    open_keystore(ks_path, master_key_file=mk_file).close()


def test_credential_kind_mismatch_is_locked(ks_path: Path, mk_file: Path, tmp_path: Path) -> None:
    _ks(ks_path, create=True).close()
    with pytest.raises(KeystoreLocked, match="protected by a passphrase"):
        open_keystore(ks_path, master_key_file=mk_file)
    p2 = tmp_path / "mk.json"
    open_keystore(p2, master_key_file=mk_file, create=True).close()
    with pytest.raises(KeystoreLocked, match="protected by a master key file"):
        open_keystore(p2, passphrase=PW)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"passphrase": PW, "master_key_file": "/nonexistent"},
        {"passphrase": ""},
        {"passphrase": b""},
        {"passphrase": 1234},
    ],
)
def test_bad_credentials_arguments(ks_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        open_keystore(ks_path, create=True, **kw)
    assert not ks_path.exists()


def test_passphrase_forms_equivalent(ks_path: Path) -> None:
    nfc = "caf\u00e9-pass"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    with _ks(ks_path, passphrase=nfc, create=True) as k:
        k.create("k")
        mat = bytes(k.get("k"))
    for pw in (nfd, nfc.encode("utf-8"), bytearray(nfc.encode("utf-8"))):
        with _ks(ks_path, passphrase=pw) as k:
            assert k.get("k") == mat


def test_credential_wiped_after_open(ks_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _ks(ks_path, create=True).close()
    wiped: list[Secret] = []
    orig = local._Credential.wipe

    def spy(self: local._Credential) -> None:
        orig(self)
        wiped.append(self.secret)

    monkeypatch.setattr(local._Credential, "wipe", spy)
    _ks(ks_path).close()
    with pytest.raises(KeystoreLocked):
        _ks(ks_path, passphrase="nope")
    assert len(wiped) == 2 and all(s.wiped for s in wiped)


def test_close_wipes_subkeys(ks: Keystore) -> None:
    ks.create("k")
    assert ks._keys is not None
    wrap, mac = ks._keys.wrap, ks._keys.mac
    assert not wrap.wiped and len(wrap) == 32
    buf = wrap.value
    ks.close()
    assert wrap.wiped and mac.wiped
    assert buf == bytearray(32)
    assert ks._keys is None and ks.closed


def test_default_argon2_params(ks_path: Path) -> None:
    assert DEFAULT_KDF_PARAMS == Argon2Params(65536, 3, 1)
    with open_keystore(ks_path, passphrase=PW, create=True) as k:
        k.create("k")
        mat = bytes(k.get("k"))
    kdf = json.loads(ks_path.read_bytes())["kdf"]
    assert kdf["alg"] == "argon2id"
    assert (kdf["memory_kib"], kdf["iterations"], kdf["lanes"]) == (65536, 3, 1)
    assert len(base64.b64decode(kdf["salt"])) == 16
    with open_keystore(ks_path, passphrase=PW) as k:
        assert k.get("k") == mat
    with pytest.raises(KeystoreLocked):
        open_keystore(ks_path, passphrase=PW + "x")


def test_salts_and_ids_unique(tmp_path: Path) -> None:
    docs = []
    for i in range(3):
        p = tmp_path / f"k{i}.json"
        _ks(p, create=True).close()
        docs.append(json.loads(p.read_bytes()))
    assert len({d["kdf"]["salt"] for d in docs}) == 3
    assert len({d["keystore_id"] for d in docs}) == 3


@pytest.mark.parametrize(
    "params",
    [
        {"memory_kib": 7, "iterations": 1, "lanes": 1},
        {"memory_kib": 15, "iterations": 1, "lanes": 2},
        {"memory_kib": 8, "iterations": 0, "lanes": 1},
        {"memory_kib": 8, "iterations": 1, "lanes": 0},
        {"memory_kib": 8 * 1024 * 1024, "iterations": 1, "lanes": 1},
        {"memory_kib": 8, "iterations": 65, "lanes": 1},
        {"memory_kib": "8", "iterations": 1, "lanes": 1},
        {"memory_kib": 8, "iterations": 1, "lanes": 1, "threads": 2},
        "fast",
    ],
)
def test_bad_kdf_params(ks_path: Path, params: Any) -> None:
    with pytest.raises(UsageError):
        open_keystore(ks_path, passphrase=PW, create=True, kdf_params=params)
    assert not ks_path.exists()


def test_kdf_params_only_when_creating(ks_path: Path, mk_file: Path) -> None:
    _ks(ks_path, create=True).close()
    with pytest.raises(UsageError):
        open_keystore(ks_path, passphrase=PW, kdf_params=FAST)
    with pytest.raises(UsageError):
        open_keystore(ks_path.with_name("x.json"), master_key_file=mk_file, create=True,
                      kdf_params=FAST)


# ================================================================== master key file


def test_generate_master_key_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        a, b = tmp_path / "a.key", tmp_path / "b.key"
        generate_master_key_file(a)
        generate_master_key_file(str(b))
    finally:
        os.umask(old)
    for p in (a, b):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert p.stat().st_size == 32
    assert a.read_bytes() != b.read_bytes()
    before = a.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        generate_master_key_file(a)
    assert a.read_bytes() == before


def test_generate_master_key_file_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(UsageError):
        generate_master_key_file(link)
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_wrong_length(ks_path: Path, tmp_path: Path, size: int) -> None:
    p = tmp_path / "bad.key"
    p.write_bytes(os.urandom(size))
    with pytest.raises(UsageError, match="exactly 32 bytes"):
        open_keystore(ks_path, master_key_file=p, create=True)
    assert not ks_path.exists()


def test_master_key_missing(ks_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot open master key file"):
        open_keystore(ks_path, master_key_file=tmp_path / "none.key", create=True)


def test_master_key_keystore_format(ks_path: Path, mk_file: Path) -> None:
    with open_keystore(ks_path, master_key_file=mk_file, create=True) as k:
        assert k.protection == "master-key-file"
        k.create("k")
    kdf = json.loads(ks_path.read_bytes())["kdf"]
    assert kdf["alg"] == "hkdf-sha256" and set(kdf) == {"alg", "salt"}


# ========================================================================= lifecycle


def test_open_missing_keystore_is_usage_error(ks_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        _ks(ks_path)
    assert not ks_path.exists() and not ks_path.parent.exists()


def test_new_refuses_existing(ks_path: Path) -> None:
    Keystore.new(ks_path, passphrase=PW, kdf_params=FAST).close()
    before = ks_path.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        Keystore.new(ks_path, passphrase=PW, kdf_params=FAST)
    assert ks_path.read_bytes() == before


def test_create_true_opens_existing(ks_path: Path) -> None:
    with _ks(ks_path, create=True) as a:
        a.create("k")
        kid = a.keystore_id
    with _ks(ks_path, create=True) as b:
        assert b.keystore_id == kid
        assert [i.name for i in b.list()] == ["k"]


def test_concurrent_keystore_creation(ks_path: Path) -> None:
    ids: list[str] = []
    errs: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        try:
            with _ks(ks_path, create=True) as k:
                ids.append(k.keystore_id)
        except BaseException as e:  # pragma: no cover
            errs.append(e)

    ts = [threading.Thread(target=work) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errs == []
    assert len(ids) == 6 and len(set(ids)) == 1


def test_symlinked_keystore_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real" / "ks.json"
    _ks(real, create=True).close()
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with _ks(link) as k:
        k.create("k")
    assert link.is_symlink()
    with _ks(real) as k:
        assert k.info("k").current_version == 1


def test_repr(ks: Keystore, ks_path: Path) -> None:
    assert repr(ks) == f"<Keystore path={str(ks_path)!r} protection=passphrase open>"
    ks.close()
    assert repr(ks).endswith("closed>")
    with pytest.raises(TypeError):
        pickle.dumps(ks)


# ============================================================================= modes


def test_file_dir_and_lock_modes(ks_path: Path) -> None:
    old = os.umask(0)
    try:
        with _ks(ks_path, create=True) as k:
            k.create("k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ks_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(ks_path.stat().st_mode) == 0o600
    lock = Path(str(ks_path) + ".lock")
    assert lock.exists() and stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_existing_parent_dir_mode_untouched(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    _ks(d / "ks.json", create=True).close()
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_mode_restored_to_0600_on_write(ks: Keystore, ks_path: Path) -> None:
    os.chmod(ks_path, 0o644)
    ks.create("k")
    assert stat.S_IMODE(ks_path.stat().st_mode) == 0o600


def test_temp_file_mode(ks: Keystore, ks_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}

    def hook(step: str) -> None:
        for p in ks_path.parent.iterdir():
            if ".tmp-" in p.name:
                seen[step] = stat.S_IMODE(p.stat().st_mode)

    old = os.umask(0)
    monkeypatch.setattr(local, "_fault_hook", hook)
    try:
        ks.create("k")
    finally:
        os.umask(old)
    assert seen == {s: 0o600 for s in PRE_RENAME}
    assert [p.name for p in ks_path.parent.iterdir() if ".tmp-" in p.name] == []


# ==================================================================== plaintext leaks


def test_no_material_in_file_repr_errors_or_logs(
    ks: Keystore, ks_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ks.create("alpha")
    ks.rotate("alpha")
    ks.create("beta")
    mats = [bytes(ks.get("alpha", 1)), bytes(ks.get("alpha", 2)), bytes(ks.get("beta"))]
    texts: list[bytes] = [ks_path.read_bytes(), repr(ks).encode(), str(ks).encode()]
    texts.append(repr(ks._keys.wrap).encode() if ks._keys else b"")
    for call in (
        lambda: ks.create("alpha"),
        lambda: ks.get("alpha", 3),
        lambda: ks.get("gamma"),
        lambda: ks.rotate("gamma"),
        lambda: _ks(ks_path, passphrase="bad"),
    ):
        with pytest.raises(Error) as ei:
            call()
        texts.append(str(ei.value).encode() + repr(ei.value).encode())
    # a tampered file's error message
    doc = json.loads(ks_path.read_bytes())
    doc["keys"][0]["versions"][0]["wrapped"] = "!"
    bad = ks_path.with_name("bad.json")
    bad.write_text(json.dumps(doc))
    with pytest.raises(KeystoreCorrupt) as ei:
        _ks(bad)
    texts.append(str(ei.value).encode())
    texts.append("\n".join(r.getMessage() for r in caplog.records).encode())
    assert any(b"alpha" in t for t in texts)  # the texts are not trivially empty
    for m in mats:
        for form in _material_forms(m):
            for t in texts:
                assert form not in t
    # the passphrase is not in the file nor in messages either
    for t in texts:
        assert PW.encode() not in t


# ================================================================== tamper detection


def _doc(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())


def _write(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc))


def _leaves(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))
    else:
        yield prefix


def _containers(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, (dict, list)):
        yield prefix
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            yield from _containers(v, prefix + (k,))


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _tweak_str(s: str) -> str:
    """Change one character, keeping the string's syntax (hex, base64, date) valid."""
    for i, c in enumerate(s):
        for alphabet in ("0123456789abcdef", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                         "ghijklmnopqrstuvwxyz"):
            if c in alphabet:
                repl = alphabet[(alphabet.index(c) + 1) % len(alphabet)]
                return s[:i] + repl + s[i + 1:]
    return s + "x"


def _tweak_time(s: str) -> str:
    # 2025-01-31T12:00:00Z -> one second later or earlier, still a valid time
    sec = int(s[17:19])
    return s[:17] + f"{(sec + 1) % 60:02d}" + s[19:]


# paths whose tampering changes the KEK or the check value, so the keystore cannot
# tell tampering from a wrong credential
_LOCKED_OK = ("kdf", "check")


@pytest.fixture
def populated(ks_path: Path) -> dict[str, Any]:
    with _ks(ks_path, create=True) as k:
        k.create("alpha")
        k.rotate("alpha")
        k.rotate("alpha")
        k.create("beta")
    return _doc(ks_path)


def test_tamper_every_leaf(ks_path: Path, populated: dict[str, Any]) -> None:
    paths = list(_leaves(populated))
    assert len(paths) > 30
    for path in paths:
        doc = copy.deepcopy(populated)
        v = _get(doc, path)
        if isinstance(v, bool) or not isinstance(v, (int, str)):  # pragma: no cover
            raise AssertionError(f"unexpected leaf type at {path}")
        if isinstance(v, int):
            new: Any = v + 1
        elif path[-1] == "created":
            new = _tweak_time(v)
        else:
            new = _tweak_str(v)
        assert new != v
        _set(doc, path, new)
        _write(ks_path, doc)
        allowed = (KeystoreCorrupt, KeystoreLocked) if path[0] in _LOCKED_OK else KeystoreCorrupt
        with pytest.raises(allowed) as ei:
            _ks(ks_path).close()
        assert str(ks_path) in str(ei.value), path
    # control: the untouched document still opens
    _write(ks_path, populated)
    _ks(ks_path).close()


def test_tamper_check_value_is_locked(ks_path: Path, populated: dict[str, Any]) -> None:
    doc = copy.deepcopy(populated)
    doc["check"] = base64.b64encode(os.urandom(32)).decode()
    _write(ks_path, doc)
    with pytest.raises(KeystoreLocked):
        _ks(ks_path)


def _edits() -> dict[str, Callable[[dict[str, Any]], None]]:
    def drop_last_version(d: dict[str, Any]) -> None:
        k = d["keys"][0]
        k["versions"].pop()
        k["current_version"] -= 1

    def drop_first_version(d: dict[str, Any]) -> None:
        d["keys"][0]["versions"].pop(0)
        d["keys"][0]["current_version"] -= 1

    def swap_versions(d: dict[str, Any]) -> None:
        vs = d["keys"][0]["versions"]
        vs[0], vs[1] = vs[1], vs[0]

    def swap_material(d: dict[str, Any]) -> None:
        vs = d["keys"][0]["versions"]
        for f in ("nonce", "wrapped"):
            vs[0][f], vs[1][f] = vs[1][f], vs[0][f]

    def swap_keys(d: dict[str, Any]) -> None:
        d["keys"].reverse()

    def remove_key(d: dict[str, Any]) -> None:
        del d["keys"][1]

    def duplicate_key(d: dict[str, Any]) -> None:
        d["keys"].append(copy.deepcopy(d["keys"][1]))

    def move_material_between_keys(d: dict[str, Any]) -> None:
        a, b = d["keys"][0]["versions"][0], d["keys"][1]["versions"][0]
        for f in ("nonce", "wrapped"):
            a[f], b[f] = b[f], a[f]

    def rename_key(d: dict[str, Any]) -> None:
        d["keys"][1]["name"] = "bravo"

    def extra_field(d: dict[str, Any]) -> None:
        d["comment"] = "hi"

    def extra_version_field(d: dict[str, Any]) -> None:
        d["keys"][0]["versions"][0]["note"] = 1

    def empty_keys(d: dict[str, Any]) -> None:
        d["keys"] = []

    def lower_generation(d: dict[str, Any]) -> None:
        d["generation"] = 0

    def no_versions(d: dict[str, Any]) -> None:
        d["keys"][1]["versions"] = []
        d["keys"][1]["current_version"] = 0

    def mac_of_other(d: dict[str, Any]) -> None:
        d["mac"] = base64.b64encode(os.urandom(32)).decode()

    def wrong_types(d: dict[str, Any]) -> None:
        d["keys"][0]["current_version"] = "3"

    def null_field(d: dict[str, Any]) -> None:
        d["keys"][0]["versions"][0]["nonce"] = None

    def float_version(d: dict[str, Any]) -> None:
        d["keys"][0]["versions"][0]["version"] = 1.0

    def bool_version(d: dict[str, Any]) -> None:
        d["keys"][0]["versions"][0]["version"] = True

    edits = {f.__name__: f for f in (
        drop_last_version, drop_first_version, swap_versions, swap_material, swap_keys,
        remove_key, duplicate_key, move_material_between_keys, rename_key, extra_field,
        extra_version_field, empty_keys, lower_generation, no_versions, mac_of_other,
        wrong_types, null_field, float_version, bool_version,
    )}
    for top in ("format", "version", "keystore_id", "created", "generation", "kdf", "keys",
                "mac"):
        edits[f"missing_{top}"] = lambda d, top=top: d.pop(top)
    for f in ("name", "algorithm", "current_version", "versions"):
        edits[f"missing_key_{f}"] = lambda d, f=f: d["keys"][0].pop(f)
    for f in ("version", "created", "state", "nonce", "wrapped"):
        edits[f"missing_version_{f}"] = lambda d, f=f: d["keys"][0]["versions"][1].pop(f)
    return edits


@pytest.mark.parametrize("edit", sorted(_edits()))
def test_structural_edits_are_corrupt(
    ks_path: Path, populated: dict[str, Any], edit: str
) -> None:
    doc = copy.deepcopy(populated)
    _edits()[edit](doc)
    assert json.dumps(doc) != json.dumps(populated)
    _write(ks_path, doc)
    with pytest.raises(KeystoreCorrupt):
        _ks(ks_path)


def test_revert_rotation_inside_file_is_corrupt(ks_path: Path) -> None:
    """Take the rotated key's record from an older copy of the file: detected."""
    with _ks(ks_path, create=True) as k:
        k.create("a")
        k.create("b")
        old = _doc(ks_path)
        k.rotate("a")
        k.create("c")
    new = _doc(ks_path)
    new["keys"][0] = old["keys"][0]
    _write(ks_path, new)
    with pytest.raises(KeystoreCorrupt, match="integrity"):
        _ks(ks_path)


def test_aad_binds_name_and_version(ks: Keystore, ks_path: Path) -> None:
    """Even with a valid file MAC (an attacker holding the KEK's MAC subkey only),
    moving a wrapped key to another name or version fails to unwrap."""
    ks.create("a")
    ks.rotate("a")
    ks.create("b")
    assert ks._keys is not None
    doc = _doc(ks_path)
    a, b = doc["keys"]
    for f in ("nonce", "wrapped"):
        a["versions"][0][f], b["versions"][0][f] = b["versions"][0][f], a["versions"][0][f]
        a["versions"][1][f], a["versions"][0][f] = a["versions"][0][f], a["versions"][1][f]
    d = msgspec.convert(doc, local._Doc)
    d.mac = local._b64(Keystore._compute_mac(d, ks._keys))
    ks_path.write_bytes(msgspec.json.encode(d))
    with _ks(ks_path) as k2:  # MAC is valid: it opens
        for name, v in (("a", 1), ("a", 2), ("b", 1)):
            with pytest.raises(KeystoreCorrupt, match="cannot be unwrapped"):
                k2.get(name, v)


def test_whole_file_rollback_detected_by_running_instance(ks: Keystore, ks_path: Path) -> None:
    ks.create("k")
    old = ks_path.read_bytes()
    ks.rotate("k")
    # replace (new inode) with the older, validly signed copy
    tmp = ks_path.with_name("old.json")
    tmp.write_bytes(old)
    os.replace(tmp, ks_path)
    with pytest.raises(KeystoreCorrupt, match="older generation"):
        ks.info("k")
    # a fresh open cannot know (documented limitation): it sees version 1
    with _ks(ks_path) as k2:
        assert k2.info("k").current_version == 1


def test_replaced_by_other_keystore_detected(ks: Keystore, ks_path: Path, tmp_path: Path) -> None:
    ks.create("k")
    other = tmp_path / "other.json"
    _ks(other, create=True).close()
    os.replace(other, ks_path)
    with pytest.raises(KeystoreCorrupt, match="different keystore"):
        ks.get("k")


# ======================================================================= bad files


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"null", "not a takakrypt keystore"),
        (b"[]", "not a takakrypt keystore"),
        (b"{}", "not a takakrypt keystore"),
        (b'{"format": "something-else", "version": 1}', "not a takakrypt keystore"),
        (b'{"format": "takakrypt-keystore"}', "no valid format version"),
        (b'{"format": "takakrypt-keystore", "version": "1"}', "no valid format version"),
        (b'{"format": "takakrypt-keystore", "version": 2}', "unsupported format version 2"),
        (b'{"format": "takakrypt-keystore", "version": 0}', "unsupported format version 0"),
        (b'{"format": "takakrypt-keystore", "version": 1}', "malformed"),
        (b"[" * 100000, "not valid JSON"),
    ],
)
def test_bad_file_contents(ks_path: Path, content: bytes, match: str) -> None:
    ks_path.parent.mkdir(parents=True)
    ks_path.write_bytes(content)
    with pytest.raises(KeystoreCorrupt, match=match) as ei:
        _ks(ks_path)
    assert str(ks_path) in str(ei.value)


def test_truncated_file(ks_path: Path, populated: dict[str, Any]) -> None:
    raw = ks_path.read_bytes()
    for cut in (1, len(raw) // 3, len(raw) // 2, len(raw) - 3):
        ks_path.write_bytes(raw[:cut])
        with pytest.raises(KeystoreCorrupt):
            _ks(ks_path)


def test_directory_instead_of_file(ks_path: Path) -> None:
    ks_path.mkdir(parents=True)
    with pytest.raises(KeystoreCorrupt, match="not a regular file"):
        _ks(ks_path)


def test_fifo_instead_of_file_does_not_hang(ks_path: Path) -> None:
    ks_path.parent.mkdir(parents=True)
    os.mkfifo(ks_path)
    with pytest.raises(KeystoreCorrupt, match="not a regular file"):
        _ks(ks_path)


def test_huge_kdf_params_rejected_before_kdf(ks_path: Path, populated: dict[str, Any]) -> None:
    doc = copy.deepcopy(populated)
    doc["kdf"]["memory_kib"] = 1 << 40
    _write(ks_path, doc)
    t = time.monotonic()
    with pytest.raises(KeystoreCorrupt, match="memory_kib"):
        _ks(ks_path)
    assert time.monotonic() - t < 2


def test_file_is_readable_json_with_format_version(populated: dict[str, Any]) -> None:
    assert populated["format"] == "takakrypt-keystore"
    assert populated["version"] == 1
    assert [k["name"] for k in populated["keys"]] == ["alpha", "beta"]
    assert populated["generation"] == 4
    assert [v["version"] for v in populated["keys"][0]["versions"]] == [1, 2, 3]


# ============================================================================ fuzzing


@pytest.fixture(scope="module")
def fuzz_store() -> Iterator[tuple[Path, Path, dict[str, Any], dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as d:
        dp = Path(d)
        mk = dp / "mk.key"
        generate_master_key_file(mk)
        p = dp / "ks.json"
        with open_keystore(p, master_key_file=mk, create=True) as k:
            k.create("a")
            k.rotate("a")
            k.create("b")
        pw = dp / "pw.json"
        with _ks(pw, create=True) as k:
            k.create("a")
        yield dp, mk, json.loads(p.read_bytes()), json.loads(pw.read_bytes())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8,
)


@st.composite
def _mutated(draw: st.DrawFn, doc: dict[str, Any]) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, (dict, list)):
            break
        paths = list(_containers(doc)) + list(_leaves(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "insert", "tweak", "dup"]))
        if path == ():
            if op == "replace":
                doc = draw(_json_values)
            continue
        parent = _get(doc, path[:-1])
        key = path[-1]
        if op == "replace":
            parent[key] = draw(_json_values)
        elif op == "delete":
            del parent[key]
        elif op == "insert":
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(_json_values)
            else:
                parent.insert(key, draw(_json_values))
        elif op == "dup":
            if isinstance(parent, list):
                parent.insert(key, copy.deepcopy(parent[key]))
        else:
            v = parent[key]
            if isinstance(v, str):
                parent[key] = _tweak_str(v)
            elif isinstance(v, bool):
                parent[key] = not v
            elif isinstance(v, int):
                parent[key] = v + draw(st.sampled_from([-1, 1, 2**31, -(2**63)]))
    return doc


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=2000))
@example(data=b'"\x80"')  # bad UTF-8 in a string: msgspec raises UnicodeDecodeError
@example(data=b'{"format": "\xff"}')
def test_fuzz_random_bytes(fuzz_store: Any, data: bytes) -> None:
    dp, mk, _, _ = fuzz_store
    p = dp / "fuzz-bytes.json"
    p.write_bytes(data)
    with pytest.raises(KeystoreCorrupt):
        open_keystore(p, master_key_file=mk)


@FUZZ
@given(data=st.data())
def test_fuzz_json_mutations(fuzz_store: Any, data: st.DataObject) -> None:
    dp, mk, original, _ = fuzz_store
    doc = data.draw(_mutated(original))
    p = dp / "fuzz-json.json"
    p.write_text(json.dumps(doc))
    try:
        k = open_keystore(p, master_key_file=mk)
    except Error:
        return
    # accepted only if the mutation did not change anything that matters
    with k:
        assert msgspec.json.encode(msgspec.convert(doc, local._Doc), order="sorted") == \
            msgspec.json.encode(msgspec.convert(original, local._Doc), order="sorted")
        assert [i.name for i in k.list()] == ["a", "b"]


@FUZZ
@given(data=st.data())
def test_fuzz_json_mutations_parser_passphrase(fuzz_store: Any, data: st.DataObject) -> None:
    """Passphrase keystores: the parser (before the KDF) only raises KeystoreCorrupt."""
    _, _, _, original = fuzz_store
    doc = data.draw(_mutated(original))
    try:
        parsed = local._parse(json.dumps(doc).encode(), "x")
    except KeystoreCorrupt:
        return
    assert isinstance(parsed, local._Doc)
    assert parsed.kdf.memory_kib <= local.ARGON2_MAX_MEMORY_KIB  # type: ignore[union-attr]


# ====================================================================== crash safety


class Boom(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_failure_injection_leaves_old_or_new(
    ks: Keystore, ks_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    ks.create("k")
    v1 = bytes(ks.get("k"))

    def hook(s: str) -> None:
        if s == step:
            raise Boom(s)

    monkeypatch.setattr(local, "_fault_hook", hook)
    with pytest.raises(Boom):
        ks.rotate("k")
    monkeypatch.setattr(local, "_fault_hook", None)
    expected = 1 if step in PRE_RENAME else 2
    with _ks(ks_path) as k2:
        assert k2.info("k").current_version == expected
        assert k2.get("k", 1) == v1
    # no temp file left behind, and the failed instance keeps working
    assert [p.name for p in ks_path.parent.iterdir() if ".tmp-" in p.name] == []
    assert ks.info("k").current_version == expected
    assert ks.rotate("k").current_version == expected + 1
    assert ks.get("k", 1) == v1


def _run_py(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


_CHILD_PRELUDE = """
import os, sys
from takakrypt.keys import open_keystore, Argon2Params
from takakrypt.keys import local
ks = open_keystore(sys.argv[1], passphrase=%r)
""" % PW


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step(ks: Keystore, ks_path: Path, step: str) -> None:
    ks.create("k")
    v1 = bytes(ks.get("k"))
    code = _CHILD_PRELUDE + textwrap.dedent("""
        def hook(s):
            if s == sys.argv[2]:
                os._exit(77)
        local._fault_hook = hook
        ks.rotate("k")
        os._exit(0)
    """)
    p = _run_py(code, str(ks_path), step)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 77, err
    temps = [q for q in ks_path.parent.iterdir() if ".tmp-" in q.name]
    assert len(temps) == (1 if step in PRE_RENAME else 0)
    expected = 1 if step in PRE_RENAME else 2
    with _ks(ks_path) as k2:
        assert k2.info("k").current_version == expected
        assert k2.get("k", 1) == v1
        assert k2.rotate("k").current_version == expected + 1
    # the next write removed the stale temp file
    assert [q for q in ks_path.parent.iterdir() if ".tmp-" in q.name] == []


def test_sigkill_at_random_points(ks: Keystore, ks_path: Path) -> None:
    ks.create("k")
    code = _CHILD_PRELUDE + textwrap.dedent("""
        while True:
            v = ks.rotate("k").current_version
            print(v, flush=True)
    """)
    rng = random.Random(1234)
    for _ in range(6):
        p = _run_py(code, str(ks_path))
        assert p.stdout is not None
        first = p.stdout.readline()  # wait until it is rotating
        assert first.strip().isdigit(), p.stderr.read() if p.stderr else ""
        time.sleep(rng.uniform(0.0, 0.15))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        printed = [int(x) for x in (first + out).split()]
        with _ks(ks_path) as k2:
            info = k2.info("k")
            # every version reported as done is durable (the kill may have hit
            # after the rename but before the print, hence >=)
            assert info.current_version >= printed[-1]
            assert info.current_version <= printed[-1] + 1
            mats = {bytes(k2.get("k", v)) for v in range(1, info.current_version + 1)}
            assert len(mats) == info.current_version


def test_two_processes_rotating_concurrently(ks: Keystore, ks_path: Path) -> None:
    ks.create("k")
    ks.create("z")
    n = 25
    go = ks_path.parent / "go"
    code = _CHILD_PRELUDE + textwrap.dedent("""
        import time
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        for i in range(int(sys.argv[3])):
            print(ks.rotate("k").current_version, flush=True)
            if i % 5 == 0:
                ks.create("p%d-%d" % (os.getpid(), i))
    """)
    procs = [_run_py(code, str(ks_path), str(go), str(n)) for _ in range(2)]
    time.sleep(0.3)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append([int(x) for x in out.split()])
    assert all(len(o) == n for o in outs)
    assert set(outs[0]).isdisjoint(outs[1])
    assert sorted(outs[0] + outs[1]) == list(range(2, 2 * n + 2))
    info = ks.info("k")
    assert info.current_version == 2 * n + 1
    assert [v.version for v in info.versions] == list(range(1, 2 * n + 2))
    assert len({bytes(ks.get("k", v)) for v in range(1, 2 * n + 2)}) == 2 * n + 1
    created = [i.name for i in ks.list() if i.name.startswith("p")]
    assert len(created) == 2 * 5


# ============================================================================ secret


def test_wipe() -> None:
    b = bytearray(b"secret!!")
    wipe(b)
    assert b == bytearray(8)
    wipe(None)
    wipe(bytearray())
    m = bytearray(b"abcd")
    wipe(memoryview(m)[1:3])
    assert m == bytearray(b"a\x00\x00d")
    with pytest.raises(TypeError):
        wipe(b"immutable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wipe(memoryview(b"ro"))


def test_secret_holder() -> None:
    raw = bytearray(b"k" * 32)
    s = Secret(raw)
    assert s.value == raw and s.value is not raw
    assert repr(s) == str(s) == "<Secret 32 bytes>"
    assert "k" * 4 not in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert s == Secret(b"k" * 32) and s != Secret(b"j" * 32)
    c = s.copy()
    assert c == raw and c is not s.value
    buf = s.value
    with s:
        pass
    assert s.wiped and buf == bytearray(32) and len(s) == 0
    with pytest.raises(ValueError):
        s.value
    assert repr(s) == "<Secret wiped>"
    owned = bytearray(b"x" * 4)
    t = Secret.take(owned)
    assert t.value is owned
    t.wipe()
    assert owned == bytearray(4)
    with pytest.raises(TypeError):
        Secret.take(b"x")  # type: ignore[arg-type]
