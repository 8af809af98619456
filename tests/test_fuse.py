"""Guard point data path (takakrypt._fuse) on real mounts, as root.

The server runs in a child process (fuse_helpers.guard_mount); this process and its
forked children are the clients.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_helpers import (Guard, errno_of, fuse_skip_reason, guard_mount, run_as,
                          sweep_stale_mounts)

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from takakrypt import format as fmt  # noqa: E402
from takakrypt.cryptofile import TakaFile  # noqa: E402

NOBODY = 65534
PLAIN_ALL = [{"effects": ["permit", "apply_key"]}]


@pytest.fixture(scope="session", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


@pytest.fixture
def guard(wtmp):
    with guard_mount(wtmp) as g:
        yield g


def taka_plain(g: Guard, name: str) -> bytes:
    with TakaFile.open(str(g.backing / name), g.keys()) as f:
        return f.read(0, f.size)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# format cross-checks


SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 200_000]


def test_written_files_are_taka_and_python_decrypts_them(guard):
    for n in SIZES:
        data = os.urandom(n)
        write_file(guard.mnt / f"f{n}", data)
        assert (guard.mnt / f"f{n}").read_bytes() == data
        assert os.stat(guard.mnt / f"f{n}").st_size == n
        raw = (guard.backing / f"f{n}").read_bytes()
        assert raw[:4] == b"TAKA"
        assert len(raw) == fmt.stored_size(n)
        assert taka_plain(guard, f"f{n}") == data


def test_empty_file_is_header_only(guard):
    (guard.mnt / "empty").touch()
    raw = (guard.backing / "empty").read_bytes()
    assert len(raw) == fmt.HEADER_SIZE
    h = fmt.parse_header(raw)
    assert h.key_id == "guard" and h.key_version == 1 and h.plaintext_size == 0


def test_python_written_files_read_through_mount(guard):
    key = bytearray(guard.key)
    with TakaFile.create(str(guard.backing / "py"), "guard", 1, key) as f:
        f.write(0, b"a" * 5000)
        f.write(9000, b"tail")
        f.write(100, b"middle")
    expect = bytearray(b"a" * 5000 + bytes(4000) + b"tail")
    expect[100:106] = b"middle"
    assert (guard.mnt / "py").read_bytes() == bytes(expect)
    assert os.stat(guard.mnt / "py").st_size == len(expect)


def test_random_access_matches_reference(guard):
    import random
    rnd = random.Random(7)
    model = bytearray()
    fd = os.open(guard.mnt / "ra", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(60):
            op = rnd.random()
            if op < 0.6:
                off = rnd.randrange(0, 30000)
                data = os.urandom(rnd.randrange(1, 9000))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
            elif op < 0.8:
                size = rnd.randrange(0, 30000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                off, n = rnd.randrange(0, 32000), rnd.randrange(0, 10000)
                assert os.pread(fd, n, off) == bytes(model[off:off + n])
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert (guard.mnt / "ra").read_bytes() == bytes(model)
    assert taka_plain(guard, "ra") == bytes(model)
    assert (guard.backing / "ra").stat().st_size == fmt.stored_size(len(model))


def test_append_truncate_fallocate(guard):
    p = guard.mnt / "app"
    write_file(p, b"x" * 10)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"yy")
    os.pwrite(fd, b"zz", 0)  # O_APPEND: Linux appends whatever the offset
    os.close(fd)
    assert p.read_bytes() == b"x" * 10 + b"yyzz"
    os.truncate(p, 3)
    assert p.read_bytes() == b"xxx"
    os.truncate(p, 5000)
    assert p.read_bytes() == b"xxx" + bytes(4997)
    fd = os.open(p, os.O_RDWR)
    os.posix_fallocate(fd, 0, 10000)
    assert os.fstat(fd).st_size == 10000
    with pytest.raises(OSError) as e:
        fcntl_punch(fd)
    assert e.value.errno == errno.EOPNOTSUPP
    os.close(fd)
    assert p.read_bytes() == b"xxx" + bytes(9997)
    assert taka_plain(guard, "app") == b"xxx" + bytes(9997)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.read_bytes() == b""
    assert (guard.backing / "app").stat().st_size == fmt.HEADER_SIZE


def fcntl_punch(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    r = libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(0),
                       ctypes.c_long(4096))
    if r != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


# ---------------------------------------------------------------------------------------
# views and policy


def test_raw_view_returns_stored_bytes(wtmp):
    rules = [{"uid": 0, "effects": ["permit", "apply_key"]},
             {"uid": NOBODY, "effects": ["permit"]}]
    with guard_mount(wtmp, rules=rules) as g:
        os.chmod(g.mnt, 0o777)
        data = os.urandom(10_000)
        write_file(g.mnt / "f", data, 0o666)
        stored = (g.backing / "f").read_bytes()

        def raw_read(p):
            return os.stat(p).st_size, Path(p).read_bytes()

        size, got = run_as(NOBODY, NOBODY, raw_read, str(g.mnt / "f"))
        assert got == stored and size == len(stored)
        # root at the same moment still sees plaintext and its size
        assert (g.mnt / "f").read_bytes() == data
        assert os.stat(g.mnt / "f").st_size == len(data)

        # a restore: the raw caller writes ciphertext back under a new name
        def raw_write(p, b):
            write_file(Path(p), b, 0o666)

        run_as(NOBODY, NOBODY, raw_write, str(g.mnt / "restored"), stored)
        assert (g.backing / "restored").read_bytes() == stored
        # the restored file has the same file id, so it decrypts... under its own name
        # (the AAD binds the header, not the name)
        assert (g.mnt / "restored").read_bytes() == data
        # files created in the raw view are raw
        run_as(NOBODY, NOBODY, raw_write, str(g.mnt / "rawnew"), b"not taka")
        assert (g.backing / "rawnew").read_bytes() == b"not taka"


def _all_actions(mnt: str) -> dict[str, int]:
    m = Path(mnt)
    res = {}
    res["read"] = errno_of(lambda: (m / "f").read_bytes())
    res["write"] = errno_of(lambda: os.close(os.open(m / "f", os.O_WRONLY)))
    res["append"] = errno_of(lambda: os.close(os.open(m / "f", os.O_WRONLY | os.O_APPEND)))
    res["truncate"] = errno_of(os.truncate, m / "f", 0)
    res["create"] = errno_of(lambda: os.close(os.open(m / "new", os.O_CREAT | os.O_WRONLY)))
    res["delete"] = errno_of(os.unlink, m / "f")
    res["rename"] = errno_of(os.rename, m / "f", m / "g")
    res["link"] = errno_of(os.link, m / "f", m / "h")
    res["getattr"] = errno_of(os.stat, m / "f")
    res["setattr"] = errno_of(os.utime, m / "f")
    res["list"] = errno_of(os.listdir, m / "d")
    res["mkdir"] = errno_of(os.mkdir, m / "newdir")
    res["rmdir"] = errno_of(os.rmdir, m / "d")
    res["getxattr"] = errno_of(os.getxattr, m / "f", "user.x")
    res["setxattr"] = errno_of(os.setxattr, m / "f", "user.x", b"1")
    res["symlink"] = errno_of(os.symlink, "f", m / "sl")
    return res


def test_deny_gives_eacces_for_every_action(wtmp):
    rules = [{"uid": 0, "effects": ["permit", "apply_key"]},
             {"uid": NOBODY, "effects": ["deny"]}]
    with guard_mount(wtmp, rules=rules) as g:
        os.chmod(g.mnt, 0o777)
        write_file(g.mnt / "f", b"secret", 0o666)
        os.mkdir(g.mnt / "d", 0o777)
        res = run_as(NOBODY, NOBODY, _all_actions, str(g.mnt))
        assert res == {k: errno.EACCES for k in res}, res
        # nothing changed
        assert sorted(os.listdir(g.mnt)) == ["d", "f"]
        assert (g.mnt / "f").read_bytes() == b"secret"
        denied = [e for e in g.audit_events() if e["kind"] == "access" and e["uid"] == NOBODY]
        assert denied and all(e["effects"] & 2 for e in denied)  # deny bit
        assert g.stats()["denied"] >= len(denied)


def test_each_action_is_checked(wtmp):
    # nobody may look (getattr, list) but nothing else: every other action reaches its
    # own check and is denied there
    rules = [{"uid": 0, "effects": ["permit", "apply_key"]},
             {"uid": NOBODY, "actions": ["getattr", "list"], "effects": ["permit"]},
             {"uid": NOBODY, "effects": ["deny", "audit"]}]
    with guard_mount(wtmp, rules=rules) as g:
        os.chmod(g.mnt, 0o777)
        write_file(g.mnt / "f", b"secret", 0o666)
        os.chown(g.mnt / "f", NOBODY, NOBODY)  # protected_hardlinks: link needs the owner
        os.mkdir(g.mnt / "d", 0o777)
        res = run_as(NOBODY, NOBODY, _all_actions, str(g.mnt))
        assert res.pop("getattr") == 0 and res.pop("list") == 0
        assert res == {k: errno.EACCES for k in res}, res
        assert sorted(os.listdir(g.mnt)) == ["d", "f"]
        assert (g.mnt / "f").read_bytes() == b"secret"
        denied = {e["action"] for e in g.audit_events()
                  if e["kind"] == "access" and e["uid"] == NOBODY and e["effects"] & 2}
        assert denied >= {"read", "write", "append", "truncate", "create", "delete", "rename",
                          "link", "setattr", "mkdir", "rmdir", "getxattr", "setxattr"}, denied


def test_audit_effect_and_cache_hits(tmp_path):
    with guard_mount(tmp_path, rules=[{"effects": ["permit", "apply_key", "audit"]}]) as g:
        write_file(g.mnt / "f", b"x")
        for _ in range(3):
            assert (g.mnt / "f").read_bytes() == b"x"
        ev = [e for e in g.audit_events() if e["kind"] == "access" and e["path"] == "f"
              and e["action"] == "read"]
        assert len(ev) >= 3  # cache hits are audited too
        s = g.stats()
        assert s["cache_hits"] > 0 and s["cache_misses"] > 0
        assert s["ops"]["read"] >= 3 and s["ops"]["create"] >= 1
        assert s["bytes_encrypted"] >= 1 and s["bytes_decrypted"] >= 1


def test_decide_exception_denies(tmp_path):
    # an unknown effect name makes the helper's decide raise KeyError -> deny
    with guard_mount(tmp_path, rules=[{"effects": ["bogus"]}]) as g:
        assert errno_of(os.listdir, g.mnt) == errno.EACCES
        assert g.stats()["decide_errors"] >= 1


# ---------------------------------------------------------------------------------------
# fail closed


def test_tampered_block_is_eio_and_audited(guard):
    data = os.urandom(3 * 4096)
    write_file(guard.mnt / "t", data)
    raw = bytearray((guard.backing / "t").read_bytes())
    raw[fmt.HEADER_SIZE + (4096 + 28) + 100] ^= 1  # inside block 1
    (guard.backing / "t").write_bytes(bytes(raw))
    fd = os.open(guard.mnt / "t", os.O_RDONLY)
    try:
        # the pages the write left cached are the authentic plaintext; a tamper under a
        # live mount meets the disk once the kernel lets them go
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 4096, 0) == data[:4096]
        assert os.pread(fd, 4096, 8192) == data[8192:]
        with pytest.raises(OSError) as e:
            os.pread(fd, 10, 4096 + 5)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    ev = [e for e in guard.audit_events() if e["kind"] == "integrity"]
    assert ev and ev[0]["path"] == "t" and "block 1" in ev[0]["detail"]
    assert guard.stats()["integrity_failures"] >= 1


def test_non_taka_file_is_eio(guard):
    (guard.backing / "plain.txt").write_bytes(b"I am not encrypted at all" * 10)
    with pytest.raises(OSError) as e:
        (guard.mnt / "plain.txt").read_bytes()
    assert e.value.errno == errno.EIO
    # a forged header (right magic, wrong tag) as well
    raw = bytearray(taka_header_bytes(guard))
    raw[120] ^= 0xFF
    (guard.backing / "forged").write_bytes(bytes(raw))
    assert errno_of(lambda: (guard.mnt / "forged").read_bytes()) == errno.EIO
    kinds = [e["kind"] for e in guard.audit_events()]
    assert kinds.count("integrity") >= 2


def taka_header_bytes(g: Guard) -> bytes:
    write_file(g.mnt / "tmpl", b"hello")
    return (g.backing / "tmpl").read_bytes()


# ---------------------------------------------------------------------------------------
# in place, ownership


def test_in_place_mount_over_existing_taka_files(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key = os.urandom(32)
    with TakaFile.create(str(data_dir / "old"), "guard", 1, bytearray(key)) as f:
        f.write(0, b"existing plaintext")
    before = (data_dir / "old").read_bytes()
    with guard_mount(tmp_path, in_place=True, path=data_dir, key=key) as g:
        assert g.mnt == data_dir
        assert (data_dir / "old").read_bytes() == b"existing plaintext"
        (data_dir / "new").write_bytes(b"fresh")
        assert (data_dir / "new").read_bytes() == b"fresh"
    # unmounted: the directory holds ciphertext again
    assert (data_dir / "old").read_bytes() == before
    assert (data_dir / "new").read_bytes()[:4] == b"TAKA"
    with TakaFile.open(str(data_dir / "new"), lambda n, v: bytearray(key)) as f:
        assert f.read(0, 100) == b"fresh"


def test_objects_are_created_as_the_caller(guard):
    os.chmod(guard.mnt, 0o777)

    def make(m):
        m = Path(m)
        write_file(m / "file", b"abc", 0o640)
        os.mkdir(m / "dir", 0o750)
        os.symlink("file", m / "link")
        os.mkfifo(m / "fifo", 0o600)
        return (m / "file").read_bytes()

    assert run_as(NOBODY, NOBODY, make, str(guard.mnt)) == b"abc"
    for name in ("file", "dir", "link", "fifo"):
        st = os.lstat(guard.backing / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
        st2 = os.lstat(guard.mnt / name)
        assert (st2.st_uid, st2.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(guard.backing / "file").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(guard.backing / "dir").st_mode) == 0o750
    assert taka_plain(guard, "file") == b"abc"
    # root's own creations stay root's
    write_file(guard.mnt / "rootfile", b"r")
    assert os.stat(guard.backing / "rootfile").st_uid == 0


# ---------------------------------------------------------------------------------------
# concurrency


def _writer(path: str, wid: int, rounds: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for r in range(rounds):
            for i in range(wid, 64, 4):  # interleaved 1000-byte slots: shared blocks
                os.pwrite(fd, bytes([65 + wid]) * 1000, i * 1000)
            os.pread(fd, 64_000, 0)
    finally:
        os.close(fd)


def test_concurrent_writers_from_several_processes(guard):
    p = guard.mnt / "shared"
    write_file(p, bytes(64_000))
    pids = []
    for wid in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                _writer(str(p), wid, 15)
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    expect = b"".join(bytes([65 + (i % 4)]) * 1000 for i in range(64))
    assert p.read_bytes() == expect
    assert taka_plain(guard, "shared") == expect


def test_concurrent_appenders(guard):
    p = guard.mnt / "log"
    write_file(p, b"")
    pids = []
    for wid in range(3):
        pid = os.fork()
        if pid == 0:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            for _ in range(50):
                os.write(fd, bytes([97 + wid]) * 100)
            os.close(fd)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    data = p.read_bytes()
    assert len(data) == 3 * 50 * 100
    chunks = [data[i:i + 100] for i in range(0, len(data), 100)]
    assert all(len(set(c)) == 1 for c in chunks)  # no interleaving within a write
    assert sorted(c[0] for c in chunks) == sorted([97, 98, 99] * 50)


# ---------------------------------------------------------------------------------------
# what databases and tools need


def test_mmap_shared_writable_round_trip(guard):
    p = guard.mnt / "mm"
    write_file(p, b"\0" * 20000)
    fd = os.open(p, os.O_RDWR)
    with mmap.mmap(fd, 20000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[5000:5005] = b"hello"
        m[19990:20000] = b"0123456789"
        m.flush()
        assert m[5000:5005] == b"hello"
    os.close(fd)
    data = p.read_bytes()
    assert data[5000:5005] == b"hello" and data[19990:] == b"0123456789"
    assert taka_plain(guard, "mm") == data
    # read-only shared map of the plaintext
    fd = os.open(p, os.O_RDONLY)
    with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        assert m[5000:5005] == b"hello"
    os.close(fd)


def test_sparse_files_stay_sparse(guard):
    p = guard.mnt / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"start", 0)
    os.pwrite(fd, b"end", 64 * 1024 * 1024)
    os.close(fd)
    st = os.stat(guard.backing / "sparse")
    assert st.st_size == fmt.stored_size(64 * 1024 * 1024 + 3)
    assert st.st_blocks * 512 < 1024 * 1024  # a few blocks, not 64 MiB
    with open(p, "rb") as f:
        f.seek(32 * 1024 * 1024)
        assert f.read(4096) == bytes(4096)
        f.seek(64 * 1024 * 1024)
        assert f.read() == b"end"
    os.truncate(p, 128 * 1024 * 1024)  # truncate up: also a hole
    assert os.stat(guard.backing / "sparse").st_blocks * 512 < 1024 * 1024


def test_user_xattrs(guard):
    p = guard.mnt / "x"
    write_file(p, b"x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.size", b"big")
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.color", "user.size"]
    os.removexattr(p, "user.size")
    assert os.listxattr(p) == ["user.color"]
    assert os.getxattr(guard.backing / "x", "user.color") == b"blue"
    assert errno_of(os.setxattr, p, "trusted.x", b"1") == errno.EOPNOTSUPP
    assert errno_of(os.getxattr, p, "user.nope") == errno.ENODATA
    # other namespaces are not supported at all, and say so (tools then stop asking)
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        assert errno_of(os.getxattr, p, name) == errno.EOPNOTSUPP, name


def _try_locks(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDWR)
    try:
        fl = errno_of(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        px = errno_of(fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        return fl, px
    finally:
        os.close(fd)


def test_flock_and_fcntl_locks_between_processes(guard):
    p = guard.mnt / "lock"
    write_file(p, b"0" * 100)
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        fl, px = run_as(0, 0, _try_locks, str(p))  # another process
        assert fl == errno.EWOULDBLOCK and px in (errno.EAGAIN, errno.EACCES)
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert run_as(0, 0, _try_locks, str(p)) == (0, 0)
    finally:
        os.close(fd)


def test_statfs(guard):
    a, b = os.statvfs(guard.mnt), os.statvfs(guard.backing)
    assert (a.f_bsize, a.f_blocks, a.f_files) == (b.f_bsize, b.f_blocks, b.f_files)


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, bytes(src), AT_FDCWD, bytes(dst), flags) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def test_rename_over_existing_and_flags(guard):
    m = guard.mnt
    write_file(m / "a", b"AAA")
    write_file(m / "b", b"BBB")
    assert errno_of(_renameat2, m / "a", m / "b", 1) == errno.EEXIST  # NOREPLACE
    _renameat2(m / "a", m / "b", 2)  # EXCHANGE
    assert (m / "a").read_bytes() == b"BBB" and (m / "b").read_bytes() == b"AAA"
    os.rename(m / "a", m / "b")  # over an existing file
    assert sorted(os.listdir(m)) == ["b"]
    assert (m / "b").read_bytes() == b"BBB"
    os.mkdir(m / "d")
    os.rename(m / "b", m / "d" / "moved")
    assert (m / "d" / "moved").read_bytes() == b"BBB"
    assert taka_plain(guard, "d/moved") == b"BBB"


def test_hard_links_share_content(guard):
    m = guard.mnt
    write_file(m / "orig", b"one")
    os.link(m / "orig", m / "alias")
    assert os.stat(m / "orig").st_nlink == 2
    with open(m / "alias", "r+b") as f:
        f.write(b"two!")
    assert (m / "orig").read_bytes() == b"two!"
    os.unlink(m / "orig")
    assert (m / "alias").read_bytes() == b"two!"


def test_symlinks(guard):
    m = guard.mnt
    write_file(m / "target", b"t")
    os.symlink("target", m / "sl")
    assert os.readlink(m / "sl") == "target"
    assert (m / "sl").read_bytes() == b"t"
    assert os.readlink(guard.backing / "sl") == "target"


def test_chmod_chown_utimes(guard):
    p = guard.mnt / "meta"
    write_file(p, b"m")
    os.chmod(p, 0o600)
    os.chown(p, 123, 456)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(guard.backing / "meta")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (123, 456)
    assert st.st_mtime_ns == 2_000_000_000
    st2 = os.stat(p)
    assert st2.st_mtime_ns == 2_000_000_000 and st2.st_uid == 123


def test_fsync_and_fdatasync(guard):
    fd = os.open(guard.mnt / "s", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert taka_plain(guard, "s") == b"durable"


def test_large_directory(guard):
    d = guard.mnt / "big"
    d.mkdir()
    names = [f"entry-{i:05d}" for i in range(5000)]
    for n in names:
        os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(d / "subdir")
    listed = os.listdir(d)
    assert sorted(listed) == sorted(names + ["subdir"])
    with os.scandir(d) as it:
        kinds = {e.name: e.is_dir() for e in it}
    assert kinds["subdir"] and not kinds["entry-00000"]
    assert os.stat(d / "entry-04999").st_size == 0


# ---------------------------------------------------------------------------------------
# lifecycle


def test_stale_mount_cleanup_after_sigkill(tmp_path):
    from takakrypt.guard import cleanup_stale, fuse_mounts, is_stale
    with guard_mount(tmp_path) as g:
        write_file(g.mnt / "f", b"x")
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait()
        # fail closed, always: while a dead io_uring server's rings are torn down a
        # request may end ECANCELED or ECONNABORTED; then the mount reports ENOTCONN
        closed = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
        seen = [errno_of(os.stat, g.mnt / "f")]
        for _ in range(100):  # a wait for the teardown, not a timed assertion
            if seen[-1] == errno.ENOTCONN:
                break
            time.sleep(0.05)
            seen.append(errno_of(os.stat, g.mnt / "f"))
        assert all(e in closed for e in seen) and seen[-1] == errno.ENOTCONN, seen
        assert is_stale(str(g.mnt))
        assert cleanup_stale(str(g.mnt))
        assert str(g.mnt) not in fuse_mounts(str(g.mnt))
    # remount works over the cleaned path, and the data is intact
    with guard_mount(tmp_path, key=g.key) as g2:
        assert (g2.mnt / "f").read_bytes() == b"x"


def test_guard_cli_entry_point(tmp_path):
    keyf = tmp_path / "key"
    keyf.write_bytes(os.urandom(32))
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "takakrypt.guard", "--backing",
                             str(tmp_path / "b"), "--mountpoint", str(tmp_path / "m"),
                             "--key-file", str(keyf), "--allow-all"],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().startswith(b"mounted")
        (tmp_path / "m" / "f").write_bytes(b"cli")
        assert (tmp_path / "b" / "f").read_bytes()[:4] == b"TAKA"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not os.path.ismount(tmp_path / "m")
    assert (tmp_path / "m" / "f").exists() is False


def test_a_released_guard_point_never_unmounts_its_successor(tmp_path):
    # The mount is detached from outside (fusermount3 -u) while the server is stopped,
    # and a new guard point is mounted on the same path at once: the kernel hands the
    # new mount the same anonymous device number.  When the old server then notices
    # and releases its guard point it must not take the device number for its own
    # mount and detach the successor's.
    keyf = tmp_path / "key"
    keyf.write_bytes(os.urandom(32))
    keyf.chmod(0o600)
    back, mnt = tmp_path / "backing", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    old = subprocess.Popen([sys.executable, "-m", "takakrypt.guard", "--backing", str(back),
                            "--mountpoint", str(mnt), "--key-file", str(keyf),
                            "--allow-all"], stdout=subprocess.PIPE, env=env)
    try:
        assert old.stdout.readline().startswith(b"mounted")
        old_dev = os.stat(mnt).st_dev
        os.kill(old.pid, signal.SIGSTOP)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        with guard_mount(tmp_path) as g:
            assert g.mnt == mnt
            write_file(g.mnt / "f", b"successor")
            reused = os.stat(g.mnt).st_dev == old_dev
            os.kill(old.pid, signal.SIGCONT)
            assert old.wait(timeout=60) == 0  # it saw its mount go and released it
            assert os.path.ismount(g.mnt), f"successor unmounted (device reused: {reused})"
            assert (g.mnt / "f").read_bytes() == b"successor"
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
            old.kill()
            old.wait()
