"""Audit records of the kernel engine have the FUSE engine's shape.

takakryptd serves a real FUSE guard point; the FUSE engine audits a denied write, a
tampered block and a file under a key the guard point does not serve.  The kernel
module's AUDIT_EVENTs for the same happenings (bytes built by takakrypt.protocol, sent
on the agent's protocol socket, which hands them to the same RequestHandler as generic
netlink) must give the same records, field for field, plus ``detail.engine: kernel``
(and ``detail.count`` for an event the module coalesced), in the JSON and CEF sinks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_helpers import base_config, running
from takakrypt import protocol as P
from takakrypt.keys import open_keystore

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
SKIP = ("time", "latency_us", "detail")


def _cli(tmp: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "takakrypt", *args, "--keystore",
                        str(tmp / "keystore.json"), "--master-key-file", str(tmp / "master.key")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _setup(tmp: Path) -> tuple[dict, Path]:
    cfg = base_config(tmp)
    with open_keystore(str(tmp / "keystore.json"), master_key_file=str(tmp / "master.key")) as ks:
        ks.create("k2")
    gp = tmp / "gp"
    gp.mkdir()
    (tmp / "plain").write_bytes(b"x" * 10000)
    _cli(tmp, "encrypt", "-q", "--key", "k1", str(tmp / "plain"), str(gp / "tampered"))
    _cli(tmp, "encrypt", "-q", "--key", "k2", str(tmp / "plain"), str(gp / "other"))
    with open(gp / "tampered", "r+b") as f:  # a byte of block 0's ciphertext
        f.seek(128 + 12 + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1"}]
    cfg["audit"] = {"coalesce": {"window_seconds": 0},
                    "sinks": [{"type": "file", "path": str(tmp / "audit.jsonl")},
                              {"type": "file", "path": str(tmp / "audit.cef"), "format": "cef"}]}
    return cfg, gp


def _child(code: str, *args: str) -> int:
    """Run ``code`` in a child python (a client never runs in the serving process)."""
    p = subprocess.Popen([PY, "-c", code, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.strip() == "refused", (out, err)
    return p.pid


def _records(tmp: Path, pred, n: int = 1, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        path = tmp / "audit.jsonl"
        text = path.read_text() if path.exists() else ""
        recs = [json.loads(x) for x in text.split("\n")[:-1]]  # whole lines only
        found = [r for r in recs if pred(r)]
        if len(found) >= n or time.monotonic() > deadline:
            assert len(found) >= n, recs[-10:]
            return found


def _send(sock_path: str, ev: P.AuditEventRequest, seq: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.send(P.encode(P.request(ev, seq)))
        r = P.decode(s.recv(P.MAX_MSG_SIZE))
    assert r.ok and r.is_response and r.sequence == seq, r


def _same_shape(fuse: dict, kernel: dict) -> None:
    assert list(fuse) == list(kernel)  # the same keys in the same order
    assert {k: v for k, v in fuse.items() if k not in SKIP} == \
        {k: v for k, v in kernel.items() if k not in SKIP}


def test_kernel_records_have_the_fuse_engines_shape(tmp_path):
    cfg, gp = _setup(tmp_path)
    tampered, other = str(gp / "tampered"), str(gp / "other")
    sock = cfg["agent"]["protocol_socket"]
    with running(tmp_path, cfg):
        # the FUSE engine: a denied write (rule 1: deny, audit), a bad tag, a foreign key
        refuse = ("import sys\ntry:\n    {}\nexcept OSError:\n    print('refused')")
        w_pid = _child(refuse.format("open(sys.argv[1], 'r+b')"), tampered)
        r_pid = _child(refuse.format("open(sys.argv[1], 'rb').read()"), tampered)
        _child(refuse.format("open(sys.argv[1], 'rb').read()"), other)
        deny = _records(tmp_path, lambda r: r["kind"] == "access" and r["pid"] == w_pid
                        and r["operation"] == "write")[0]
        integ = _records(tmp_path, lambda r: r["kind"] == "integrity" and r["path"] == tampered
                         and (r["detail"] or {}).get("pid") == r_pid)[0]
        nokey = _records(tmp_path, lambda r: r["kind"] == "integrity" and r["path"] == other)[0]
        assert deny["decision"] == "deny" and deny["rule"] == 1 and deny["detail"] is None
        assert integ["reason"] == "block 0 failed authentication"
        assert nokey["reason"] == "key of the file header unavailable"

        # the kernel module's events for the same happenings
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.ACCESS, path=tampered, process=deny["exe"], detail="denied",
            pid=w_pid, tid=w_pid, uid=0, gid=0, action=P.Action.WRITE,
            effects=P.Effect.DENY | P.Effect.AUDIT, rule_index=1, guard_point_id=1,
            error=13), 1)
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.INTEGRITY, path=tampered, process=PY,
            detail="block 0 failed authentication", pid=r_pid, uid=0, gid=0,
            action=P.Action.READ, guard_point_id=1, error=5), 2)
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.KEY_UNAVAILABLE, path=other, process=PY,
            pid=nokey["detail"]["pid"], uid=0, gid=0,
            action=P.Action(P.Action[nokey["detail"]["action"].upper()]), guard_point_id=1,
            error=5), 3)
        # coalesced by the module (count 4), path relative to the guard point, id given
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.ACCESS, path="tampered", process=deny["exe"], detail="denied",
            pid=w_pid, uid=0, gid=0, action=P.Action.WRITE,
            effects=P.Effect.DENY | P.Effect.AUDIT, rule_index=1, guard_point_id=1,
            error=13, count=4), 4)
        # no decision could be had: the FUSE engine's fail-closed record
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.AGENT_UNAVAILABLE, path=f"{gp}/sub/f", process=PY, pid=4242,
            uid=0, gid=0, action=P.Action.READ, guard_point_id=0, error=13, count=2), 5)
        # a permitted, audited plaintext open (a cache hit the module audits)
        _send(sock, P.AuditEventRequest(
            kind=P.AuditKind.ACCESS, path=tampered, process=PY, pid=4243, uid=0, gid=0,
            action=P.Action.READ, effects=P.Effect.PERMIT | P.Effect.APPLY_KEY | P.Effect.AUDIT,
            rule_index=0, guard_point_id=1), 6)

        def kern(r):
            return (r["detail"] or {}).get("engine") == "kernel"

        recs = _records(tmp_path, kern, n=6)
    k_deny, k_integ, k_nokey, k_many, k_gone, k_permit = recs
    _same_shape(deny, k_deny)
    assert k_deny["detail"] == {"engine": "kernel"}
    _same_shape(integ, k_integ)
    assert k_integ["detail"] == {**integ["detail"], "engine": "kernel"}
    _same_shape(nokey, k_nokey)  # the module sent no text: the FUSE engine's is used
    assert k_nokey["detail"] == {**nokey["detail"], "engine": "kernel"}
    _same_shape(deny, k_many)
    assert k_many["detail"] == {"engine": "kernel", "count": 4}
    assert {k: k_gone[k] for k in ("kind", "uid", "user", "pid", "exe", "path", "operation",
                                   "decision", "effects", "policy", "rule", "key", "reason",
                                   "detail")} == {
        "kind": "access", "uid": 0, "user": "root", "pid": 4242, "exe": PY,
        "path": f"{gp}/sub/f", "operation": "read", "decision": "deny",
        "effects": ["deny", "audit"], "policy": "p", "rule": -1, "key": None,
        "reason": "agent unavailable", "detail": {"engine": "kernel", "count": 2}}
    assert (k_permit["decision"], k_permit["effects"], k_permit["key"], k_permit["rule"]) == \
        ("permit", ["permit", "apply_key", "audit"], "k1", 0)

    cef = (tmp_path / "audit.cef").read_text().splitlines()
    mine = [x for x in cef if f"spid={w_pid} " in x and "cs5=write" in x]
    assert len(mine) == 3, mine  # the FUSE engine's and the kernel's two
    assert all("|1001|access denied|7|" in x for x in mine)
    assert sum('cs6={"engine":"kernel"}' in x for x in mine) == 1
    assert sum('cs6={"engine":"kernel","count":4}' in x for x in mine) == 1
