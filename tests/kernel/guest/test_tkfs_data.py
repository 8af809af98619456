"""takakryptfs data path in the VM (issue 18): interop with the FUSE engine and the CLI
byte for byte, POSIX behaviour next to a plain ext4 directory, tamper (EIO, never wrong
bytes), a writer killed mid-write.  The environment is tkfs_env.kernel_env: ext4 lower
directory, takakryptd serving keys, a FUSE guard point over the same directory."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tkfs_env import drop_caches, kmount, kumount

SIZES = [0, 1, 4095, 4096, 4097, (1 << 20) + 3]
HDR, BS, SBS = 128, 4096, 4096 + 28


@pytest.fixture
def env(kenv):
    return kenv


def stored_len(n: int) -> int:
    return HDR + n + 28 * -(-n // BS)


def mutate(rng: random.Random, path: Path, ref: bytearray, steps: int = 25) -> None:
    """Random overwrites, truncates and appends on path, mirrored in ref."""
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(steps):
            op = rng.choice(["write", "write", "truncate", "append", "far"])
            if op == "write":
                off = rng.randrange(0, len(ref) + 5000)
                data = rng.randbytes(rng.randrange(1, 9000))
                os.pwrite(fd, data, off)
                if off > len(ref):
                    ref.extend(bytes(off - len(ref)))
                ref[off:off + len(data)] = data
            elif op == "truncate":
                n = rng.randrange(0, len(ref) + 9000)
                os.ftruncate(fd, n)
                del ref[n:]
                ref.extend(bytes(n - len(ref)))
            elif op == "append":
                data = rng.randbytes(rng.randrange(1, 6000))
                os.pwrite(fd, data, len(ref))
                ref.extend(data)
            else:  # a sparse write far past the end: holes between
                off = len(ref) + rng.randrange(3 * BS, 40 * BS)
                data = rng.randbytes(rng.randrange(1, 3000))
                os.pwrite(fd, data, off)
                ref.extend(bytes(off - len(ref)))
                ref.extend(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- interop ------------------------------------------------------------------------------

def test_kernel_written_files_read_everywhere(env):
    rng = random.Random(18)
    ref: dict[str, bytes] = {}
    for n in SIZES:
        data = rng.randbytes(n)
        (env.kmnt / f"k{n}").write_bytes(data)
        ref[f"k{n}"] = data
    # sparse: one byte 3 MiB in
    with open(env.kmnt / "ksparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"x")
    ref["ksparse"] = bytes(3 << 20) + b"x"
    m = bytearray(rng.randbytes(10000))
    (env.kmnt / "kmut").write_bytes(m)
    mutate(rng, env.kmnt / "kmut", m)
    ref["kmut"] = bytes(m)
    drop_caches()
    for name, data in ref.items():
        stored = env.lower / name
        assert stored.read_bytes()[:4] == b"TAKA", name
        if name != "ksparse" and name != "kmut":
            assert stored.stat().st_size == stored_len(len(data)), name
        # the command itself for the largest file, its code for the rest
        assert env.decrypt(stored, cli=name == "k1048579") == data, f"takakrypt decrypt {name}"
        assert (env.fmnt / name).read_bytes() == data, f"FUSE read {name}"
        assert os.stat(env.kmnt / name).st_size == len(data)
    # the sparse file stays sparse below
    assert (env.lower / "ksparse").stat().st_blocks * 512 < (1 << 20)
    env.remount()
    for name, data in ref.items():
        assert (env.kmnt / name).read_bytes() == data, f"takakryptfs after remount {name}"


def test_fuse_and_cli_written_files_read_through_kernel(env):
    rng = random.Random(81)
    ref: dict[str, bytes] = {}
    for n in SIZES:
        data = rng.randbytes(n)
        (env.fmnt / f"f{n}").write_bytes(data)
        ref[f"f{n}"] = data
    with open(env.fmnt / "fsparse", "wb") as f:
        f.seek((2 << 20) + 5)
        f.write(b"tail")
    ref["fsparse"] = bytes((2 << 20) + 5) + b"tail"
    m = bytearray(rng.randbytes(7000))
    (env.fmnt / "fmut").write_bytes(m)
    mutate(rng, env.fmnt / "fmut", m)
    ref["fmut"] = bytes(m)
    for n in SIZES:
        plain = env.base / f"plain{n}"
        data = rng.randbytes(n)
        plain.write_bytes(data)
        env.cli("encrypt", "-q", "--key", "k1", str(plain), str(env.lower / f"c{n}"))
        ref[f"c{n}"] = data
    # xform: a directory of plaintext converted in place, then moved below the mount
    xd = env.ext / "xform"
    xd.mkdir()
    for i in range(3):
        data = rng.randbytes(rng.randrange(0, 20000))
        (xd / f"x{i}").write_bytes(data)
        ref[f"x{i}"] = data
    env.cli("xform", "-q", "--key", "k1", str(xd))
    for i in range(3):
        os.rename(xd / f"x{i}", env.lower / f"x{i}")
    for name, data in ref.items():
        got = (env.kmnt / name).read_bytes()
        assert got == data, f"takakryptfs read of {name}: {len(got)} vs {len(data)} bytes"
        assert os.stat(env.kmnt / name).st_size == len(data), name
    # and the kernel can keep writing what others wrote
    for name in ("f4097", "c4095", "x1"):
        d = bytearray(ref[name])
        mutate(rng, env.kmnt / name, d, steps=8)
        drop_caches()
        assert env.decrypt(env.lower / name) == bytes(d), name


# ---- POSIX behaviour ------------------------------------------------------------------

def _renameat2(a: Path, b: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, str(a).encode(), AT_FDCWD, str(b).encode(), flags):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_namespace_operations(env):
    k = env.kmnt / "ns"
    k.mkdir()
    (k / "d").mkdir()
    (k / "a").write_bytes(b"alpha")
    (k / "b").write_bytes(b"beta")
    os.symlink("a", k / "s")
    assert os.readlink(k / "s") == "a" and (k / "s").read_bytes() == b"alpha"
    assert os.readlink(env.lower / "ns" / "s") == "a"     # names and targets as they are
    os.link(k / "a", k / "d" / "hard")
    assert os.stat(k / "a").st_nlink == 2
    assert os.stat(k / "a").st_ino == os.stat(k / "d" / "hard").st_ino
    with open(k / "d" / "hard", "r+b") as f:           # one file under two names
        f.write(b"ALPHA")
    assert (k / "a").read_bytes() == b"ALPHA"
    with pytest.raises(FileExistsError):
        _renameat2(k / "a", k / "b", 1)                  # RENAME_NOREPLACE
    _renameat2(k / "a", k / "b", 2)                      # RENAME_EXCHANGE
    assert (k / "a").read_bytes() == b"beta" and (k / "b").read_bytes() == b"ALPHA"
    os.rename(k / "b", k / "d" / "moved")
    assert not (k / "b").exists() and (k / "d" / "moved").read_bytes() == b"ALPHA"
    os.setxattr(k / "a", "user.tag", b"v1")
    assert os.getxattr(k / "a", "user.tag") == b"v1"
    assert os.getxattr(env.lower / "ns" / "a", "user.tag") == b"v1"
    assert "user.tag" in os.listxattr(k / "a")
    os.removexattr(k / "a", "user.tag")
    assert "user.tag" not in os.listxattr(k / "a")
    with pytest.raises(OSError) as e:
        os.rmdir(k / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(k / "d" / "hard")
    os.unlink(k / "d" / "moved")
    os.rmdir(k / "d")
    assert sorted(os.listdir(k)) == ["a", "s"]
    os.mkfifo(k / "fifo")
    assert os.path.exists(env.lower / "ns" / "fifo")
    sv, sl = os.statvfs(k), os.statvfs(env.lower)
    assert sv.f_blocks == sl.f_blocks and sv.f_bsize == sl.f_bsize
    out = subprocess.run(["ls", "-l", str(k / "a")], capture_output=True, text=True).stdout
    assert " 4 " in out, out                           # the plaintext size


def test_append_direct_mmap_truncate(env):
    p = env.kmnt / "io"
    ref = bytearray()
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    for i in range(50):
        chunk = bytes([i]) * (97 * i + 1)
        os.write(fd, chunk)
        ref += chunk
    os.close(fd)
    assert p.read_bytes() == ref
    # O_DIRECT: accepted (served through the page cache, stored before write returns)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 8192)
    buf.write(b"D" * 8192)
    assert os.pwritev(fd, [buf], 4096) == 8192
    ref[4096:4096 + 8192] = b"D" * 8192
    rbuf = mmap.mmap(-1, 8192)
    assert os.preadv(fd, [rbuf], 0) == 8192 and bytes(rbuf) == bytes(ref[:8192])
    os.close(fd)
    assert env.decrypt(env.lower / "io")[4096:4096 + 8192] == b"D" * 8192  # already stored
    # shared writable mmap
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[100:200] = b"M" * 100
        m.flush()
        m.close()
    ref[100:200] = b"M" * 100
    # truncate down into a block, extend past the end (a hole), shrink to zero and grow
    os.truncate(p, 5000)
    del ref[5000:]
    os.truncate(p, 20000)
    ref.extend(bytes(15000))
    assert p.read_bytes() == ref and os.stat(p).st_size == 20000
    drop_caches()
    env.remount()
    assert p.read_bytes() == ref
    assert env.decrypt(env.lower / "io") == ref
    os.truncate(p, 0)
    assert p.read_bytes() == b"" and (env.lower / "io").stat().st_size == HDR
    with open(p, "ab") as f:
        f.write(b"again")
    env.remount()
    assert p.read_bytes() == b"again"


def test_permissions_follow_the_lower_inode(env):
    p = env.kmnt / "private"
    p.write_bytes(b"root only")
    os.chmod(p, 0o600)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    os.chmod(p, 0o644)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", str(p)], capture_output=True)
    assert r.returncode == 0 and r.stdout == b"root only"


def test_mount_errors(env):
    for opts, want in (("", errno.EINVAL), ("key=k1,bogus=1", errno.EINVAL),
                       ("key=-bad", errno.EINVAL), ("key=" + "a" * 64, errno.EINVAL),
                       # deciding by the agent (the default) needs its guard point id
                       ("key=k1", errno.EINVAL), ("key=k1,decide=agent", errno.EINVAL),
                       ("key=k1,gp=1,decide=maybe", errno.EINVAL)):
        with pytest.raises(OSError) as e:
            kmount(env.lower, env.base / "m2", opts)
        assert e.value.errno == want, opts
    with pytest.raises(OSError) as e:
        kmount(env.base / "no-such-dir", env.base / "m2")
    assert e.value.errno == errno.ENOENT


# ---- tamper: EIO, never wrong bytes -------------------------------------------------

def _read_all(p: Path) -> bytes | int:
    try:
        return p.read_bytes()
    except OSError as e:
        return e.errno


def _tampered(env, name: str, fn) -> bytes | int:
    """Change the stored file with fn while unmounted; what a fresh mount reads."""
    stored = env.lower / name
    orig = stored.read_bytes()
    kumount(env.kmnt)
    try:
        fn(stored, orig)
        kmount(env.lower, env.kmnt)
        return _read_all(env.kmnt / name)
    finally:
        stored.write_bytes(orig)


def test_tamper_gives_eio(env):
    rng = random.Random(7)
    data = rng.randbytes(3 * BS + 100)
    (env.kmnt / "t").write_bytes(data)
    drop_caches()

    def flip(off: int, bit: int):
        def fn(stored: Path, orig: bytes):
            b = bytearray(orig)
            b[off] ^= 1 << bit
            stored.write_bytes(b)
        return fn

    # every header byte, one bit each
    for off in range(HDR):
        got = _tampered(env, "t", flip(off, off % 8))
        assert got == errno.EIO, f"header byte {off}: {got if isinstance(got, int) else 'data'}"
    # sampled block bytes: nonce, ciphertext, tag of each block
    for blk in range(4):
        base = HDR + blk * SBS
        n = min(BS, len(data) - blk * BS) + 28
        for off in sorted({base, base + 11, base + 12, base + rng.randrange(12, n - 16),
                           base + n - 16, base + n - 1}):
            got = _tampered(env, "t", flip(off, rng.randrange(8)))
            assert got == errno.EIO, f"block {blk} byte {off - base}"
    # truncated stored file: a byte short, a tag short, a whole block short
    for cut in (1, 16, 28, SBS):
        got = _tampered(env, "t", lambda s, o, cut=cut: s.write_bytes(o[:-cut]))
        assert got == errno.EIO, f"cut {cut}"
    # blocks 0 and 1 swapped
    def swap(stored: Path, orig: bytes):
        b = bytearray(orig)
        b[HDR:HDR + SBS], b[HDR + SBS:HDR + 2 * SBS] = orig[HDR + SBS:HDR + 2 * SBS], orig[HDR:HDR + SBS]
        stored.write_bytes(b)
    assert _tampered(env, "t", swap) == errno.EIO
    # a block of another file under the same key at the same index
    (env.kmnt / "t2").write_bytes(rng.randbytes(len(data)))
    drop_caches()
    other = (env.lower / "t2").read_bytes()
    assert _tampered(env, "t", lambda s, o: s.write_bytes(o[:HDR] + other[HDR:HDR + SBS] + o[HDR + SBS:])) == errno.EIO
    # untouched, it reads back; the kernel log names the inode
    env.remount()
    assert (env.kmnt / "t").read_bytes() == data
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert "takakryptfs: inode" in log and "authentication failed: EIO" in log


def test_partial_reads_of_a_tampered_file(env):
    """A bad block fails the reads that touch it; the other blocks still read, and no
    read ever returns bytes that differ from what was written."""
    rng = random.Random(9)
    data = rng.randbytes(5 * BS)
    (env.kmnt / "p").write_bytes(data)
    drop_caches()
    kumount(env.kmnt)
    stored = env.lower / "p"
    orig = stored.read_bytes()
    b = bytearray(orig)
    b[HDR + 2 * SBS + 500] ^= 0x40
    stored.write_bytes(b)
    kmount(env.lower, env.kmnt)
    try:
        fd = os.open(env.kmnt / "p", os.O_RDONLY)
        for blk in range(5):
            try:
                got = os.pread(fd, BS, blk * BS)
                assert blk != 2 and got == data[blk * BS:(blk + 1) * BS]
            except OSError as e:
                assert blk == 2 and e.errno == errno.EIO
        os.close(fd)
    finally:
        stored.write_bytes(orig)


# ---- crash ---------------------------------------------------------------------------

WRITER = r"""
import os, random, sys
p, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
fd = os.open(p, os.O_RDWR)
for k in range(255):                  # write k stores the value k + 1 over its run
    off = rng.randrange(0, size)
    n = min(rng.randrange(1, 12000), size - off)
    print(k, off, n, flush=True)
    os.pwrite(fd, bytes([k + 1]) * n, off)
    if rng.random() < 0.05:
        os.fsync(fd)
os.close(fd)
print("done", flush=True)
"""


def test_writer_killed_mid_write(env):
    """Old data (zeros, fsynced); a writer stores runs of one value each (write k: value
    k + 1) and is SIGKILLed; the page cache is dropped and the mount remade.  Every byte
    read back must be the old zero or the value of a write that covers it and was issued
    (k no later than the last one announced), or its block fails with EIO."""
    size = 16 * BS + 1234
    p = env.kmnt / "crash"
    for rnd in range(4):
        p.write_bytes(bytes(size))
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(p), str(rnd), str(size)],
                             stdout=subprocess.PIPE, text=True)
        runs = {}
        deadline = time.monotonic() + 0.3 + 0.4 * rnd
        while time.monotonic() < deadline:
            line = w.stdout.readline()
            if not line or line.strip() == "done":
                break
            k, off, n = map(int, line.split())
            runs[k] = (off, n)
        w.send_signal(signal.SIGKILL)
        w.wait()
        for line in w.stdout.read().splitlines():   # announced before the kill landed
            if line.strip() != "done":
                k, off, n = map(int, line.split())
                runs[k] = (off, n)
        drop_caches()
        env.remount()
        fd = os.open(p, os.O_RDONLY)
        assert os.fstat(fd).st_size == size
        eio = 0
        for blk in range(-(-size // BS)):
            try:
                got = os.pread(fd, BS, blk * BS)
            except OSError as e:
                assert e.errno == errno.EIO
                eio += 1
                continue
            assert len(got) == min(BS, size - blk * BS)
            for j, v in enumerate(got):
                if v:
                    i = blk * BS + j
                    assert v - 1 in runs, f"byte {i} = {v}: no such write issued"
                    off, n = runs[v - 1]
                    assert off <= i < off + n, f"byte {i} = {v}: outside write {v - 1}"
        os.close(fd)
        assert eio == 0, "killed writer, no power cut: every block verifies"


# ---- in place ---------------------------------------------------------------------------

def test_in_place_mount(env):
    """Mounted over its own directory: what was there (TAKA files written by the CLI)
    reads as plaintext through it, what is written lands encrypted in the same directory."""
    d = env.ext / "inplace"
    d.mkdir()
    (env.base / "ip.plain").write_bytes(b"written before the mount\n" * 300)
    env.cli("encrypt", "-q", "--key", "k1", str(env.base / "ip.plain"), str(d / "old"))
    kmount(d, d)
    try:
        assert (d / "old").read_bytes() == b"written before the mount\n" * 300
        (d / "new").write_bytes(b"written through it")
        fd = os.open(d / "new", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    finally:
        kumount(d)
    assert (d / "new").read_bytes()[:4] == b"TAKA"
    assert env.decrypt(d / "new") == b"written through it"


def test_full_lower_file_system(env):
    """The lower file system fills up: fsync reports ENOSPC (not EIO, not success), what
    was stored before stays readable, and after space is freed the mount writes again."""
    lower, mnt = env.base / "small", env.base / "small-mnt"
    lower.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(lower)], check=True)
    try:
        kmount(lower, mnt)
        try:
            with open(mnt / "keep", "wb") as f:
                f.write(b"k" * 5000)
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(mnt / "big", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                with pytest.raises(OSError) as ei:
                    for _ in range(64):              # 2 MiB into 1 MiB
                        os.write(fd, os.urandom(32768))
                    os.fsync(fd)
                assert ei.value.errno == errno.ENOSPC, ei.value
            finally:
                os.close(fd)
            os.unlink(mnt / "big")
            (mnt / "after").write_bytes(b"a" * 7000)
            fd = os.open(mnt / "after", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        finally:
            kumount(mnt)
        kmount(lower, mnt)
        try:
            assert (mnt / "keep").read_bytes() == b"k" * 5000
            assert (mnt / "after").read_bytes() == b"a" * 7000
        finally:
            kumount(mnt)
    finally:
        subprocess.run(["umount", str(lower)], check=False)


# ---- keys withdrawn by the agent (last: the reload disables the FUSE guard point) ----

def _genl(env) -> dict:
    # whatever the exit code: while a reload mounts the guard point again, status says
    # it is not mounted yet (unhealthy, exit 1) and still lists the transports
    st = json.loads(env.agent.cli("status", "--json", check=False).stdout)
    return next(t for t in st["transports"] if t["transport"] == "genl")


def _reload(env, enabled: bool) -> None:
    import yaml
    before = _genl(env)["config_updates"]
    cfg = env.agent.cfg
    cfg["guard_points"][0]["enabled"] = enabled
    env.agent.config_path.write_text(yaml.safe_dump(cfg))
    env.agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _genl(env)["config_updates"] <= before:
        time.sleep(0.5)
    assert _genl(env)["config_updates"] > before, _genl(env)


def test_keys_withdrawn_and_given_back(env):
    """A reload that disables the mount's guard point (gp=1) wipes its keys: files whose
    pages are not cached fail with EIO, new files cannot be made; enabled again, all reads."""
    (env.kmnt / "w").write_bytes(b"keep me" * 1000)
    drop_caches()
    _reload(env, False)
    time.sleep(1)   # the inodes' file keys go in a work item
    with pytest.raises(OSError) as e:
        (env.kmnt / "w").read_bytes()
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        (env.kmnt / "w-new").write_bytes(b"x")
    assert e.value.errno == errno.EIO
    assert not (env.lower / "w-new").exists()
    _reload(env, True)
    assert (env.kmnt / "w").read_bytes() == b"keep me" * 1000


# ---- times, new files, sizes after eviction ----------------------------------------------

def test_times_move_at_write_not_at_write_back(env):
    """mtime/ctime move when the application writes (as on ext4), never when write-back
    stores the blocks later: tar's utimensat after its writes must stick."""
    p = env.kmnt / "times"
    p.write_bytes(os.urandom(5000))
    os.utime(p, (1_000_000_000, 1_000_000_000))
    os.sync()
    drop_caches()
    assert os.stat(p).st_mtime == 1_000_000_000
    assert os.stat(env.lower / "times").st_mtime == 1_000_000_000
    # a write moves it at once, before any write-back
    before = time.time() - 1
    with open(p, "r+b") as f:
        f.write(b"w")
        f.flush()
        assert os.stat(p).st_mtime >= before
        assert os.stat(env.lower / "times").st_mtime >= before
    # a shared-mmap store moves it too
    os.utime(p, (1_000_000_000, 1_000_000_000))
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[10:20] = b"m" * 10
        m.flush()
        m.close()
    assert os.stat(p).st_mtime >= before
    # tar keeps the archive's times
    src = env.base / "tsrc"
    src.mkdir(exist_ok=True)
    (src / "a").write_bytes(os.urandom(9000))
    os.utime(src / "a", (1_200_000_000, 1_200_000_000))
    tarball = env.base / "t.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(tarball), "a"], check=True)
    dst = env.kmnt / "tdst"
    dst.mkdir()
    subprocess.run(["tar", "-C", str(dst), "-xf", str(tarball)], check=True)
    os.sync()
    drop_caches()
    assert os.stat(dst / "a").st_mtime == 1_200_000_000
    assert (dst / "a").read_bytes() == (src / "a").read_bytes()


def test_new_files_are_taka_files_once_closed_or_stored(env):
    """A new file's header comes with its first write-back (one lower write with the
    blocks), or at its last close if it stays empty: either way the stored file is a
    whole TAKA file that the other engines read."""
    e = env.kmnt / "new-empty"
    os.close(os.open(e, os.O_CREAT | os.O_WRONLY, 0o644))
    assert (env.lower / "new-empty").stat().st_size == HDR
    assert env.decrypt(env.lower / "new-empty") == b""
    for n in (1, 3000, 3940, 3941, 4096, 9000, 70000):
        p = env.kmnt / f"new{n}"
        data = os.urandom(n)
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            assert (env.lower / f"new{n}").stat().st_size == stored_len(n), n
        assert env.decrypt(env.lower / f"new{n}") == data, n
        assert (env.fmnt / f"new{n}").read_bytes() == data, n
    # written, then cut to nothing before any write-back
    p = env.kmnt / "new-cut"
    with open(p, "wb") as f:
        f.write(b"x" * 5000)
        f.truncate(0)
    os.sync()
    assert env.decrypt(env.lower / "new-cut") == b""
    # a sparse first write: the header goes out before the far blocks
    p = env.kmnt / "new-far"
    with open(p, "wb") as f:
        f.seek(10 * BS + 7)
        f.write(b"far")
    os.sync()
    assert env.decrypt(env.lower / "new-far") == bytes(10 * BS + 7) + b"far"


def test_sizes_after_eviction_follow_the_lower_file(env):
    """A cold stat may take a size remembered when the inode was evicted, but only while
    the lower file is unchanged: a write by the FUSE engine, a tampered header or a
    replaced file always shows what the lower file now says."""
    k = env.kmnt / "ev"
    k.mkdir()
    for i in range(20):
        (k / f"f{i}").write_bytes(os.urandom(1000 + 300 * i))
    os.sync()
    drop_caches()
    assert [os.stat(k / f"f{i}").st_size for i in range(20)] == [1000 + 300 * i for i in range(20)]
    drop_caches()
    # changed by the other engine while the kernel mount had forgotten it
    (env.fmnt / "ev" / "f1").write_bytes(b"short")
    with open(env.fmnt / "ev" / "f2", "ab") as f:
        f.write(b"x" * 10000)
    # replaced by another file (a new inode, maybe the old number)
    (env.fmnt / "ev" / "f3").unlink()
    (env.fmnt / "ev" / "f3").write_bytes(b"new")
    drop_caches()
    assert os.stat(k / "f1").st_size == 5
    assert os.stat(k / "f2").st_size == 1600 + 10000
    assert os.stat(k / "f3").st_size == 3
    assert (k / "f2").read_bytes()[-10000:] == b"x" * 10000
    # a forged size in the header: never the remembered size, and no bytes
    drop_caches()
    lower = env.lower / "ev" / "f4"
    stored = bytearray(lower.read_bytes())
    stored[96] ^= 0x40
    lower.write_bytes(stored)
    drop_caches()
    assert os.stat(k / "f4").st_size == len(stored)      # no plaintext size known
    with pytest.raises(OSError) as ei:
        (k / "f4").read_bytes()
    assert ei.value.errno == errno.EIO
