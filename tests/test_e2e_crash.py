"""End to end: takakryptd killed (SIGKILL) under load, restarted; and many processes on
the same files at once.  A real agent serves an in-place guard point; the only process
with plaintext is ``tk-app`` (a copy of the interpreter) running the scripts below.

Content model.  Every byte written is ``pattern(file, generation, offset)``: 16-byte
units carrying (file, generation, unit index, mix), never all zero.  Writers log each
operation to a file outside the guard point before starting it ("S") and after it
returned ("D"); one writer per file, so at most one operation per file is in flight
when the agent dies.  After the restart, every file must be exactly the state after
its completed operations, except that the one in-flight operation may have been
applied or not — block by block for content; old or new for the size, or for a
growing write anything in between (the kernel sends one write(2) as several FUSE
requests, each applied or not) — and only blocks that operation touches may fail with
EIO.  Never any other bytes.  The same
check runs on the files at rest through the Python reference reader (TakaFile).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_helpers import Daemon, base_config
from takakrypt import format as fmt
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import IntegrityError
from takakrypt.keys import open_keystore

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

BS = 4096

PATTERN_SRC = r'''
import struct as _struct
def pattern(fid, gen, off, n):
    if n <= 0:
        return b""
    u0, u1 = off // 16, (off + n + 15) // 16
    pk = _struct.Struct("<IIII").pack
    buf = b"".join(pk(fid, gen, u & 0xffffffff,
                      (fid * 0x9E3779B1 ^ gen * 0x85EBCA77 ^ u * 0xC2B2AE3D) & 0xffffffff)
                   for u in range(u0, u1))
    s = off - u0 * 16
    return buf[s:s + n]
'''
exec(PATTERN_SRC)  # defines pattern() here too  # noqa: S102

# --- the writer (crash test) -------------------------------------------------------------
WRITER_SRC = PATTERN_SRC + r'''
import errno, os, random, sys, json
spec = json.loads(sys.argv[1])
log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rng = random.Random(spec["seed"])
BS = 4096
files = []
for f in spec["files"]:
    flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if f["mode"] == "extend" else 0)
    files.append(dict(f, fd=os.open(f["path"], flags, 0o644), size=0, gen=0, phase=0))

def L(s):
    os.write(log, (s + "\n").encode())

def do(f, kind, a, b=0):
    f["gen"] += 1
    g, fd = f["gen"], f["fd"]
    L(f"S {f['name']} {g} {kind} {a} {b}")
    if kind == "write":
        data = pattern(f["fid"], g, a, b)
        n = os.pwrite(fd, data, a)
        if n != b:
            raise OSError(errno.EIO, f"short write {n}/{b}")
        f["size"] = max(f["size"], a + b)
    elif kind == "append":
        data = pattern(f["fid"], g, a, b)
        n = os.write(fd, data)
        if n != b:
            raise OSError(errno.EIO, f"short write {n}/{b}")
        f["size"] = a + b
    elif kind == "trunc":
        os.ftruncate(fd, a)
        f["size"] = a
    if rng.random() < 0.1:
        os.fsync(fd)
    L(f"D {f['name']} {g}")

try:
    while not os.path.exists(spec["stop"]):
        for f in files:
            m, size = f["mode"], f["size"]
            if size == 0:
                do(f, "write", 0, f["blocks"] * BS + 123)
            elif m == "overwrite":
                off = rng.randrange(0, size)
                if rng.random() < 0.5:
                    off -= off % BS
                do(f, "write", off, rng.randint(1, 3 * BS + 500))
            elif m == "extend":
                if size > 2 * 1024 * 1024:
                    do(f, "trunc", rng.randrange(0, 64 * BS))
                else:
                    do(f, "append", size, rng.randint(1, 9000))
            elif m == "truncate":
                f["phase"] ^= 1
                if f["phase"]:
                    if rng.random() < 0.25:
                        do(f, "trunc", size + rng.randint(1, 3 * BS))   # up: a hole
                    else:
                        do(f, "trunc", rng.randrange(0, size))          # down
                else:
                    target = f["blocks"] * BS + rng.randrange(0, BS)
                    if target > size:
                        do(f, "write", size, target - size)
                    else:
                        do(f, "write", rng.randrange(0, size), rng.randint(1, 2 * BS))
except OSError as e:
    L(f"E {e.errno}")
'''

# --- the dump: read every block of every file, one pread per block -----------------------
DUMP_SRC = r'''
import errno, json, os, sys
spec = json.loads(sys.argv[1])
out = {}
for name, path in spec["files"].items():
    r = {"size": -1, "eio": [], "errno": 0}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        r["errno"] = e.errno
        out[name] = r
        continue
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    size = os.fstat(fd).st_size
    r["size"] = size
    with open(os.path.join(spec["dump"], name), "wb") as d:
        for i in range((size + 4095) // 4096):
            want = min(4096, size - i * 4096)
            try:
                b = os.pread(fd, want, i * 4096)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                r["eio"].append(i)
                b = b"\0" * want
            if len(b) != want:
                r.setdefault("short", []).append(i)
                b = b.ljust(want, b"\0")
            d.write(b)
    os.close(fd)
    out[name] = r
print(json.dumps(out))
'''

# --- simple operations for the deterministic crash-state tests ---------------------------
OPS_SRC = r'''
import hashlib, json, os, sys
out = []
for op in json.loads(sys.argv[1]):
    try:
        if op[0] == "read":
            with open(op[1], "rb") as f:
                data = f.read()
            out.append({"len": len(data), "hex": data.hex()})
        elif op[0] == "truncate":
            os.truncate(op[1], op[2])
            out.append({"ok": True})
        elif op[0] == "pwrite":
            fd = os.open(op[1], os.O_WRONLY)
            os.pwrite(fd, bytes.fromhex(op[3]), op[2])
            os.close(fd)
            out.append({"ok": True})
    except OSError as e:
        out.append({"errno": e.errno})
print(json.dumps(out))
'''

# --- concurrency: writers own interleaved chunks, readers check stable chunks -----------
CONC_SRC = PATTERN_SRC + r'''
import json, mmap, os, random, struct, sys
spec = json.loads(sys.argv[1])
role, me = spec["role"], spec["index"]
nfiles, nchunks, C, W = spec["nfiles"], spec["nchunks"], spec["chunk"], spec["writers"]
gens = spec["gens"]
sfd = os.open(spec["state"], os.O_RDWR)
st = mmap.mmap(sfd, 0)
def slot(kind, f, c):      # kind 0 = started, 1 = done
    return ((kind * nfiles + f) * nchunks + c) * 4
def get(kind, f, c):
    return struct.unpack_from("<I", st, slot(kind, f, c))[0]
def put(kind, f, c, v):
    struct.pack_into("<I", st, slot(kind, f, c), v)
fds = [os.open(p, os.O_RDWR) for p in spec["paths"]]
rng = random.Random(spec["seed"])
res = {"checked": 0, "skipped": 0, "bad": [], "writes": 0}
if role == "writer":
    mine = [c for c in range(nchunks) if c % W == me]
    for g in range(1, gens + 1):
        order = mine[:]
        rng.shuffle(order)
        for c in order:
            for f in range(nfiles):
                put(0, f, c, g)
                data = pattern(f + 1, g, c * C, C)
                assert os.pwrite(fds[f], data, c * C) == C
                put(1, f, c, g)
                res["writes"] += 1
else:
    while not os.path.exists(spec["stop"]):
        f, c = rng.randrange(nfiles), rng.randrange(nchunks)
        s1, d1 = get(0, f, c), get(1, f, c)
        data = os.pread(fds[f], C, c * C)
        s2 = get(0, f, c)
        if not (s1 == d1 == s2) or d1 == 0:
            res["skipped"] += 1
            continue
        res["checked"] += 1
        if data != pattern(f + 1, d1, c * C, C):
            res["bad"].append([f, c, d1, data[:32].hex()])
print(json.dumps(res))
'''


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2].startswith("fuse")
                   for line in f)


class Env:
    """A work directory with the tk-app binary, scripts, config and guard point."""

    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "bin").mkdir(exist_ok=True)
        self.exe = work / "bin" / "tk-app"
        shutil.copy2(os.path.realpath(sys.executable), self.exe)
        for name, src in (("writer", WRITER_SRC), ("dump", DUMP_SRC), ("ops", OPS_SRC),
                          ("conc", CONC_SRC)):
            (work / "bin" / f"{name}.py").write_text(src)
        self.gp = work / "gp"
        self.gp.mkdir(exist_ok=True)
        cfg = base_config(work)
        cfg["agent"]["log_level"] = "info"
        cfg["process_sets"] = {"app": {"executables": [str(self.exe)]}}
        cfg["policies"] = {"gp": {"rules": [
            {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
             "effects": ["permit", "apply_key"]},
            {"actions": ["getattr", "list"], "effects": ["permit"]},
            {"actions": ["all_ops"], "effects": ["deny"]},
        ]}}
        cfg["guard_points"] = [{"path": str(self.gp), "policy": "gp", "key": "k1"}]
        self.cfg = cfg

    def popen(self, script: str, arg: dict, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(self.exe), "-I", str(self.work / "bin" / f"{script}.py"),
                                 json.dumps(arg)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)

    def run(self, script: str, arg: dict | list):
        r = subprocess.run([str(self.exe), "-I", str(self.work / "bin" / f"{script}.py"),
                            json.dumps(arg)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def keys(self):
        return open_keystore(str(self.work / "keystore.json"),
                             master_key_file=str(self.work / "master.key"))


def _stop_procs(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


# --------------------------------------------------------------------------------------
# the model


def _apply(content: bytearray, fid: int, op: tuple) -> None:
    kind, gen, a, b = op
    if kind in ("write", "append"):
        if len(content) < a:
            content.extend(bytes(a - len(content)))
        content[a:a + b] = pattern(fid, gen, a, b)  # noqa: F821 - defined by exec
    elif kind == "trunc":
        if a < len(content):
            del content[a:]
        else:
            content.extend(bytes(a - len(content)))


def _parse_logs(logs: list[Path]) -> dict[str, dict]:
    """name -> {"done": [op...], "inflight": op | None}; op = (kind, gen, a, b)."""
    files: dict[str, dict] = {}
    for log in logs:
        started: dict[str, tuple] = {}
        for line in log.read_text().splitlines():
            p = line.split()
            if not p or p[0] == "E":
                continue
            if p[0] == "S" and len(p) == 6:
                f = files.setdefault(p[1], {"done": [], "inflight": None})
                assert f["inflight"] is None and p[1] not in started, line
                started[p[1]] = (p[3], int(p[2]), int(p[4]), int(p[5]))
                f["inflight"] = started[p[1]]
            elif p[0] == "D" and len(p) == 3:
                op = started.pop(p[1])
                assert op[1] == int(p[2]), line
                files[p[1]]["done"].append(op)
                files[p[1]]["inflight"] = None
    return files


def _touched(before: int, after: int, op: tuple) -> set[int]:
    kind, _g, a, b = op
    t = set()
    if kind in ("write", "append") and b:
        t.update(range(a // BS, (a + b - 1) // BS + 1))
    for s in (before, after):
        if s:
            t.add((s - 1) // BS)
    return t


def _check_file(name: str, fid: int, hist: dict, size: int, blocks: list[bytes | None]) -> dict:
    """Compare one file (its size and per-block bytes, None = EIO) with the model."""
    before = bytearray()
    for op in hist["done"]:
        _apply(before, fid, op)
    inflight = hist["inflight"]
    after = None
    if inflight is not None:
        after = bytearray(before)
        _apply(after, fid, inflight)
    sizes = {len(before)} | ({len(after)} if after is not None else set())
    if inflight is not None and inflight[0] in ("write", "append"):
        # the kernel splits one write(2) into several FUSE requests (the first one ends
        # at a page boundary): an interrupted growing write may have grown the file part
        # of the way, by whole requests; each request is old-or-new on its own
        ok = min(sizes) <= size <= max(sizes)
    else:
        ok = size in sizes
    assert ok, f"{name}: size {size} not in {sizes} (in flight: {inflight})"
    allowed_eio = _touched(len(before), len(after), inflight) if after is not None else set()
    eio, from_after = [], 0
    for i, got in enumerate(blocks):
        lo, hi = i * BS, min((i + 1) * BS, size)
        if got is None:
            assert i in allowed_eio, (f"{name}: block {i} fails (EIO) but no write in flight "
                                      f"touched it (in flight: {inflight})")
            eio.append(i)
            continue
        cands = [c[lo:hi] for c in (before, after) if c is not None and len(c) >= hi]
        if got not in cands:
            unit = got[:16].hex()
            raise AssertionError(f"{name}: block {i} holds bytes that were never written there "
                                 f"(first unit {unit}; in flight: {inflight}; size {size}, "
                                 f"model sizes {sizes})")
        if after is not None and got == after[lo:hi] and got != before[lo:hi]:
            from_after += 1
    return {"eio": eio, "inflight": inflight is not None, "from_after": from_after,
            "content": bytes(before) if inflight is None else None}


def _dump(env: Env, names: dict[str, Path]) -> dict[str, tuple[int, list]]:
    ddir = env.work / "dump"
    shutil.rmtree(ddir, ignore_errors=True)
    ddir.mkdir()
    res = env.run("dump", {"files": {n: str(p) for n, p in names.items()}, "dump": str(ddir)})
    out = {}
    for n, r in res.items():
        assert r["errno"] == 0, f"{n}: open failed with errno {r['errno']}"
        assert not r.get("short"), (n, r)
        data = (ddir / n).read_bytes()
        blocks: list = [data[i * BS:(i + 1) * BS] for i in range((r["size"] + BS - 1) // BS)]
        for i in r["eio"]:
            blocks[i] = None
        out[n] = (r["size"], blocks)
    return out


def _dump_at_rest(env: Env, names: dict[str, Path]) -> dict[str, tuple[int, list]]:
    out = {}
    with env.keys() as ks:
        for n, p in names.items():
            with TakaFile.open(p, ks.get) as f:
                blocks: list = []
                for i in range((f.size + BS - 1) // BS):
                    try:
                        blocks.append(f.read(i * BS, BS))
                    except IntegrityError:
                        blocks.append(None)
                out[n] = (f.size, blocks)
    return out


# --------------------------------------------------------------------------------------


MODES = [("overwrite", "extend"), ("truncate", "overwrite"), ("extend", "truncate"),
         ("overwrite", "truncate")]


def test_sigkill_under_load_never_yields_wrong_bytes(tmp_path):
    env = Env(tmp_path)
    rounds, min_ops = 5, 30
    all_files: dict[str, tuple[int, Path]] = {}
    logs: list[Path] = []
    stats = []
    d = Daemon(tmp_path, env.cfg)
    writers: list[subprocess.Popen] = []
    try:
        d.wait_for("READY=1")
        for rnd in range(rounds):
            stop = tmp_path / f"stop{rnd}"
            round_logs = []
            writers = []
            for w, modes in enumerate(MODES):
                files = []
                for k, mode in enumerate(modes):
                    fid = len(all_files) + 1
                    name = f"r{rnd}w{w}f{k}-{mode}"
                    all_files[name] = (fid, env.gp / name)
                    files.append({"name": name, "fid": fid, "mode": mode,
                                  "path": str(env.gp / name), "blocks": 12 + 4 * w})
                log = tmp_path / f"r{rnd}w{w}.log"
                round_logs.append(log)
                writers.append(env.popen("writer", {"log": str(log), "stop": str(stop),
                                                     "seed": rnd * 100 + w, "files": files}))
            # let every writer complete some operations, then kill the agent mid-flight
            for _ in range(6000):
                done = [lg.read_text().count("\nD ") if lg.exists() else 0 for lg in round_logs]
                if min(done) >= min_ops or any(p.poll() is not None for p in writers):
                    break
                time.sleep(0.01)
            assert all(p.poll() is None for p in writers), \
                [p.communicate()[1] for p in writers if p.poll() is not None]
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(60)
            for p in writers:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            stop.touch()
            _stop_procs(writers)
            for lg in round_logs:  # every writer was stopped by the dead mount
                assert "\nE " in "\n" + lg.read_text(), lg.read_text()[-300:]
            logs += round_logs
            d.stop()
            d = Daemon(tmp_path, env.cfg)
            d.wait_for("READY=1")
            # every file of every round so far, through the restarted agent
            hist = _parse_logs(logs)
            dumped = _dump(env, {n: p for n, (_f, p) in all_files.items()})
            for n, (fid, _p) in all_files.items():
                size, blocks = dumped[n]
                stats.append(_check_file(n, fid, hist[n], size, blocks))
    finally:
        _stop_procs(writers)
        d.stop()
    assert not _mounted(env.gp)
    # the same verdicts from the Python reference reader, at rest
    hist = _parse_logs(logs)
    at_rest = _dump_at_rest(env, {n: p for n, (_f, p) in all_files.items()})
    for n, (fid, _p) in all_files.items():
        size, blocks = at_rest[n]
        _check_file(n, fid, hist[n], size, blocks)
    last = stats[-len(all_files):]
    assert sum(1 for s in last if s["inflight"]) >= 1  # the kills did hit operations
    print(f"crash rounds: {rounds}; files {len(all_files)}; in flight at a kill: "
          f"{sum(s['inflight'] for s in stats)}; blocks from an in-flight op: "
          f"{sum(s['from_after'] for s in stats)}; EIO blocks: {sum(len(s['eio']) for s in stats)}")


# --------------------------------------------------------------------------------------
# deterministic crash states (what a kill between two steps of a size change leaves)


def _read(env: Env, path: Path) -> bytes:
    r = env.run("ops", [["read", str(path)]])[0]
    assert "errno" not in r, r
    return bytes.fromhex(r["hex"])


def _crash_state_files(env: Env) -> dict[str, bytes]:
    """Create, at rest, files in the states a kill leaves between the steps of a size
    change, and return the plaintext each must show."""
    gp, want = env.gp, {}
    with env.keys() as ks:
        key = ks.get("k1", 1)
        # (1) growing: new blocks stored, header (old size) not yet rewritten
        for name, old_size, grow in (("grow-partial", 10_000, 9_000), ("grow-aligned", 8192, 3 * BS),
                                     ("grow-empty", 0, 5000)):
            old = pattern(1, 1, 0, old_size)  # noqa: F821
            with TakaFile.create(gp / name, "k1", 1, bytearray(key)) as f:
                f.write(0, old)
                hdr = os.pread(f.fileno(), fmt.HEADER_SIZE, 0)
                f.write(old_size, pattern(2, 2, old_size, grow))  # noqa: F821
                os.pwrite(f.fileno(), hdr, 0)                      # the kill came here
            want[name] = old
        # (2) shrinking: header (new size) written, last block and tail not yet cut
        for name, old_size, new_size in (("shrink-partial", 30_000, 10_000),
                                         ("shrink-aligned", 30_000, 8192),
                                         ("shrink-inside", 9_000, 8_500)):
            old = pattern(3, 1, 0, old_size)  # noqa: F821
            with TakaFile.create(gp / name, "k1", 1, bytearray(key)) as f:
                f.write(0, old)
                f.header.plaintext_size = new_size
                f._write_header()                                   # the kill came here
            want[name] = old[:new_size]
        key[:] = bytes(32)
    return want


def test_crash_states_of_size_changes_read_and_grow_cleanly(tmp_path):
    env = Env(tmp_path)
    want = _crash_state_files(env)
    with open(env.gp / "grow-partial", "rb") as f:  # sanity: a stale tail is really there
        assert len(f.read()) > fmt.stored_size(10_000)
    d = Daemon(tmp_path, env.cfg)
    try:
        d.wait_for("READY=1")
        for name, data in want.items():
            assert _read(env, env.gp / name) == data, name
        # growing over the stale tail: the new range reads zeros, never the old bytes
        ops, expect = [], {}
        for name, data in want.items():
            p = str(env.gp / name)
            if name.startswith("grow"):
                ops.append(["truncate", p, len(data) + 6 * BS])
                expect[name] = data + bytes(6 * BS)
            else:
                # a write past the end, leaving a gap over the stale bytes
                tail = b"\xab" * 100
                at = len(data) + 2 * BS + 7
                ops.append(["pwrite", p, at, tail.hex()])
                expect[name] = data + bytes(at - len(data)) + tail
            ops.append(["read", p])
        res = env.run("ops", ops)
        for i, name in enumerate(want):
            assert res[2 * i] == {"ok": True}, (name, res[2 * i])
            got = bytes.fromhex(res[2 * i + 1]["hex"])
            assert len(got) == len(expect[name]), name
            assert got == expect[name], (name, _first_diff(got, expect[name]))
    finally:
        d.stop()
    with env.keys() as ks:
        for name, data in expect.items():
            with TakaFile.open(env.gp / name, ks.get) as f:
                assert f.read(0, f.size) == data, name


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------
# concurrency


def test_concurrent_writers_and_readers_stay_consistent(tmp_path):
    env = Env(tmp_path)
    nfiles, nchunks, chunk, nwriters, nreaders, gens = 2, 96, 3000, 3, 2, 4
    paths = [str(env.gp / f"shared{f}") for f in range(nfiles)]
    state = tmp_path / "state"
    state.write_bytes(bytes(2 * nfiles * nchunks * 4))
    stop = tmp_path / "stop"
    base = {"nfiles": nfiles, "nchunks": nchunks, "chunk": chunk, "writers": nwriters,
            "gens": gens, "state": str(state), "paths": paths, "stop": str(stop)}
    procs: list[subprocess.Popen] = []
    d = Daemon(tmp_path, env.cfg)
    try:
        d.wait_for("READY=1")
        for p in paths:  # create the files (empty) as the application
            r = subprocess.run([str(env.exe), "-I", "-c", "import sys; open(sys.argv[1], 'wb')",
                                p], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        readers = [env.popen("conc", dict(base, role="reader", index=i, seed=1000 + i))
                   for i in range(nreaders)]
        writers = [env.popen("conc", dict(base, role="writer", index=i, seed=i))
                   for i in range(nwriters)]
        procs = readers + writers
        wres = []
        for p in writers:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            wres.append(json.loads(out))
        stop.touch()
        rres = []
        for p in readers:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            rres.append(json.loads(out))
        assert sum(w["writes"] for w in wres) == nfiles * nchunks * gens
        bad = [b for r in rres for b in r["bad"]]
        assert not bad, bad[:5]
        assert sum(r["checked"] for r in rres) > 50, rres
        print(f"concurrency: writes {sum(w['writes'] for w in wres)}, reader checks "
              f"{[(r['checked'], r['skipped']) for r in rres]}")
        final = {f"shared{f}": b"".join(pattern(f + 1, gens, c * chunk, chunk)  # noqa: F821
                                        for c in range(nchunks)) for f in range(nfiles)}
        for f in range(nfiles):
            assert _read(env, Path(paths[f])) == final[f"shared{f}"]
    finally:
        stop.touch()
        _stop_procs(procs)
        d.stop()
    with env.keys() as ks:
        for name, data in final.items():
            with TakaFile.open(env.gp / name, ks.get) as f:
                assert f.read(0, f.size) == data, name
            assert (env.gp / name).stat().st_size == fmt.stored_size(len(data))
