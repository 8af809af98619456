"""The KMIP key backend against a real PyKMIP server (tests/kmip_server.py): the backend
conformance suite, what is stored on the server, TLS failures, the server going away
and coming back, and concurrent rotation across connections and processes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("kmip", reason="PyKMIP is not installed (pip install -e '.[test]')")

import takakrypt  # noqa: E402
from takakrypt import config as C  # noqa: E402
from takakrypt.errors import (  # noqa: E402
    BackendUnavailable,
    ConfigError,
    Error,
    KeyExists,
    KeyNotFound,
    UsageError,
)
from takakrypt.keys import KeyBackend, wipe  # noqa: E402
from takakrypt.keys.kmip import KmipBackend, object_name  # noqa: E402

try:
    from keys_conformance import BackendConformance, _material_forms
    from kmip_server import Identity, KmipServer, Pki, free_port, kmip_server  # noqa: F401
except ImportError:  # tests/ is a package
    from tests.keys_conformance import BackendConformance, _material_forms
    from tests.kmip_server import (  # noqa: F401
        Identity,
        KmipServer,
        Pki,
        free_port,
        kmip_server,
    )

from kmip.core import enums  # noqa: E402
from kmip.core.factories.attributes import AttributeFactory  # noqa: E402
from kmip.core.objects import TemplateAttribute  # noqa: E402

SRC = str(Path(takakrypt.__file__).resolve().parent.parent)


@pytest.fixture
def identity(kmip_server: KmipServer) -> Iterator[Identity]:
    """A new client identity: PyKMIP shows each owner only its own objects, so this is
    an empty store; its objects are destroyed afterwards (a small database keeps
    PyKMIP's Locate fast)."""
    ident = kmip_server.new_identity()
    yield ident
    if kmip_server.proc is not None:
        kmip_server.destroy_all(ident)


@pytest.fixture
def kb(kmip_server: KmipServer, identity: Identity) -> Iterator[KmipBackend]:
    b = kmip_server.backend(identity)
    yield b
    b.close()


class TestKmipConformance(BackendConformance):
    @pytest.fixture
    def backend(self, kb: KmipBackend) -> KmipBackend:
        return kb

    @pytest.fixture
    def reopen(self, kmip_server: KmipServer, identity: Identity
               ) -> Callable[[], KeyBackend]:
        return lambda: kmip_server.backend(identity)


# ----------------------------------------------------------------- the objects


def _attrs(client, uid: str) -> dict[str, list]:  # type: ignore[no-untyped-def]
    out: dict[str, list] = {}
    for a in client.get_attributes(uid)[1]:
        out.setdefault(a.attribute_name.value, []).append(a.attribute_value)
    return out


def test_objects_are_what_the_docs_say(kmip_server: KmipServer, identity: Identity,
                                       kb: KmipBackend) -> None:
    kb.create("payroll")
    kb.rotate("payroll")
    mats = {v: bytes(kb.get("payroll", v)) for v in (1, 2)}
    name_attr = AttributeFactory().create_attribute
    with kmip_server.raw_client(identity) as c:
        assert len(c.locate()) == 2  # nothing else: no claims left behind
        for v in (1, 2):
            uids = c.locate(attributes=[name_attr(enums.AttributeType.NAME,
                                                  f"takakrypt/payroll/v{v}")])
            assert len(uids) == 1
            a = _attrs(c, uids[0])
            assert a["Object Type"][0].value == enums.ObjectType.SYMMETRIC_KEY
            assert a["Cryptographic Algorithm"][0].value == enums.CryptographicAlgorithm.AES
            assert a["Cryptographic Length"][0].value == 256
            assert a["State"][0].value == enums.State.ACTIVE
            mask = a["Cryptographic Usage Mask"][0].value
            assert mask == (enums.CryptographicUsageMask.ENCRYPT.value
                            | enums.CryptographicUsageMask.DECRYPT.value)
            assert [n.name_value.value for n in a["Name"]] == [object_name("payroll", v)]
            assert sorted(g.value for g in a["Object Group"]) == [
                "takakrypt", "takakrypt/payroll"]
            key = c.get(uids[0])
            assert key.cryptographic_length == 256
            assert bytes(key.value) == mats[v]
        # the group finds every version of the key
        assert len(c.locate(attributes=[name_attr(enums.AttributeType.OBJECT_GROUP,
                                                  "takakrypt/payroll")])) == 2


def test_objects_of_other_applications_are_ignored(kmip_server: KmipServer,
                                                   identity: Identity,
                                                   kb: KmipBackend) -> None:
    """Keys without our Name (or group) on the same server are not takakrypt keys."""
    with kmip_server.raw_client(identity) as c:
        c.activate(c.create(enums.CryptographicAlgorithm.AES, 256, name="someone-else"))
        c.activate(c.create(enums.CryptographicAlgorithm.AES, 128, name="takakrypt/x/v1"))
    assert kb.list() == []
    with pytest.raises(KeyNotFound):
        kb.info("x")
    kb.create("x")  # the foreign "takakrypt/x/v1" has none of our groups
    assert kb.info("x").current_version == 1


def test_one_connection_is_reused(kmip_server: KmipServer, kb: KmipBackend) -> None:
    def connections() -> int:
        return kmip_server.log.read_text().count("Receiving incoming connection")

    before = connections()
    kb.create("k")
    for _ in range(5):
        kb.rotate("k")
        wipe(kb.get("k"))
        kb.list()
    assert connections() - before == 1


# ------------------------------------------------------------------ claims


def _claim_by_hand(kmip_server: KmipServer, identity: Identity, name: str, version: int
                   ) -> str:
    """A Pre-Active object with a version's Name: a client that died between Create and
    Activate."""
    f, T = AttributeFactory().create_attribute, enums.AttributeType
    with kmip_server.raw_client(identity) as c:
        r = c.proxy.create(enums.ObjectType.SYMMETRIC_KEY, TemplateAttribute(attributes=[
            f(T.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES),
            f(T.CRYPTOGRAPHIC_LENGTH, 256),
            f(T.CRYPTOGRAPHIC_USAGE_MASK, [enums.CryptographicUsageMask.ENCRYPT]),
            f(T.NAME, object_name(name, version)),
            f(T.OBJECT_GROUP, "takakrypt", 0),
            f(T.OBJECT_GROUP, f"takakrypt/{name}", 1)]))
    assert r.result_status.value == enums.ResultStatus.SUCCESS, r.result_message
    return r.uuid


def test_unfinished_claims_are_not_versions(kmip_server: KmipServer, identity: Identity,
                                            kb: KmipBackend) -> None:
    kb.create("k")
    _claim_by_hand(kmip_server, identity, "k", 2)
    _claim_by_hand(kmip_server, identity, "ghost", 1)
    assert kb.info("k").current_version == 1
    assert [i.name for i in kb.list()] == ["k"]
    with pytest.raises(KeyNotFound):
        kb.get("k", 2)
    with pytest.raises(KeyNotFound):
        kb.info("ghost")


def test_abandoned_claim_is_destroyed_and_the_version_made(kmip_server: KmipServer,
                                                          identity: Identity,
                                                          kb: KmipBackend) -> None:
    kb.create("k")
    orphan = _claim_by_hand(kmip_server, identity, "k", 2)
    kb.claim_timeout = 0  # older than the new claim by a second: abandoned
    t = time.monotonic()
    assert kb.rotate("k").current_version == 2
    assert time.monotonic() - t < 15
    with kmip_server.raw_client(identity) as c:
        uids = c.locate()
        assert orphan not in uids and len(uids) == 2


def test_a_young_claim_of_another_client_is_waited_for(kmip_server: KmipServer,
                                                      identity: Identity,
                                                      kb: KmipBackend) -> None:
    """An older Pre-Active claim wins the version unless it is abandoned: rotate keeps
    trying and never takes the version while the claim lives (claim_budget ends it)."""
    kb.create("k")
    _claim_by_hand(kmip_server, identity, "k", 2)
    kb.claim_timeout, kb.claim_budget = 3600, 0.3
    with pytest.raises(BackendUnavailable, match="could not claim version 2"):
        kb.rotate("k")
    assert kb.info("k").current_version == 1
    with kmip_server.raw_client(identity) as c:
        assert len(c.locate()) == 2  # ours withdrawn: v1 and the foreign claim


def test_concurrent_rotates_on_separate_connections(kmip_server: KmipServer,
                                                    identity: Identity,
                                                    kb: KmipBackend) -> None:
    """Four instances (four connections, no shared lock) rotating at once: every call
    gets its own version, none exists twice."""
    kb.create("r")
    n, per = 4, 3
    others = [kmip_server.backend(identity) for _ in range(n)]
    got: list[int] = []
    errors: list[BaseException] = []
    mu = threading.Lock()
    barrier = threading.Barrier(n)

    def work(b: KmipBackend) -> None:
        try:
            barrier.wait()
            for _ in range(per):
                v = b.rotate("r").current_version
                with mu:
                    got.append(v)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in others:
        b.close()
    assert errors == []
    assert sorted(got) == list(range(2, n * per + 2))
    info = kb.info("r")
    assert info.current_version == n * per + 1
    assert len({bytes(kb.get("r", v)) for v in range(1, n * per + 2)}) == n * per + 1
    with kmip_server.raw_client(identity) as c:
        assert len(c.locate()) == n * per + 1  # no claim left behind


def test_concurrent_rotates_from_processes(kmip_server: KmipServer, identity: Identity,
                                           kb: KmipBackend) -> None:
    kb.create("p")
    args = kmip_server.backend_args(identity)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from takakrypt.keys.kmip import KmipBackend
        with KmipBackend(**{args!r}) as b:
            print(" ".join(str(b.rotate("p").current_version) for _ in range(2)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got += [int(v) for v in out.split()]
    assert sorted(got) == list(range(2, 10))
    assert kb.info("p").current_version == 9


# ------------------------------------------------------------- TLS and failures


def test_wrong_ca_is_certificate_verify_failed(kmip_server: KmipServer, tmp_path: Path,
                                               identity: Identity) -> None:
    other = Pki(tmp_path / "other", name="another CA")
    b = kmip_server.backend(identity, ca_file=other.ca_file, retries=3)
    t = time.monotonic()
    with pytest.raises(BackendUnavailable) as ei:
        b.list()
    assert time.monotonic() - t < 5  # not retried: another try would fail the same way
    msg = str(ei.value)
    assert kmip_server.address in msg and "certificate verify failed" in msg, msg
    assert other.ca_file in msg
    b.close()


def test_server_name_must_match(kmip_server: KmipServer, tmp_path: Path) -> None:
    """A server whose certificate (from the trusted CA) names another host."""
    pki = Pki(tmp_path / "pki")
    impostor = pki.issue("kms.example", server=True, names=("kms.example",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(impostor.cert_file, impostor.key_file)
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = lsock.accept()
                with conn, ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client = pki.issue("client")
        b = KmipBackend("127.0.0.1", lsock.getsockname()[1], ca_file=pki.ca_file,
                        cert_file=client.cert_file, key_file=client.key_file, timeout=5)
        with pytest.raises(BackendUnavailable) as ei:
            b.list()
        b.close()
    t.join(5)
    msg = str(ei.value)
    assert "certificate verify failed" in msg and "127.0.0.1" in msg, msg


def test_expired_client_certificate_is_refused(kmip_server: KmipServer) -> None:
    ident = kmip_server.new_identity(expired=True)
    b = kmip_server.backend(ident)
    with pytest.raises(BackendUnavailable) as ei:
        b.create("k")
    msg = str(ei.value)
    assert kmip_server.address in msg
    assert "client certificate rejected: certificate expired" in msg, msg
    assert ident.cert_file in msg
    b.close()


def test_client_certificate_of_another_ca_is_refused(kmip_server: KmipServer,
                                                    tmp_path: Path) -> None:
    ident = Pki(tmp_path / "other").issue("intruder")
    b = kmip_server.backend(ident)
    with pytest.raises(BackendUnavailable, match="client certificate rejected: unknown CA"):
        b.list()
    b.close()


def test_server_down_at_start_fails_fast(tmp_path: Path, kmip_server: KmipServer) -> None:
    port = free_port()  # nothing listens there
    b = kmip_server.backend(port=port, timeout=0.5, retries=2)
    t = time.monotonic()
    with pytest.raises(BackendUnavailable) as ei:
        b.list()
    elapsed = time.monotonic() - t
    msg = str(ei.value)
    assert f"127.0.0.1:{port}" in msg and "connection refused" in msg, msg
    assert "after 3 tries" in msg
    budget = 3 * 0.5 + 0.05 + 0.1  # three tries and the longest backoffs
    assert elapsed < 10 * budget
    b.close()


def test_timeout_and_retries_are_honoured(kmip_server: KmipServer) -> None:
    """A peer that accepts connections and never answers."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        b = kmip_server.backend(port=lsock.getsockname()[1], timeout=0.3, retries=1)
        t = time.monotonic()
        with pytest.raises(BackendUnavailable) as ei:
            b.info("k")
        elapsed = time.monotonic() - t
        b.close()
    assert "timed out" in str(ei.value) and "after 2 tries" in str(ei.value), ei.value
    assert 0.5 < elapsed < 10 * (2 * 0.3 + 0.1)


def test_server_killed_and_restarted(kmip_server: KmipServer, identity: Identity) -> None:
    b = kmip_server.backend(identity, timeout=2, retries=1)
    b.create("k")
    k1 = bytes(b.get("k"))
    kmip_server.kill()
    try:
        for call in (lambda: b.get("k"), lambda: b.rotate("k"), b.list,
                     lambda: b.create("k2")):
            t = time.monotonic()
            with pytest.raises(BackendUnavailable) as ei:
                call()
            assert time.monotonic() - t < 10 * (2 * 2 + 0.1)
            assert kmip_server.address in str(ei.value)
    finally:
        kmip_server.start()
    # the same object reconnects by itself
    assert b.get("k") == k1
    assert b.rotate("k").current_version == 2
    assert [i.name for i in b.list()] == ["k"]
    b.close()


def test_outcome_unknown_is_reported_and_not_retried(kmip_server: KmipServer,
                                                     identity: Identity) -> None:
    """A Create whose answer is lost is not sent again (the server may have done it);
    the claim it left is destroyed once abandoned, by the next rotate."""
    b = kmip_server.backend(identity, retries=3)
    b.create("k")
    real = b._exchange
    creates = []

    def lose_create_answer(data: bytes, deadline: float) -> bytearray:
        out = real(data, deadline)
        if _CREATE in data:
            creates.append(1)
            wipe(out)
            raise ConnectionResetError(104, "Connection reset by peer")
        return out

    b._exchange = lose_create_answer  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match="Create failed .*may or may not have done it"):
        b.rotate("k")
    assert creates == [1]
    b._exchange = real  # type: ignore[method-assign]
    assert b.info("k").current_version == 1  # the lost claim is no version
    b.claim_timeout = 0
    assert b.rotate("k").current_version == 2
    with kmip_server.raw_client(identity) as c:
        assert len(c.locate()) == 2
    b.close()


#: the TTLV of "Operation: Create" in a request
_CREATE = bytes.fromhex("42005c05000000040000000100000000")


# -------------------------------------------------------------- secrecy and args


def test_no_material_in_repr_errors_or_logs(kmip_server: KmipServer, identity: Identity,
                                            kb: KmipBackend,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kb.create("k")
    kb.rotate("k")
    keys = [bytes(kb.get("k", v)) for v in (1, 2)]
    texts = [repr(kb), str(kb), repr(kb.info("k")), repr(kb.list())]
    for call in (lambda: kb.get("k", 3), lambda: kb.create("k"), lambda: kb.info("nope"),
                 lambda: kb.retire("k", 2), lambda: kb.get("bad name")):
        with pytest.raises(Error) as ei:
            call()
        texts += [str(ei.value), repr(ei.value)]
    down = kmip_server.backend(identity, port=free_port(), retries=0)
    with pytest.raises(BackendUnavailable) as ei:
        down.get("k")
    texts.append(str(ei.value))
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts).encode()
    for key in keys:
        for form in _material_forms(key):
            assert form not in blob


def test_get_returns_a_locked_buffer_and_wipes_the_answer(kb: KmipBackend,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from takakrypt.keys import kmip as K

    kb.create("k")
    wiped: list[bytearray] = []
    real_wipe = K.wipe

    def spy(buf):  # type: ignore[no-untyped-def]
        wiped.append(buf)
        real_wipe(buf)

    monkeypatch.setattr(K, "wipe", spy)
    key = kb.get("k")
    assert any(len(w) > 32 and w == bytearray(len(w)) for w in wiped)  # the TTLV answer
    from takakrypt.keys.secret import lock_stats
    before = lock_stats()["buffers"]
    wipe(key)
    assert lock_stats()["buffers"] == before - 1


@pytest.mark.parametrize("kw, message", [
    ({"port": 0}, "port must be"),
    ({"port": True}, "port must be"),
    ({"timeout": 0}, "timeout must be"),
    ({"timeout": -1.0}, "timeout must be"),
    ({"retries": -1}, "retries must be"),
    ({"retries": 1.5}, "retries must be"),
    ({"host": ""}, "host must be"),
])
def test_bad_arguments(kmip_server: KmipServer, kw: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        kmip_server.backend(**kw)


def test_unusable_files_name_the_file(kmip_server: KmipServer, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    for field in ("ca_file", "cert_file", "key_file"):
        with pytest.raises(UsageError, match=f"cannot read the KMIP {field} {missing}"):
            kmip_server.backend(**{field: missing})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="ca_file"):
        kmip_server.backend(ca_file=str(junk))
    other = kmip_server.new_identity()
    with pytest.raises(UsageError, match="cannot use the KMIP cert_file"):
        kmip_server.backend(cert_file=kmip_server.identity.cert_file, key_file=other.key_file)


def test_pickling_is_refused(kb: KmipBackend) -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(kb)


# ------------------------------------------------------------------ configuration


def _kmip_yaml(tmp_path: Path, kmip: dict) -> Path:
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"keys": {"backend": "kmip", "kmip": kmip}}))
    return p


def test_config_kmip_section(kmip_server: KmipServer, tmp_path: Path) -> None:
    args = kmip_server.backend_args()
    cfg = C.load(str(_kmip_yaml(tmp_path, {**args, "timeout": 2.5, "retries": 0})))
    k = cfg.keys.kmip
    assert k is not None and (k.timeout, k.retries, k.port) == (2.5, 0, kmip_server.port)
    k = C.load(str(_kmip_yaml(tmp_path, args))).keys.kmip
    assert k is not None and (k.timeout, k.retries) == (10.0, 3)


@pytest.mark.parametrize("change, message", [
    ({"timeout": 0}, "$.keys.kmip.timeout: must be"),
    ({"timeout": 7200}, "$.keys.kmip.timeout: must be"),
    ({"retries": -1}, "$.keys.kmip.retries: must be"),
    ({"retries": 99}, "$.keys.kmip.retries: must be"),
    ({"port": 0}, "$.keys.kmip.port: must be"),
    ({"host": ""}, "$.keys.kmip.host: must be"),
    ({"ca_file": None}, "$.keys.kmip.ca_file: required"),
    ({"cert_file": None}, "$.keys.kmip.cert_file: required"),
    ({"key_file": None}, "$.keys.kmip.key_file: required"),
])
def test_config_kmip_validation(kmip_server: KmipServer, tmp_path: Path, change: dict,
                                message: str) -> None:
    kmip = {**kmip_server.backend_args(), **change}
    kmip = {k: v for k, v in kmip.items() if v is not None}
    with pytest.raises(ConfigError) as ei:
        C.load(str(_kmip_yaml(tmp_path, kmip)))
    assert message in str(ei.value)


def test_check_host_kmip_files(kmip_server: KmipServer, tmp_path: Path) -> None:
    def problems(**change: object) -> list[tuple[str, str]]:
        kmip = C.KmipKeys(**{**kmip_server.backend_args(), **change})  # type: ignore[arg-type]
        cfg = C.Config(keys=C.Keys(backend="kmip", kmip=kmip))
        out: list[tuple[str, str]] = []
        C.check_host(cfg, lambda p, m: out.append((p, m)), None)
        return out

    assert problems() == []
    missing = str(tmp_path / "nope.pem")
    assert problems(ca_file=missing) == [("$.keys.kmip.ca_file",
                                          f"cannot read {missing}: no such file")]
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(kmip_server.identity.key_file).read_bytes())
    loose.chmod(0o644)
    (p, m), = problems(key_file=str(loose))
    assert p == "$.keys.kmip.key_file" and "readable by group or others" in m
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.pem"
        unreadable.write_text("x")
        unreadable.chmod(0)
        assert problems(cert_file=str(unreadable))[0][1].endswith("permission denied")


def test_agent_opens_the_kmip_backend(kmip_server: KmipServer, identity: Identity) -> None:
    from takakrypt.agent.keymanager import open_backend

    kmip = C.KmipKeys(**kmip_server.backend_args(identity, timeout=3.0, retries=1))
    with open_backend(C.Keys(backend="kmip", kmip=kmip)) as b:
        assert isinstance(b, KmipBackend)
        assert (b.timeout, b.retries) == (3.0, 1)
        b.create("agent")
        assert [i.name for i in b.list()] == ["agent"]
    bad = C.KmipKeys(**{**kmip_server.backend_args(identity), "ca_file": "/nonexistent"})
    with pytest.raises(ConfigError, match=r"\$\.keys\.kmip"):
        open_backend(C.Keys(backend="kmip", kmip=bad))


def test_keys_package_imports_without_loading_pykmip() -> None:
    code = ("import sys, takakrypt.keys as k; assert 'kmip' not in sys.modules; "
            "assert k.KmipBackend.__name__ == 'KmipBackend'; assert 'kmip' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                                                                  "PYTHONPATH": SRC})


def test_servers_with_unique_names(kmip_server: KmipServer, identity: Identity) -> None:
    """A server that refuses a Create whose Name is taken (KMIP allows it; PyKMIP does
    not do it, so it is emulated): the refusal is a lost claim, rotation goes on."""
    from takakrypt.keys import kmip as K

    instances = [kmip_server.backend(identity) for _ in range(4)]
    refused = []
    for b in instances:
        real = b._create_object

        def unique(name: str, version: int, b=b, real=real) -> str:
            if b._holders(name, version):
                refused.append(version)
                raise K._Failed("Create", enums.ResultReason.INVALID_FIELD, "name taken")
            return real(name, version)

        b._create_object = unique  # type: ignore[method-assign]
    instances[0].create("u")
    with pytest.raises(KeyExists):
        instances[1].create("u")
    # an abandoned claim holding the Name: destroyed once old enough, by our clock
    _claim_by_hand(kmip_server, identity, "u", 2)
    instances[1].claim_timeout = 0
    assert instances[1].rotate("u").current_version == 2
    assert refused and set(refused) == {2}
    instances[1].claim_timeout = KmipBackend.claim_timeout
    got: list[int] = []
    mu = threading.Lock()

    def work(b: KmipBackend) -> None:
        for _ in range(3):
            v = b.rotate("u").current_version
            with mu:
                got.append(v)

    threads = [threading.Thread(target=work, args=(b,)) for b in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(3, 15))
    for b in instances:
        b.close()


def test_cli_rotate_versions_retire_on_kmip(kmip_server: KmipServer, identity: Identity,
                                            tmp_path: Path) -> None:
    """`takakrypt keys ... --config` works on the configuration's KMIP backend: create,
    rotate, versions (with file usage of an unmounted directory), retire refused while a
    file uses the version, allowed once none does; the server then has no object left
    for the retired version."""
    import json
    import subprocess
    import sys

    import yaml

    from takakrypt import format as fmt

    cfgp = tmp_path / "takakrypt.yaml"
    cfgp.write_text(yaml.safe_dump({"keys": {"backend": "kmip",
                                             "kmip": kmip_server.backend_args(identity)}}))
    env = {**os.environ, "TAKAKRYPT_CONTROL_SOCKET": str(tmp_path / "none.sock"),
           "PYTHONPATH": SRC}

    def tk(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "takakrypt", "keys", *args, "--config",
                               str(cfgp), "--json"], capture_output=True, text=True,
                              timeout=120, env=env)

    r = tk("create", "fleet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "kmip"
    r = tk("rotate", "fleet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["current_version"] == 2
    data = tmp_path / "data"
    data.mkdir()
    h = fmt.Header(key_id="fleet", key_version=1, file_id=os.urandom(16), block_size=4096,
                   plaintext_size=0)
    (data / "old").write_bytes(h.pack(b"\0" * 32))
    r = tk("versions", "fleet", "--usage", str(data))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["versions"]
    assert [(x["version"], x["files"], x["current"]) for x in rows] == [
        (1, 1, False), (2, 0, True)]
    r = tk("retire", "fleet", "--version", "1", "--usage", str(data))
    assert r.returncode == 18 and "still in use" in r.stderr, r.stderr
    (data / "old").unlink()
    r = tk("retire", "fleet", "--version", "1", "--usage", str(data))
    assert r.returncode == 0, r.stderr
    assert [v["state"] for v in json.loads(r.stdout)["versions"]] == ["retired", "active"]
    with kmip_server.backend(identity) as kb:
        from takakrypt.errors import KeyRetired

        with pytest.raises(KeyRetired):
            kb.get("fleet", 1)
        assert len(kb.get("fleet", 2)) == 32
