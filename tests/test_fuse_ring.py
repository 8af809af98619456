"""Guard point decisions over the request ring (``GuardPoint(..., ring=Ring)``).

Decision-cache misses of the FUSE data path are sent from C as TAKA POLICY_CHECK v2
requests over a ``takakrypt._ring.Ring`` whose consumer is an asyncio loop in the
serving process (``ringserver`` + a small handler decoding with
``takakrypt.protocol``).  The server is a CHILD process (this file run as a script);
the clients are this process's forked children and subprocesses, never the server.

The handler's policy: the guard point root is open to everyone; uid 65534 is denied; the executables listed as "plain" (cat,
this Python) get PERMIT|APPLY_KEY, the "raw" ones (dd) PERMIT, everything else DENY.
A rename or link whose destination's name starts with ``nodest`` is denied on its
source path.  Paths whose last component starts with a marker get a broken answer instead:
``silent-*`` none at all, ``notfound-*`` an ERROR_NOT_FOUND response, ``raise-*`` a
handler exception (the producer gets EIO), ``bad-<kind>-*`` a malformed answer.
Every request is logged as a JSON line (requests.jsonl); the Python ``decide``
callback (which a ring-backed guard point should no longer need) logs to pydecide.jsonl.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
NOBODY = 65534
RING_TIMEOUT_MS = 400
TTL_MS = 60_000
BAD_KINDS = ("random", "empty", "seq", "magic", "version", "truncated", "trailing",
             "noresponse", "effects", "booleans", "nokey", "status", "utf8", "echo")


# ---------------------------------------------------------------------------------------
# the server (child process): python tests/test_fuse_ring.py SPEC.json


def _bad_answer(kind: str, req_bytes: bytes, good: bytes) -> bytes:
    """A malformed answer of the given kind (``good`` is a valid PERMIT|APPLY_KEY one)."""
    import struct

    b = bytearray(good)
    if kind == "random":
        return os.urandom(80)
    if kind == "empty":
        return b""
    if kind == "seq":
        struct.pack_into("<I", b, 12, (struct.unpack_from("<I", b, 12)[0] + 1) & 0xFFFFFFFF)
    elif kind == "magic":
        struct.pack_into("<I", b, 0, 0x54414B42)
    elif kind == "version":
        struct.pack_into("<I", b, 4, 1)
    elif kind == "truncated":
        return bytes(b[:-1])
    elif kind == "trailing":
        return bytes(b) + b"x"
    elif kind == "noresponse":
        struct.pack_into("<I", b, 8, 1)  # POLICY_CHECK without the response bit
    elif kind == "effects":
        struct.pack_into("<I", b, 56, 1 | 2 | 4)  # permit and deny
    elif kind == "booleans":
        struct.pack_into("<I", b, 32, 0)  # allow_access disagrees with effects
    elif kind == "nokey":
        struct.pack_into("<I", b, 64, 0)  # apply_key with key_version 0
    elif kind == "status":
        struct.pack_into("<I", b, 20, 99)  # unknown status
    elif kind == "utf8":
        i = b.index(b"guard", 72)
        b[i] = 0xFF  # key_id not UTF-8
    elif kind == "echo":
        return req_bytes
    return bytes(b)


def _serve(spec_path: str) -> int:
    sys.path.insert(0, str(SRC))
    import asyncio

    from takakrypt import protocol as P
    from takakrypt import ringserver
    from takakrypt._ring import Ring
    from takakrypt.guard import APPLY_KEY, PERMIT, GuardPoint

    spec = json.loads(Path(spec_path).read_text())
    key = bytes.fromhex(spec["key"])
    reqlog = open(spec["requests"], "a", buffering=1)
    pylog = open(spec["pydecide"], "a", buffering=1)
    auditlog = open(spec["audit_log"], "a", buffering=1)
    lock = threading.Lock()

    def ident(p: str) -> list:  # exe_ino carries the ctime too (procinfo.exe_ino_key)
        from takakrypt.procinfo import exe_ino_key, file_identity
        fid = file_identity(p)
        return [p, fid[0], exe_ino_key(fid)]

    plain = [ident(p) for p in spec["plain_exes"]]
    raw = [ident(p) for p in spec["raw_exes"]]

    def effects_for(req: P.PolicyCheckRequest) -> P.Effect:
        if req.path == spec["mountpoint"]:
            return P.Effect.PERMIT  # everyone may reach the files below the root
        if req.uid == NOBODY:
            return P.Effect.DENY
        if req.target and req.target != req.path and \
                os.path.basename(req.target).startswith("nodest"):
            return P.Effect.DENY  # a decision on the destination of a rename or link
        who = [req.process, req.exe_dev, req.exe_ino]
        if who in plain:
            return P.Effect.PERMIT | P.Effect.APPLY_KEY
        if who in raw:
            return P.Effect.PERMIT
        return P.Effect.DENY

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def handler(data: bytes):
        msg = P.decode(data)
        req = msg.payload
        h = msg.header
        reqlog.write(json.dumps({
            "version": h.version, "operation": int(h.operation), "sequence": h.sequence,
            "status": int(h.status), "timestamp": h.timestamp, "pid": req.pid, "tid": req.tid,
            "uid": req.uid, "gid": req.gid, "code": int(req.action),
            "action": req.action.policy_name, "path": req.path, "process": req.process,
            "cwd": req.cwd, "start_time": req.start_time, "exe_dev": req.exe_dev,
            "exe_ino": req.exe_ino, "guard_point_id": req.guard_point_id,
            "target": req.target, "size": len(data)}) + "\n")
        base = os.path.basename(req.path)
        if base.startswith("silent"):
            return loop.create_future()  # never answered
        if base.startswith("notfound"):
            return P.encode(P.error_reply(msg, P.Status.NOT_FOUND, "no such guard point"))
        if base.startswith("raise"):
            raise RuntimeError("handler failure (test)")
        fx = effects_for(req)
        if base.startswith("bad-"):
            fx = P.Effect.PERMIT | P.Effect.APPLY_KEY
        rsp = P.encode(P.reply(msg, P.PolicyCheckResponse.from_effects(
            fx, key_id="guard" if fx & P.Effect.APPLY_KEY else "",
            key_version=1 if fx & P.Effect.APPLY_KEY else 0, policy="test",
            reason="test policy", rule_index=0 if fx & P.Effect.PERMIT else -1,
            cache_ttl_ms=TTL_MS)))
        if base.startswith("bad-"):
            return _bad_answer(base.split("-")[1], data, rsp)
        return rsp

    def py_decide(uid, gid, pid, path, action):
        pylog.write(json.dumps({"uid": uid, "pid": pid, "path": path, "action": action}) + "\n")
        return (PERMIT | APPLY_KEY if uid == 0 else 2), 0, 1, 60.0

    def audit(kind, uid, gid, pid, path, action, effects, detail):
        with lock:
            auditlog.write(json.dumps({"kind": kind, "uid": uid, "gid": gid, "pid": pid,
                                       "path": path, "action": action, "effects": effects,
                                       "detail": detail}) + "\n")

    ring = Ring(slots=256)
    server = ringserver.attach(loop, ring, handler)
    gp = GuardPoint(spec["mountpoint"], backing=spec["backing"], key_name="guard",
                    get_key=lambda name, version: key, decide=py_decide, audit=audit,
                    threads=4, ring=ring, ring_timeout_ms=spec["ring_timeout_ms"])

    def dump() -> None:
        s = gp.stats()
        s["ring"] = ring.stats()
        tmpf = spec["stats_file"] + ".tmp"
        Path(tmpf).write_text(json.dumps(s))
        os.rename(tmpf, spec["stats_file"])

    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    loop.add_signal_handler(signal.SIGUSR1, dump)
    gp.mount()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        loop.run_forever()
    finally:
        server.close()
        ring.close()  # producers still waiting get EPIPE (deny) at once
        gp.unmount()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))


# ---------------------------------------------------------------------------------------
# the tests (client side)

import pytest  # noqa: E402

from fuse_helpers import (Guard, serve_child, errno_of, fuse_skip_reason, run_as,  # noqa: E402
                          sweep_stale_mounts)

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from takakrypt import protocol as P  # noqa: E402
from takakrypt.cryptofile import TakaFile  # noqa: E402

PY_EXE = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")
DD = os.path.realpath(shutil.which("dd") or "/bin/dd")
HEAD = os.path.realpath(shutil.which("head") or "/usr/bin/head")
SECRET = b"the quick brown fox jumps over the lazy dog\n" * 200


class RingGuard(Guard):
    def requests(self) -> list[dict]:
        p = self.workdir / "requests.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]

    def py_decisions(self) -> list[dict]:
        p = self.workdir / "pydecide.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]

    def abs(self, rel: str = "") -> str:
        return str(self.mnt) + ("/" + rel if rel else "")

    def taka(self, name: str, data: bytes) -> None:
        with TakaFile.create(str(self.backing / name), "guard", 1, bytearray(self.key)) as f:
            f.write(0, data)
        os.chmod(self.backing / name, 0o644)


@contextlib.contextmanager
def ring_guard(tmp: Path, *, ring_timeout_ms: int = RING_TIMEOUT_MS):
    workdir = Path(tempfile.mkdtemp(prefix="ringguard-", dir=tmp))
    backing, mnt = tmp / "backing", tmp / "mnt"
    backing.mkdir()
    mnt.mkdir()
    key = os.urandom(32)
    spec = {"mountpoint": str(mnt), "backing": str(backing), "key": key.hex(),
            "plain_exes": [CAT, PY_EXE], "raw_exes": [DD], "ring_timeout_ms": ring_timeout_ms,
            "requests": str(workdir / "requests.jsonl"),
            "pydecide": str(workdir / "pydecide.jsonl"),
            "audit_log": str(workdir / "audit.jsonl"), "stats_file": str(workdir / "stats.json")}
    for f in ("requests.jsonl", "pydecide.jsonl", "audit.jsonl"):
        (workdir / f).touch()
    (workdir / "spec.json").write_text(json.dumps(spec))
    with serve_child(Path(__file__).resolve(), workdir, mnt) as proc:
        yield RingGuard(mnt, backing, key, workdir, proc)


@pytest.fixture(scope="module")
def g():
    sweep_stale_mounts()
    d = Path(tempfile.mkdtemp(prefix="tkring-"))
    d.chmod(0o755)
    # realpath: the engine sends the guard point's resolved mount path
    d = Path(os.path.realpath(d))
    try:
        with ring_guard(d) as guard:
            yield guard
    finally:
        sweep_stale_mounts(str(d))
        shutil.rmtree(d, ignore_errors=True)


def start_time_of(pid: int | str = "self") -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def me_and_read(path: str) -> dict:
    """In a client child: who am I, then read ``path``."""
    from takakrypt.procinfo import exe_ino_key, file_identity
    fid = file_identity("/proc/self/exe")
    data = read_file(path)
    return {"pid": os.getpid(), "start_time": start_time_of(), "exe_dev": fid[0],
            "exe_ino": exe_ino_key(fid), "data": data}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=60, **kw)


# ---- no mount needed --------------------------------------------------------------------


def test_action_codes_are_the_protocols():
    from takakrypt import _fuse, guard

    assert set(_fuse.PROTOCOL_ACTIONS) == set(_fuse.ACTIONS)
    for name, code in _fuse.PROTOCOL_ACTIONS.items():
        assert P.Action(code).policy_name == name
        assert code == int(P.Action.from_policy_name(name))
    assert P.Action.NONE not in _fuse.PROTOCOL_ACTIONS.values()
    assert guard.PROTOCOL_ACTIONS == _fuse.PROTOCOL_ACTIONS


def test_mount_ring_arguments(tmp_path):
    from takakrypt import _fuse
    from takakrypt._ring import Ring
    from takakrypt.guard import GuardPoint

    def get_key(name, version):
        return 1, bytes(32)

    ring = Ring(slots=8)
    m = _fuse.Mount(str(tmp_path), None, "k", None, get_key, ring=ring)
    assert m.ring is ring and m.ring_timeout_ms == _fuse.RING_TIMEOUT_MS == 5000
    assert _fuse.Mount(str(tmp_path), None, "k", None, get_key, ring=ring,
                       ring_timeout_ms=50).ring_timeout_ms == 50
    with pytest.raises(ValueError):
        _fuse.Mount(str(tmp_path), None, "k", None, get_key)  # neither decide nor ring
    with pytest.raises(TypeError):
        _fuse.Mount(str(tmp_path), None, "k", None, get_key, ring=object())
    with pytest.raises(ValueError):
        _fuse.Mount(str(tmp_path), None, "k", None, get_key, ring=ring, ring_timeout_ms=0)
    with pytest.raises(ValueError):
        GuardPoint(tmp_path, key_name="k", get_key=lambda n, v: bytes(32))
    gp = GuardPoint(tmp_path, key_name="k", get_key=lambda n, v: bytes(32), ring=ring)
    assert gp.ring is ring
    del m, gp
    ring.close()


# ---- views through the mount ------------------------------------------------------------


def test_plaintext_raw_and_deny_views(g):
    g.taka("secret.txt", SECRET)
    stored = (g.backing / "secret.txt").read_bytes()
    assert stored[:4] == b"TAKA" and stored != SECRET
    path = str(g.mnt / "secret.txt")
    r = run([CAT, path])
    assert r.returncode == 0, r.stderr
    assert r.stdout == SECRET  # cat: plaintext view
    r = run([DD, f"if={path}", "bs=1M", "status=none"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == stored  # dd: raw view, the stored bytes
    assert os.stat(path).st_size == len(SECRET)  # this Python: plaintext view size
    r = run([HEAD, "-c", "10", path])
    assert r.returncode != 0 and b"Permission denied" in r.stderr  # other exe: deny
    assert run_as(0, 0, read_file, path) == SECRET
    assert run_as(NOBODY, NOBODY, errno_of, read_file, path) == errno.EACCES
    r = run([CAT, path], user=NOBODY, group=NOBODY, extra_groups=[])
    assert r.returncode != 0 and b"Permission denied" in r.stderr

    reqs = [q for q in g.requests() if q["path"] == g.abs("secret.txt")]
    assert {(q["process"], q["action"]) for q in reqs} >= {
        (CAT, "read"), (DD, "read"), (HEAD, "read"), (PY_EXE, "read")}
    assert any(q["uid"] == NOBODY and q["gid"] == NOBODY for q in reqs)
    denied = [e for e in g.audit_events() if e["path"] == "secret.txt" and e["kind"] == "access"]
    assert any(e["detail"] == "denied" and e["uid"] == NOBODY for e in denied)
    assert g.proc.poll() is None


def test_requests_carry_the_callers_identity(g):
    g.taka("ident.txt", b"abc")
    r = subprocess.Popen([CAT, str(g.mnt / "ident.txt")], stdout=subprocess.PIPE)
    out, _ = r.communicate(timeout=60)
    assert out == b"abc"
    me = run_as(0, 0, me_and_read, str(g.mnt / "ident.txt"))
    assert me["data"] == b"abc"
    t0 = time.time_ns()

    reqs = [q for q in g.requests() if q["path"] == g.abs("ident.txt")]
    by_cat = [q for q in reqs if q["pid"] == r.pid]
    assert by_cat and all(q["process"] == CAT and q["tid"] == r.pid for q in by_cat)
    from takakrypt.procinfo import exe_ino_key, file_identity
    fid = file_identity(CAT)  # exe_ino carries the ctime too
    assert all((q["exe_dev"], q["exe_ino"]) == (fid[0], exe_ino_key(fid)) for q in by_cat)

    mine = [q for q in reqs if q["pid"] == me["pid"]]
    assert {q["action"] for q in mine} >= {"read", "getattr"}
    for q in mine:
        assert q["tid"] == me["pid"] and q["uid"] == 0 and q["gid"] == 0
        assert q["start_time"] == me["start_time"]
        assert (q["exe_dev"], q["exe_ino"]) == (me["exe_dev"], me["exe_ino"])
        assert q["process"] == PY_EXE
    for q in g.requests():
        assert q["version"] == 2 and q["operation"] == 1 and q["status"] == 0
        assert q["cwd"] == "" and q["guard_point_id"] == 0 and q["target"] == ""
        assert q["code"] == int(P.Action.from_policy_name(q["action"]))
        assert 0 < t0 - q["timestamp"] < 600 * 10**9
        assert q["path"] == g.abs() or q["path"].startswith(g.abs() + "/")
    seqs = [q["sequence"] for q in g.requests()]
    assert 0 not in seqs and len(set(seqs)) == len(seqs)


def _thread_access(path: str) -> dict:
    out: dict = {}

    def body():
        out["tid"] = threading.get_native_id()
        out["data"] = read_file(path)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    out["pid"] = os.getpid()
    out["start_time"] = start_time_of()
    return out


def test_thread_caller_sends_tgid_and_process_start_time(g):
    g.taka("thread.txt", b"from a thread")
    me = run_as(0, 0, _thread_access, str(g.mnt / "thread.txt"))
    assert me["data"] == b"from a thread" and me["tid"] != me["pid"]
    reqs = [q for q in g.requests() if q["tid"] == me["tid"]]
    assert reqs
    for q in reqs:
        assert q["pid"] == me["pid"]
        assert q["start_time"] == me["start_time"]  # the process's, not the thread's


def test_root_and_every_ring_action(g):
    """Each operation sends its action code for the absolute path; the guard point
    root is the mount path itself.  rename and link check both paths, each request
    carrying the destination as `target`."""
    def ops(mnt: str) -> None:
        os.listdir(mnt)
        os.mkdir(f"{mnt}/d")
        with open(f"{mnt}/d/f", "wb") as f:
            f.write(b"0123456789")
        with open(f"{mnt}/d/f", "ab") as f:
            f.write(b"tail")
        os.truncate(f"{mnt}/d/f", 3)
        os.chmod(f"{mnt}/d/f", 0o600)
        os.setxattr(f"{mnt}/d/f", "user.t", b"v")
        assert os.getxattr(f"{mnt}/d/f", "user.t") == b"v"
        assert os.listdir(f"{mnt}/d") == ["f"]
        os.rename(f"{mnt}/d/f", f"{mnt}/d/g")
        os.link(f"{mnt}/d/g", f"{mnt}/d/h")
        os.unlink(f"{mnt}/d/h")
        os.unlink(f"{mnt}/d/g")
        os.rmdir(f"{mnt}/d")

    run_as(0, 0, ops, str(g.mnt))
    seen = {(q["action"], q["path"]) for q in g.requests()}
    d, f = g.abs("d"), g.abs("d/f")
    for want in [("list", g.abs()), ("getattr", g.abs()), ("mkdir", d), ("create", f),
                 ("write", f), ("append", f), ("truncate", f), ("setattr", f),
                 ("setxattr", f), ("getxattr", f), ("list", d), ("delete", g.abs("d/h")),
                 ("delete", g.abs("d/g")), ("rmdir", d)]:
        assert want in seen, want
    moves = {(q["action"], q["path"], q["target"]) for q in g.requests()
             if q["action"] in ("rename", "link")}
    dg, dh = g.abs("d/g"), g.abs("d/h")
    assert moves == {("rename", f, dg), ("rename", dg, dg), ("link", dg, dh),
                     ("link", dh, dh)}, moves
    others = {q["target"] for q in g.requests() if q["action"] not in ("rename", "link")}
    assert others == {""}
    assert g.py_decisions() == []  # nothing needs the GIL any more


def test_rename_and_link_decisions_are_cached_with_their_destination(g):
    """The answer for moving a path is cached for that destination only: after a
    permitted rename of `src` (cached), a rename of a new `src` to a destination the
    policy refuses is asked afresh and denied (issue 14, item 7)."""
    def moves(mnt: str) -> tuple[int, int, int]:
        for name in ("mv-src", "ln-src"):
            with open(f"{mnt}/{name}", "wb") as f:
                f.write(b"x")
        os.rename(f"{mnt}/mv-src", f"{mnt}/mv-ok")
        os.link(f"{mnt}/ln-src", f"{mnt}/ln-ok")
        with open(f"{mnt}/mv-src", "wb") as f:
            f.write(b"y")
        return (errno_of(os.rename, f"{mnt}/mv-src", f"{mnt}/nodest-1"),
                errno_of(os.link, f"{mnt}/ln-src", f"{mnt}/nodest-2"),
                errno_of(os.rename, f"{mnt}/mv-src", f"{mnt}/mv-ok2"))

    assert run_as(0, 0, moves, str(g.mnt)) == (errno.EACCES, errno.EACCES, 0)
    assert not (g.backing / "nodest-1").exists() and not (g.backing / "nodest-2").exists()
    asked = {(q["action"], q["path"], q["target"]) for q in g.requests()}
    assert ("rename", g.abs("mv-src"), g.abs("nodest-1")) in asked
    assert ("link", g.abs("ln-src"), g.abs("nodest-2")) in asked


def _two_reads(path: str, log: str) -> tuple[int, int, int]:
    def count() -> int:
        with open(log, "rb") as f:
            return f.read().count(b"\n")

    n0 = count()
    read_file(path)
    n1 = count()
    read_file(path)
    return n0, n1, count()


def test_second_access_is_a_cache_hit(g):
    g.taka("cached.txt", b"cache me")
    before = g.stats()
    n0, n1, n2 = run_as(0, 0, _two_reads, str(g.mnt / "cached.txt"),
                        str(g.workdir / "requests.jsonl"))
    after = g.stats()
    assert n1 > n0  # the first access asked the agent
    assert n2 == n1  # the second one did not: every decision came from the cache
    assert after["cache_hits"] > before["cache_hits"]
    assert after["ring_requests"] - before["ring_requests"] == n1 - n0


# ---- failures: deny, audited ------------------------------------------------------------


def _failed_access(g: RingGuard, name: str) -> tuple[int, float]:
    g.taka(name, b"x")
    t = time.monotonic()
    err = run_as(0, 0, errno_of, read_file, str(g.mnt / name))
    return err, time.monotonic() - t


def _audited(g: RingGuard, name: str, detail: str) -> list[dict]:
    return [e for e in g.audit_events()
            if e["path"] == name and e["kind"] == "access" and e["detail"] == detail]


def test_agent_that_never_answers_times_out_and_denies(g):
    before = g.stats()
    err, took = _failed_access(g, "silent-1")
    assert err == errno.EACCES
    assert took >= RING_TIMEOUT_MS / 1000 * 0.9
    after = g.stats()
    assert after["ring_timeouts"] > before["ring_timeouts"]
    assert after["decide_errors"] > before["decide_errors"]
    ev = _audited(g, "silent-1", "agent unavailable")
    assert ev and all(e["effects"] & 2 for e in ev)  # DENY
    # nothing was cached: the next access asks (and waits) again
    n = len([q for q in g.requests() if q["path"] == g.abs("silent-1")])
    assert run_as(0, 0, errno_of, read_file, str(g.mnt / "silent-1")) == errno.EACCES
    assert len([q for q in g.requests() if q["path"] == g.abs("silent-1")]) > n


def test_not_found_status_denies(g):
    before = g.stats()
    err, _ = _failed_access(g, "notfound-1")
    assert err == errno.EACCES
    assert g.stats()["ring_error_status"] > before["ring_error_status"]
    assert _audited(g, "notfound-1", "agent error: no such guard point")


def test_handler_exception_denies(g):
    before = g.stats()
    err, _ = _failed_access(g, "raise-1")
    assert err == errno.EACCES
    assert g.stats()["ring_errors"] > before["ring_errors"]
    assert _audited(g, "raise-1", "agent unavailable")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_malformed_answer_denies(g, kind):
    before = g.stats()
    err, _ = _failed_access(g, f"bad-{kind}-1")
    assert err == errno.EACCES
    assert g.stats()["ring_malformed"] > before["ring_malformed"]
    assert _audited(g, f"bad-{kind}-1", "malformed agent answer")


def test_good_answers_still_work_after_failures(g):
    g.taka("after.txt", b"still fine")
    assert run_as(0, 0, read_file, str(g.mnt / "after.txt")) == b"still fine"
    assert g.proc.poll() is None
