"""End to end: backup and restore of a guard point with tar, through a real takakryptd.

The application (its own binary, ``tk-app``, a copy of the interpreter) writes files
through guard point A in plaintext.  tar (permit without apply_key) archives A: the
members are byte for byte the TAKA files on disk.  tar restores the archive into guard
point B (same key) writing the raw bytes, and the application reads the original
plaintext through B — also over a file it had written and read there before.  Restoring
into a guard point whose key has different material (another keystore, same key name)
fails closed: EIO, never plaintext, never other bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent_helpers import Daemon, base_config
from takakrypt.cryptofile import TakaFile
from takakrypt.keys import open_keystore

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")

# The application: reads a JSON list of operations, prints a JSON result.
APP_CODE = r"""
import errno, hashlib, json, os, sys
ops = json.load(open(sys.argv[1]))
out = {}
for op in ops:
    kind, path = op[0], op[1]
    try:
        if kind == "mkdir":
            os.makedirs(path, exist_ok=True)
        elif kind == "write":          # write, offset, source file, [O_TRUNC]
            with open(op[3], "rb") as s:
                data = s.read()
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if op[4] else 0)
            fd = os.open(path, flags, 0o644)
            try:
                n = os.pwrite(fd, data, op[2])
                assert n == len(data), (n, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        elif kind == "append":
            with open(op[2], "rb") as s:
                data = s.read()
            with open(path, "ab") as f:
                f.write(data)
        elif kind == "truncate":
            os.truncate(path, op[2])
        elif kind == "read":
            with open(path, "rb") as f:
                data = f.read()
            out[path] = {"sha": hashlib.sha256(data).hexdigest(), "len": len(data),
                         "errno": 0, "head": data[:32].hex()}
    except OSError as e:
        out[path] = {"errno": e.errno, "sha": None, "len": -1, "head": ""}
print(json.dumps(out))
"""


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2].startswith("fuse")
                   for line in f)


class App:
    def __init__(self, work: Path) -> None:
        (work / "bin").mkdir(exist_ok=True)
        self.exe = work / "bin" / "tk-app"
        shutil.copy2(os.path.realpath(sys.executable), self.exe)
        self.script = work / "bin" / "app.py"
        self.script.write_text(APP_CODE)
        self.work = work
        self.n = 0

    def run(self, ops: list) -> dict:
        self.n += 1
        spec = self.work / f"ops{self.n}.json"
        spec.write_text(json.dumps(ops))
        r = subprocess.run([str(self.exe), "-I", str(self.script), str(spec)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def _dataset(src: Path) -> tuple[list, dict[str, bytes]]:
    """Operations that build the files of guard point A, and their expected content."""
    rng = random.Random(1234)
    src.mkdir(exist_ok=True)

    def blob(name: str, data: bytes) -> str:
        p = src / name
        p.write_bytes(data)
        return str(p)

    ops: list = []
    want: dict[str, bytes] = {}
    ops.append(["mkdir", "sub/dir"])
    for name, size in (("empty", 0), ("one", 1), ("b4095", 4095), ("b4096", 4096),
                       ("b4097", 4097), ("big.bin", (1 << 20) + 17)):
        data = rng.randbytes(size)
        ops.append(["write", name, 0, blob(name, data), True])
        want[name] = data
    text = "".join(f"line {i}: the secret ledger entry {i * 7919}\n" for i in range(3000))
    ops.append(["write", "sub/dir/ledger.txt", 0, blob("ledger", text.encode()), True])
    want["sub/dir/ledger.txt"] = text.encode()
    # sparse: two islands, a hole between them
    a, b = rng.randbytes(100), rng.randbytes(10)
    ops.append(["write", "sparse.bin", 3 * 4096 + 5, blob("sp1", a), False])
    ops.append(["write", "sparse.bin", 1 << 20, blob("sp2", b), False])
    sp = bytearray(b"\0" * ((1 << 20) + 10))
    sp[3 * 4096 + 5:3 * 4096 + 105] = a
    sp[1 << 20:] = b
    want["sparse.bin"] = bytes(sp)
    # edited: write, overwrite in the middle, append, truncate down
    e = bytearray(rng.randbytes(65536))
    ops.append(["write", "edited.bin", 0, blob("e0", bytes(e)), True])
    mid = rng.randbytes(1000)
    ops.append(["write", "edited.bin", 5000, blob("e1", mid), False])
    e[5000:6000] = mid
    tail = rng.randbytes(333)
    ops.append(["append", "edited.bin", blob("e2", tail)])
    e += tail
    ops.append(["truncate", "edited.bin", 50000])
    del e[50000:]
    want["edited.bin"] = bytes(e)
    return ops, want


def _at(root: Path, ops: list) -> list:
    out = []
    for op in ops:
        op = list(op)
        op[1] = str(root / op[1])
        out.append(op)
    return out


def _reads(root: Path, names) -> list:
    return [["read", str(root / n)] for n in names]


def _config(work: Path, guards: dict[str, str]) -> dict:
    cfg = base_config(work)
    cfg["agent"]["log_level"] = "info"
    cfg["user_sets"] = {"root": {"users": [0]}}
    cfg["process_sets"] = {"app": {"executables": [str(work / "bin" / "tk-app")]},
                           "backup": {"executables": [TAR]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        # backup: read the stored bytes; restore: write them back, still raw
        {"process_set": "backup", "actions": ["read_ops"], "effects": ["permit", "audit"]},
        {"process_set": "backup", "actions": ["write_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = []
    for name, key in guards.items():
        p = work / name
        p.mkdir(exist_ok=True)
        cfg["guard_points"].append({"path": str(p), "policy": "gp", "key": key})
    return cfg


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tar_members(tar_path: Path) -> dict[str, bytes]:
    out = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            if m.isreg():
                out[m.name.removeprefix("./")] = tf.extractfile(m).read()
    return out


def test_backup_is_raw_and_restores_into_same_key(tmp_path):
    work = tmp_path
    app = App(work)
    ops, want = _dataset(work / "src")
    cfg = _config(work, {"A": "k1", "B": "k1"})
    A, B = work / "A", work / "B"
    tar_path = work / "a.tar"
    d = Daemon(work, cfg)
    try:
        d.wait_for("READY=1")
        assert _mounted(A) and _mounted(B)
        res = app.run(_at(A, ops) + _reads(A, want))
        for name, data in want.items():
            assert res[str(A / name)]["errno"] == 0, (name, res[str(A / name)])
            assert res[str(A / name)]["sha"] == _sha(data), name

        # B already holds a file of the same name, written and read by the application
        other = work / "src" / "other"
        other.write_bytes(b"an older version of edited.bin\n" * 500)
        res = app.run([["write", str(B / "edited.bin"), 0, str(other), True],
                       ["read", str(B / "edited.bin")]])
        assert res[str(B / "edited.bin")]["sha"] == _sha(other.read_bytes())

        # backup: tar sees the stored bytes
        t = subprocess.run([TAR, "-C", str(A), "-cf", str(tar_path), "."],
                           capture_output=True, text=True, timeout=120)
        assert t.returncode == 0, t.stderr
        members = _tar_members(tar_path)
        assert set(members) == set(want), (sorted(members), sorted(want))
        for name, data in members.items():
            assert data[:4] == b"TAKA", name
            probe = want[name].strip(b"\0")[:32]
            if len(probe) == 32:
                assert probe not in data, name
        assert b"secret ledger entry" not in tar_path.read_bytes()

        # restore into B (same key), over the existing file, with tar writing raw
        t = subprocess.run([TAR, "--overwrite", "-C", str(B), "-xf", str(tar_path)],
                           capture_output=True, text=True, timeout=120)
        assert t.returncode == 0, t.stderr
        res = app.run(_reads(B, want))
        for name, data in want.items():
            r = res[str(B / name)]
            assert r["errno"] == 0, (name, r, d.logtext()[-3000:])
            assert r["sha"] == _sha(data) and r["len"] == len(data), (name, r)

        # a restored file is an ordinary file of B: the application keeps working on it
        more = work / "src" / "more"
        more.write_bytes(b"appended after the restore\n")
        res = app.run([["append", str(B / "sub/dir/ledger.txt"), str(more)],
                       ["read", str(B / "sub/dir/ledger.txt")]])
        want_b_ledger = want["sub/dir/ledger.txt"] + more.read_bytes()
        assert res[str(B / "sub/dir/ledger.txt")]["sha"] == _sha(want_b_ledger)

        # the test process (root, but not the application binary) cannot read plaintext
        r = subprocess.run(["/bin/cat", str(B / "one")], capture_output=True, timeout=60)
        assert r.returncode != 0 and b"Permission denied" in r.stderr
    finally:
        d.stop()
    assert not _mounted(A) and not _mounted(B)

    # at rest: the archive members are byte for byte the files of A
    for name, data in members.items():
        assert (A / name).read_bytes() == data, name
    # ... and what tar wrote into B is what it read from A (the ledger was appended to)
    for name, data in members.items():
        if name != "sub/dir/ledger.txt":
            assert (B / name).read_bytes() == data, name
    with open_keystore(str(work / "keystore.json"),
                       master_key_file=str(work / "master.key")) as ks:
        for name, data in want.items():
            with TakaFile.open(A / name, ks.get) as f:
                assert f.read(0, f.size) == data, name
        with TakaFile.open(B / "sub/dir/ledger.txt", ks.get) as f:
            assert f.read(0, f.size) == want_b_ledger
    events = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
    tar_events = [e for e in events if e.get("kind") == "access" and e.get("exe") == TAR]
    assert tar_events and all(e["key"] is None for e in tar_events)
    assert any(e["operation"] in ("write", "create") for e in tar_events)


def test_restore_with_a_different_key_fails_closed(tmp_path):
    """Restore onto 'another host': a keystore whose k1 is other key material."""
    work1, work2 = tmp_path / "one", tmp_path / "two"
    work1.mkdir()
    work2.mkdir()
    app1, app2 = App(work1), App(work2)
    ops, want = _dataset(work1 / "src")
    tar_path = tmp_path / "a.tar"
    d = Daemon(work1, _config(work1, {"A": "k1"}))
    A = work1 / "A"
    try:
        d.wait_for("READY=1")
        res = app1.run(_at(A, ops) + _reads(A, want))
        assert all(res[str(A / n)]["sha"] == _sha(v) for n, v in want.items()), res
        t = subprocess.run([TAR, "-C", str(A), "-cf", str(tar_path), "."],
                           capture_output=True, text=True, timeout=120)
        assert t.returncode == 0, t.stderr
    finally:
        d.stop()

    cfg2 = _config(work2, {"D": "k1"})        # same key NAME, different material
    D = work2 / "D"
    d2 = Daemon(work2, cfg2)
    try:
        d2.wait_for("READY=1")
        t = subprocess.run([TAR, "-C", str(D), "-xf", str(tar_path)],
                           capture_output=True, text=True, timeout=120)
        assert t.returncode == 0, t.stderr
        res = app2.run(_reads(D, want))
        for name, data in want.items():
            r = res[str(D / name)]
            assert r["errno"] == errno.EIO, (name, r)
            assert r["sha"] is None
        # writing through D does not work either (the header does not verify)
        src = work2 / "x"
        src.write_bytes(b"new data")
        res = app2.run([["write", str(D / "b4096"), 10, str(src), False],
                        ["read", str(D / "b4096")]])
        assert res[str(D / "b4096")]["errno"] == errno.EIO, res
    finally:
        d2.stop()
    # nothing was changed at rest by the failed accesses
    members = _tar_members(tar_path)
    for name, data in members.items():
        assert (D / name).read_bytes() == data, name
    events = [json.loads(x) for x in (work2 / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "integrity" for e in events), events[-5:]


def test_restore_into_guard_point_with_other_key_name_fails_closed(tmp_path):
    """Same keystore, guard point C configured with key k2: files under k1 must not open."""
    work = tmp_path
    app = App(work)
    cfg = _config(work, {"A": "k1", "C": "k2"})
    with open_keystore(str(work / "keystore.json"),
                       master_key_file=str(work / "master.key")) as ks:
        ks.create("k2")
    A, C = work / "A", work / "C"
    src = work / "secret"
    src.write_bytes(b"payroll of guard point A\n" * 100)
    d = Daemon(work, cfg)
    try:
        d.wait_for("READY=1")
        res = app.run([["write", str(A / "f"), 0, str(src), True], ["read", str(A / "f")]])
        assert res[str(A / "f")]["sha"] == _sha(src.read_bytes())
        t = subprocess.run(f"{TAR} -C {A} -cf - f | {TAR} -C {C} -xf -", shell=True,
                           capture_output=True, text=True, timeout=120)
        assert t.returncode == 0, t.stderr
        res = app.run([["read", str(C / "f")]])
        assert res[str(C / "f")]["sha"] != _sha(src.read_bytes()), "k1 plaintext served in C"
        assert res[str(C / "f")]["errno"] == errno.EIO, res
    finally:
        d.stop()
