"""Live rekey of files of a mounted guard point (GuardPoint.rekey_file; fuse_rekey.c;
docs/guard-points.md, "Live rekey (data path)").

The guard point is served by a child process (tests/rekey_helpers.py) with the keys of
a local keystore that the tests rotate; the rekey runs in that server, asked over a
socket, while this process (the client) keeps the files open and uses them.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fuse_helpers import errno_of, fuse_skip_reason, run_as, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from rekey_helpers import header, key_lookup, make_keystore, rekey_mount, rotate  # noqa: E402
from takakrypt import format as fmt  # noqa: E402
from takakrypt import rekeyfile  # noqa: E402
from takakrypt.cryptofile import TakaFile  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
SIZES = [0, 1, 4095, 4096, 4097, MIB + 3]


@pytest.fixture(scope="session", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


@pytest.fixture
def keys(wtmp):
    return make_keystore(wtmp)


@pytest.fixture
def rg(wtmp, keys):
    with rekey_mount(wtmp, *keys) as g:
        yield g


def plain_of(path: Path, keys) -> bytes:
    with TakaFile.open(str(path), key_lookup(keys)) as f:
        return f.read(0, f.size)


def cli_decrypt(paths: list[Path], keys) -> list[bytes]:
    """`takakrypt decrypt FILE -` of each file (in parallel), as an operator would."""
    env = dict(os.environ, TAKAKRYPT_KEYSTORE=str(keys[0]),
               TAKAKRYPT_MASTER_KEY_FILE=str(keys[1]))
    env.pop("TAKAKRYPT_PASSPHRASE", None)
    env.pop("TAKAKRYPT_PASSPHRASE_FILE", None)
    procs = [subprocess.Popen([sys.executable, "-m", "takakrypt", "decrypt", "-q", str(p), "-"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for p in paths]
    out = []
    for p in procs:
        data, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        out.append(data)
    return out


def temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(rekeyfile.HIDDEN_PREFIX)
                  and n != ".takakrypt-rekey.state")


def stored_holes(path: Path) -> list[int]:
    """Indices of the blocks stored as holes (all zero)."""
    h = header(path)
    data = path.read_bytes()
    out = []
    for i in range(h.nblocks):
        off = h.block_offset(i)
        n = min(h.stored_block_size, len(data) - off)
        if data[off:off + n] == bytes(n):
            out.append(i)
    return out


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# files of every shape


def test_rekey_sizes_and_metadata(wtmp, keys):
    files = {f"s{n}": os.urandom(n) for n in SIZES}
    with rekey_mount(wtmp, *keys) as g:
        (g.mnt / "sub").mkdir()
        for name, data in files.items():
            write_file(g.mnt / "sub" / name, data)
        # a sparse file: holes between and after written blocks
        with open(g.mnt / "sub" / "sparse", "wb") as f:
            f.write(b"a" * 4096)
            f.seek(10 * 4096 + 100)
            f.write(b"b" * 5000)
            f.truncate(40 * 4096 + 5)
        files["sparse"] = (g.mnt / "sub" / "sparse").read_bytes()
        # metadata that must survive: mode (with setgid), owner, xattrs, times
        for i, name in enumerate(files):
            p = g.mnt / "sub" / name
            os.chmod(p, 0o2640 if i % 2 else 0o600)
            os.chown(p, 1000 + i, 2000 + i)
            os.setxattr(p, "user.tag", f"v{i}".encode())
            os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i))
        hdr = {n: header(g.backing / "sub" / n) for n in files}
        holes = stored_holes(g.backing / "sub" / "sparse")
        assert holes, "the sparse file has no stored holes"
        # (after the reads above: a read moves the access time)
        before = {n: os.stat(g.backing / "sub" / n) for n in files}
        new = rotate(keys)
        # the engine names the current version as new files get it: after a reload
        assert g.rekey("sub/s1") == ("current", 0)
        g.bump()
        for name in files:
            outcome, n = g.rekey(f"sub/{name}")
            assert outcome == "done", name
            assert n >= fmt.HEADER_SIZE
        after = {n: os.stat(g.backing / "sub" / n) for n in files}
        for name, data in files.items():
            b = g.backing / "sub" / name
            h = header(b)
            assert h.key_version == new and hdr[name].key_version == 1
            assert h.file_id != hdr[name].file_id
            assert h.block_size == hdr[name].block_size
            assert h.plaintext_size == len(data)
            assert os.path.getsize(b) == fmt.stored_size(len(data))
            assert (g.mnt / "sub" / name).read_bytes() == data
            assert plain_of(b, keys) == data
            st, old = after[name], before[name]
            assert st.st_ino != old.st_ino
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == \
                (stat.S_IMODE(old.st_mode), old.st_uid, old.st_gid)
            assert (st.st_mtime_ns, st.st_atime_ns) == (old.st_mtime_ns, old.st_atime_ns)
            assert os.getxattr(g.mnt / "sub" / name, "user.tag") == os.getxattr(b, "user.tag")
        assert stored_holes(g.backing / "sub" / "sparse") == holes
        for name in files:
            assert g.rekey(f"sub/{name}") == ("current", 0)
        assert temps(g.backing / "sub") == []
        assert g.stats()["rekey_files"] == len(files)
        names = list(files)
        decrypted = cli_decrypt([g.backing / "sub" / n for n in names], keys)
    assert dict(zip(names, decrypted)) == files


def test_in_place_guard_point(wtmp, keys):
    """The backing directory is under the mount: the rekey reaches it through the
    descriptor opened before mounting, and so does the cleaner (backing_fd)."""
    data = os.urandom(100 * KIB)
    with rekey_mount(wtmp, *keys, in_place=True) as g:
        (g.mnt / "a").mkdir()
        write_file(g.mnt / "a" / "f", data)
        v = rotate(keys)
        assert g.rekey("a/f", version=v)[0] == "done"
        assert (g.mnt / "a" / "f").read_bytes() == data
        assert sorted(os.listdir(g.mnt / "a")) == ["f"]
        assert g.leftovers() == 0
    h = header(wtmp / "data" / "a" / "f")
    assert h.key_version == v
    assert plain_of(wtmp / "data" / "a" / "f", keys) == data


def test_without_file_handles(wtmp, keys):
    """Inodes pinned on their fds (a file system without export support): the pinned
    fd is moved to the new file like a cached one."""
    data = os.urandom(50 * KIB)
    with rekey_mount(wtmp, *keys, env={"TAKAKRYPT_TEST_NO_HANDLES": "1"}) as g:
        write_file(g.mnt / "f", data)
        fd = os.open(g.mnt / "f", os.O_RDWR | os.O_DIRECT)
        v = rotate(keys)
        assert g.rekey("f", version=v)[0] == "done"
        os.pwrite(fd, b"new", 10)
        assert os.pread(fd, len(data), 0) == data[:10] + b"new" + data[13:]
        os.close(fd)
        assert g.stats()["fds_pinned"] > 1
        assert plain_of(g.backing / "f", keys) == data[:10] + b"new" + data[13:]
        assert header(g.backing / "f").key_version == v


def test_explicit_version_and_skips(rg, keys):
    write_file(rg.mnt / "f", b"x" * 10000)
    v2 = rotate(keys)
    v3 = rotate(keys)
    assert rg.rekey("f", version=v2)[0] == "done"
    assert header(rg.backing / "f").key_version == v2
    assert rg.rekey("f", version=v2) == ("current", 0)
    assert rg.rekey("f", version=1) == ("current", 0)  # never back to an older version
    assert rg.rekey("f", version=v3)[0] == "done"
    assert header(rg.backing / "f").key_version == v3
    assert (rg.mnt / "f").read_bytes() == b"x" * 10000
    # hard links, directories, symlinks: skipped; errors name the file
    write_file(rg.mnt / "h", b"linked")
    os.link(rg.mnt / "h", rg.mnt / "h2")
    rotate(keys)
    rg.bump()
    assert rg.rekey("h") == ("skipped-hardlink", 0)
    assert header(rg.backing / "h").key_version == 1
    (rg.mnt / "d").mkdir()
    os.symlink("f", rg.mnt / "l")
    assert rg.rekey("d") == ("skipped-not-regular", 0)
    assert rg.rekey("l") == ("skipped-not-regular", 0)
    with pytest.raises(OSError) as ei:
        rg.rekey("missing")
    assert ei.value.errno == errno.ENOENT
    for bad in ("/f", "../f", "d/../f", "./f", "d//f", "", ".takakrypt-rekey.tmp.x"):
        with pytest.raises(OSError) as ei:
            rg.rekey(bad)
        assert ei.value.errno == errno.EINVAL, bad
    assert temps(rg.backing) == []


def test_tampered_block_is_reported_and_left_alone(rg, keys):
    write_file(rg.mnt / "t", os.urandom(20000))
    b = rg.backing / "t"
    good = b.read_bytes()
    raw = bytearray(good)
    raw[fmt.HEADER_SIZE + 4124 + 50] ^= 0x40  # a ciphertext byte of block 1
    b.write_bytes(raw)
    rotate(keys)
    rg.bump()
    with pytest.raises(OSError) as ei:
        rg.rekey("t")
    assert ei.value.errno == errno.EIO
    assert "block 1" in str(ei.value)
    assert b.read_bytes() == raw and header(b).key_version == 1
    assert temps(rg.backing) == []
    ev = [e for e in rg.audit_events() if e["kind"] == "integrity"]
    assert ev and ev[-1]["path"] == "t" and ev[-1]["action"] == "rekey"
    # a header that does not verify (read afresh: the engine's state dropped): EIO too
    raw = bytearray(good)
    raw[100] ^= 1
    b.write_bytes(raw)
    rg.invalidate()
    with pytest.raises(OSError) as ei:
        rg.rekey("t")
    assert ei.value.errno == errno.EIO and "header" in str(ei.value)
    assert b.read_bytes() == raw and temps(rg.backing) == []


def test_temporaries_are_invisible(rg, keys):
    tmpname = ".takakrypt-rekey.tmp.0123456789abcdef"
    (rg.backing / tmpname).write_bytes(b"left over")
    (rg.backing / ".takakrypt-rekey.state").write_bytes(b"{}")
    (rg.backing / "d").mkdir()
    (rg.backing / "d" / ".takakrypt-rekey.tmp.fedcba9876543210").write_bytes(b"x")
    assert sorted(os.listdir(rg.mnt)) == ["d"]
    assert os.listdir(rg.mnt / "d") == []
    for name in (tmpname, ".takakrypt-rekey.state", ".takakrypt-rekey.other"):
        assert errno_of(os.stat, rg.mnt / name) == errno.ENOENT
        assert errno_of(os.open, rg.mnt / name, os.O_RDONLY) == errno.ENOENT
    new = rg.mnt / ".takakrypt-rekey.new"
    assert errno_of(os.open, new, os.O_WRONLY | os.O_CREAT) == errno.EPERM
    assert errno_of(os.mkdir, new) == errno.EPERM
    assert errno_of(os.symlink, "x", new) == errno.EPERM
    write_file(rg.mnt / "f", b"data")
    assert errno_of(os.rename, rg.mnt / "f", new) == errno.EPERM
    assert errno_of(os.link, rg.mnt / "f", new) == errno.EPERM
    # while a rekey copies (slowly), its temporary never shows
    write_file(rg.mnt / "big", os.urandom(256 * KIB))
    rotate(keys)
    rg.bump()
    call = rg.rekey_async("big", rate=512 * KIB, chunk_blocks=4)
    seen = set()
    while call.is_alive():
        seen.update(os.listdir(rg.mnt))
        time.sleep(0.01)
    assert call.result()[0] == "done"
    assert seen <= {"d", "f", "big"}
    # the cleaner removes the data path's temporaries only
    assert rg.leftovers() == 2
    assert sorted(os.listdir(rg.backing)) == [".takakrypt-rekey.state", "big", "d", "f"]
    assert rekeyfile.remove_leftovers(rg.backing) == 0


# ---------------------------------------------------------------------------------------
# files in use


def test_concurrent_io_during_rekey(wtmp, keys):
    """Threads with descriptors opened before the rekey write, read, truncate and
    append (direct I/O: every request reaches the engine) while a slow rekey copies
    block by block (writes behind its frontier are mirrored, shrinks move it back), and
    open, write, fsync and close it anew; nothing reads wrong or fails, and the writes
    through the old descriptors after the swap land in the new file."""
    rnd = random.Random(1234)
    ref = bytearray(rnd.randbytes(200 * KIB + 1234))
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = {"ops": 0}
    with rekey_mount(wtmp, *keys) as g:
        p = g.mnt / "db"
        write_file(p, bytes(ref))
        fds = [os.open(p, os.O_RDWR | os.O_DIRECT) for _ in range(4)]
        afd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_DIRECT)
        rfd = os.open(p, os.O_RDONLY)  # page cache: reads the kernel may keep

        def worker(seed: int, fd: int) -> None:
            r = random.Random(seed)
            try:
                while not stop.is_set():
                    op = r.random()
                    with lock:
                        size = len(ref)
                        if op < 0.40:
                            off = r.randrange(0, size + 8192)
                            data = r.randbytes(r.choice([1, 100, 4096, 5000, 20000]))
                            assert os.pwrite(fd, data, off) == len(data)
                            if off > len(ref):
                                ref.extend(bytes(off - len(ref)))
                            ref[off:off + len(data)] = data
                        elif op < 0.80:
                            off = r.randrange(0, size + 100)
                            n = r.choice([1, 4096, 7000, 65536])
                            got = os.pread(fd if r.random() < 0.8 else rfd, n, off)
                            assert got == bytes(ref[off:off + n]), (off, n)
                        elif op < 0.87:
                            n = r.randrange(0, 300 * KIB) if size > 100 * KIB else size + 5000
                            os.ftruncate(fd, n)
                            del ref[n:]
                            ref.extend(bytes(n - len(ref)))
                        elif op < 0.92:  # a new open (and lookup) racing the swap
                            nfd = os.open(p, os.O_RDWR | os.O_DIRECT)
                            try:
                                off = r.randrange(0, size + 1)
                                assert os.pread(nfd, 9000, off) == bytes(ref[off:off + 9000])
                                data = r.randbytes(3000)
                                os.pwrite(nfd, data, off)
                                if off > len(ref):
                                    ref.extend(bytes(off - len(ref)))
                                ref[off:off + len(data)] = data
                                os.fsync(nfd)
                            finally:
                                os.close(nfd)
                        else:
                            data = r.randbytes(r.randrange(1, 9000))
                            assert os.write(afd, data) == len(data)
                            ref.extend(data)
                        counts["ops"] += 1
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=worker, args=(i, fd)) for i, fd in enumerate(fds)]
        v = rotate(keys)
        g.bump()
        for t in threads:
            t.start()
        # ~ 60 blocks at 4 KiB chunks of one block, at 200 KB/s: well over a second
        outcome, n = g.rekey("db", rate=200_000, chunk_blocks=1)
        ops_during = counts["ops"]
        time.sleep(0.3)  # more I/O through the same descriptors, on the new file
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert outcome == "done", outcome
        assert ops_during > 50
        # writes below the copy's frontier were mirrored into the copy by the writers
        assert g.stats()["rekey_bytes"] > n
        assert header(g.backing / "db").key_version == v
        # the old descriptors write into the new file
        os.pwrite(fds[0], b"after the swap", 3)
        ref[3:17] = b"after the swap"
        assert plain_of(g.backing / "db", keys) == bytes(ref)
        for fd in (*fds, afd, rfd):
            os.close(fd)
        assert temps(g.backing) == []
    with rekey_mount(wtmp, *keys) as g:  # cold: a new server, nothing cached
        assert (g.mnt / "db").read_bytes() == bytes(ref)


def test_opens_racing_swaps(wtmp, keys):
    """Small files swapped again and again (a new key version per pass) while threads
    open them by name (a lookup each time: no attribute or entry cache), read, write
    and close them: a lookup or open that meets a swap half way must end on the file's
    one inode and its current object (the first version created a second inode for
    the new object between the exchange and the repoint: reads then failed), and a
    lookup that opened the old object just before a swap must not make an inode of it
    (writes to it would be lost with it).  The server lingers 3 ms after each exchange
    and 8 ms in each lookup between opening the name and adding the inode, to widen
    those windows."""
    n = 12
    refs = {i: bytearray(os.urandom(6000 + 97 * i)) for i in range(n)}
    locks = {i: threading.Lock() for i in range(n)}
    stop = threading.Event()
    errors: list[BaseException] = []
    with rekey_mount(wtmp, *keys, metadata_cache=0.0,
                     env={"TAKAKRYPT_TEST_REKEY_SWAP_DELAY_MS": "3",
                          "TAKAKRYPT_TEST_LOOKUP_DELAY_US": "8000"}) as g:
        for i, data in refs.items():
            write_file(g.mnt / f"f{i}", bytes(data))

        def worker(seed: int) -> None:
            r = random.Random(seed)
            try:
                while not stop.is_set():
                    i = r.randrange(n)
                    with locks[i]:
                        fd = os.open(g.mnt / f"f{i}", os.O_RDWR)
                        try:
                            assert os.pread(fd, 1 << 16, 0) == bytes(refs[i]), i
                            off = r.randrange(0, len(refs[i]))
                            data = r.randbytes(100)
                            os.pwrite(fd, data, off)
                            refs[i][off:off + 100] = data
                        finally:
                            os.close(fd)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()

        def lister() -> None:  # readdirplus hands out entries (and inodes) too
            try:
                while not stop.is_set():
                    assert len(os.listdir(g.mnt)) == n
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        threads += [threading.Thread(target=lister) for _ in range(2)]
        for t in threads:
            t.start()
        swaps = 0
        end = time.monotonic() + 3
        while time.monotonic() < end and not stop.is_set():
            v = rotate(keys)
            for i in range(n):
                assert g.rekey(f"f{i}", version=v)[0] == "done"
                swaps += 1
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert swaps >= 3 * n
        for i, data in refs.items():
            assert (g.mnt / f"f{i}").read_bytes() == bytes(data)
            assert plain_of(g.backing / f"f{i}", keys) == bytes(data)


def test_mmap_shared_writes_during_rekey(rg, keys):
    size = 512 * KIB
    p = rg.mnt / "m"
    write_file(p, os.urandom(size))
    fd = os.open(p, os.O_RDWR)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    rotate(keys)
    rg.bump()
    call = rg.rekey_async("m", rate=1_000_000, chunk_blocks=2)
    r = random.Random(7)
    stores = 0
    while call.is_alive():
        off = r.randrange(0, size - 64)
        m[off:off + 64] = r.randbytes(64)
        stores += 1
        if stores % 50 == 0:
            m.flush()
        time.sleep(0.0005)
    assert call.result()[0] == "done"
    m[0:8] = b"mapafter"  # the mapping writes into the new file
    m.flush()
    want = bytes(m)
    m.close()
    os.close(fd)
    assert stores > 100
    assert plain_of(rg.backing / "m", keys) == want
    assert (rg.mnt / "m").read_bytes() == want


def test_cancel_leaves_the_original(rg, keys):
    data = os.urandom(2 * MIB)
    write_file(rg.mnt / "c", data)
    before = (rg.backing / "c").read_bytes()
    rotate(keys)
    rg.bump()
    call = rg.rekey_async("c", rate=1_000_000, chunk_blocks=8)
    time.sleep(0.4)
    assert temps(rg.backing), "no temporary while copying"
    rg.cancel()
    assert call.result() == ("cancelled", 0)
    assert (rg.backing / "c").read_bytes() == before
    assert temps(rg.backing) == []
    assert rg.rekey("c") == ("cancelled", 0)  # until the flag is cleared
    rg.cancel(False)
    assert rg.rekey("c")[0] == "done"
    assert (rg.mnt / "c").read_bytes() == data


def test_rename_during_copy_is_busy(rg, keys):
    data = os.urandom(MIB)
    write_file(rg.mnt / "r", data)
    before = (rg.backing / "r").read_bytes()
    rotate(keys)
    rg.bump()
    call = rg.rekey_async("r", rate=2_000_000, chunk_blocks=8)
    time.sleep(0.2)
    os.rename(rg.mnt / "r", rg.mnt / "r2")
    assert call.result() == ("busy", 0)
    assert (rg.backing / "r2").read_bytes() == before
    assert temps(rg.backing) == []
    assert rg.rekey("r2")[0] == "done"
    assert (rg.mnt / "r2").read_bytes() == data
    # a name given to another file during the copy: the other file is left where it is
    write_file(rg.mnt / "s", data)
    rotate(keys)
    rg.bump()
    call = rg.rekey_async("s", rate=2_000_000, chunk_blocks=8)
    time.sleep(0.2)
    os.rename(rg.mnt / "s", rg.mnt / "s-old")
    write_file(rg.mnt / "s", b"another file")
    assert call.result() == ("busy", 0)
    assert (rg.mnt / "s").read_bytes() == b"another file"
    assert (rg.mnt / "s-old").read_bytes() == data
    assert temps(rg.backing) == []


def test_raw_writer_makes_it_busy(wtmp, keys):
    """A raw-view open for writing (a restore) during the copy: busy, untouched."""
    with rekey_mount(wtmp, *keys, env={"TK_TEST_RAW_UID": "65534"}) as g:
        data = os.urandom(MIB)
        write_file(g.mnt / "w", data)
        os.chmod(g.mnt / "w", 0o666)
        before = (g.backing / "w").read_bytes()
        rotate(keys)
        g.bump()
        call = g.rekey_async("w", rate=2_000_000, chunk_blocks=8)
        time.sleep(0.2)

        def raw_open(path):
            fd = os.open(path, os.O_WRONLY)
            os.close(fd)

        run_as(65534, 65534, raw_open, str(g.mnt / "w"))
        assert call.result() == ("busy", 0)
        assert (g.backing / "w").read_bytes() == before
        assert temps(g.backing) == []
        assert g.rekey("w")[0] == "done"
        assert (g.mnt / "w").read_bytes() == data


# ---------------------------------------------------------------------------------------
# crashes


KILL_POINTS = ["copy", "synced", "exchanged", "dir-synced"]


def test_sigkill_at_any_point_leaves_a_whole_file(wtmp, keys):
    """The serving process is killed (SIGKILL) during rekeys: at random times of a slow
    rekey and at each step of the swap.  The file then reads back, through a fresh
    guard point and with `takakrypt decrypt`, as its complete content (the old or the
    new file, never a mix, never an error), and the cleaner removes any temporary."""
    data = os.urandom(600 * KIB + 17)
    with rekey_mount(wtmp, *keys) as g:
        write_file(g.mnt / "k", data)
        (g.mnt / "dir").mkdir()
        write_file(g.mnt / "dir" / "k2", data[:5000])
    rnd = random.Random(99)
    rounds = [(p, None) for p in KILL_POINTS] + [(None, rnd.uniform(0.02, 0.8))
                                                 for _ in range(10)]
    outcomes = []
    for kill_at, delay in rounds:
        v = rotate(keys)
        env = {"TAKAKRYPT_TEST_REKEY_KILL_AT": kill_at} if kill_at else {}
        with rekey_mount(wtmp, *keys, env=env) as g:
            # a fresh guard point: the file whole, and no temporary left once cleaned
            assert (g.mnt / "k").read_bytes() == data
            assert (g.mnt / "dir" / "k2").read_bytes() == data[:5000]
            g.leftovers()
            assert temps(g.backing) == [] and temps(g.backing / "dir") == []
            g.bump()
            # ~ 620 KB at 1 MB/s: 0.6 s of copying, then the swap
            call = g.rekey_async("k", rate=1_000_000, chunk_blocks=4, version=v)
            g.rekey_async("dir/k2", rate=5_000, chunk_blocks=1, version=v)  # ~1 s
            if delay is not None:
                time.sleep(delay)
                g.proc.send_signal(signal.SIGKILL)
            g.proc.wait(timeout=30)
            try:
                outcomes.append(call.result(timeout=30)[0])
            except OSError:  # the server died before it answered
                outcomes.append("killed")
        # the backing files, read directly: whole, one version or the other
        for rel, want in (("k", data), ("dir/k2", data[:5000])):
            assert header(g.backing / rel).key_version <= v
            assert plain_of(g.backing / rel, keys) == want
        left = temps(g.backing) + temps(g.backing / "dir")
        if kill_at in ("exchanged", "dir-synced"):
            assert header(g.backing / "k").key_version == v and left
        if left:
            assert rekeyfile.remove_leftovers(g.backing) == len(left)
        assert temps(g.backing) == [] and temps(g.backing / "dir") == []
    assert cli_decrypt([wtmp / "backing" / "k", wtmp / "backing" / "dir" / "k2"], keys) \
        == [data, data[:5000]]
    with rekey_mount(wtmp, *keys) as g:
        assert (g.mnt / "k").read_bytes() == data
        assert g.rekey("k")[0] in ("done", "current")
        assert (g.mnt / "k").read_bytes() == data
    # the kill points were reached (the server died before answering)
    assert outcomes[:len(KILL_POINTS)] == ["killed"] * len(KILL_POINTS), outcomes


# ---------------------------------------------------------------------------------------
# the run over a guard point (agent/rekey.py's Rekey) on this data path


class _Data:
    """What agent/rekey.Rekey drives: this test's guard point server, with a hook that
    runs before each file is handed over (the changes an application makes meanwhile)."""

    def __init__(self, g, hook) -> None:
        self.g, self.hook, self.handed = g, hook, []

    def rekey_file(self, rel: str, *, version: int = 0, rate: int = 0) -> tuple[str, int]:
        self.hook(rel)
        self.handed.append(rel)
        return self.g.rekey(rel, version=version, rate=rate)

    def rekey_cancel(self, on: bool) -> None:
        self.g.cancel(on)

    def backing_fd(self) -> int:
        return os.open(self.g.backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _run_rekey(data: _Data, v: int, events: list) -> dict:
    from takakrypt.agent import rekey as R
    rk = R.Rekey(str(data.g.mnt), "guard", data, audit=lambda *a: events.append(a),
                 current_version=lambda _k: v)
    try:
        rk.start(0)
        deadline = time.monotonic() + 120
        while rk.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not rk.active, rk.status()
        return rk.status()
    finally:
        rk.close()


def test_run_rekeys_files_renamed_behind_the_walk(rg, keys):
    """The walk lists a directory once: a file renamed from a name it has not reached to
    one it has passed (as PostgreSQL recycles WAL segments), or into a directory already
    done, is never handed over by the walk.  The sweep after the walk finds it by its
    header and rekeys it: at the end no file is on the old version."""
    files = {"a": b"A" * 5000, "m": b"M" * 70000, "z": b"Z" * 9000, "w/seg1": b"1" * 8192,
             "w/seg2": b"2" * 8192, "y/late": b"L" * 3000}
    (rg.mnt / "w").mkdir()
    (rg.mnt / "y").mkdir()
    for rel, d in files.items():
        write_file(rg.mnt / rel, d)
    v = rotate(keys)
    rg.bump()
    moved = []

    def hook(rel: str) -> None:
        if rel == "m" and not moved:
            # z is listed but not reached: it becomes "b", a name already passed
            os.rename(rg.mnt / "z", rg.mnt / "b")
            moved.append("z")

    data = _Data(rg, hook)
    events: list = []
    st = _run_rekey(data, v, events)
    assert st["state"] == "done" and st["files_failed"] == 0, st
    assert data.handed[-1] == "b" and "z" not in data.handed, data.handed  # by the sweep
    assert st["files_swept"] == 1 and st["sweeps"] == 2 and st["phase"] == "sweep", st
    ref = dict(files)
    ref["b"] = ref.pop("z")
    for rel, want in ref.items():
        assert header(rg.backing / rel).key_version == v, rel
        assert (rg.mnt / rel).read_bytes() == want, rel
    kinds = [e[1] for e in events]
    assert kinds[0].startswith("rekey started") and kinds[-1].startswith("rekey finished")


def test_run_into_a_finished_directory_and_given_up_files(rg, keys):
    """A file moved into a directory the walk finished is swept too; a hard-linked file
    (never rekeyed) and a tampered one (cannot be) are reported once, not swept again."""
    (rg.mnt / "a").mkdir()
    (rg.mnt / "q").mkdir()
    files = {"a/1": b"x" * 4000, "q/late": b"y" * 6000, "h": b"h" * 100, "t": b"t" * 9000}
    for rel, d in files.items():
        write_file(rg.mnt / rel, d)
    os.link(rg.backing / "h", rg.backing / "h2")
    with open(rg.backing / "t", "r+b") as f:      # a flipped bit in block 0's ciphertext
        f.seek(header(rg.backing / "t").block_offset(0) + 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    rg.invalidate()
    v = rotate(keys)
    rg.bump()

    def hook(rel: str) -> None:
        if rel == "h":       # a/ is done, q/ is not listed yet
            os.rename(rg.mnt / "q" / "late", rg.mnt / "a" / "late")

    data = _Data(rg, hook)
    st = _run_rekey(data, v, [])
    assert st["state"] == "done", st
    assert data.handed.count("a/late") == 1 and st["files_swept"] == 1, (data.handed, st)
    assert data.handed.count("h") == 1 and data.handed.count("h2") == 1
    assert data.handed.count("t") == 1, data.handed
    assert st["files_skipped"] == 2 and st["files_failed"] == 1, st
    assert header(rg.backing / "a" / "late").key_version == v
    assert (rg.mnt / "a" / "late").read_bytes() == files["q/late"]
    assert header(rg.backing / "t").key_version < v


def test_run_restarted_while_running(rg, keys):
    """``rekey start --restart`` while a run is copying: the old run stops at its next
    chunk (never writes the state file again) and the new one finishes the job."""
    from takakrypt.agent import rekey as R
    big = random.Random(5).randbytes(3 * MIB)
    write_file(rg.mnt / "big", big)
    write_file(rg.mnt / "small", b"s" * 1000)
    v = rotate(keys)
    rg.bump()
    data = _Data(rg, lambda _rel: None)
    rk = R.Rekey(str(rg.mnt), "guard", data, audit=lambda *a: None,
                 current_version=lambda _k: v)
    try:
        rk.start(1_000_000)           # ~3 s for "big"
        time.sleep(0.7)
        assert rk.active and rk.status()["files_done"] == 0
        first = rk._thread
        rk.start(0, restart=True)
        assert not first.is_alive()
        deadline = time.monotonic() + 60
        while rk.active and time.monotonic() < deadline:
            time.sleep(0.05)
        st = rk.status()
    finally:
        rk.close()
    assert st["state"] == "done" and st["files_rekeyed"] == 2 and st["rate"] == 0, st
    with open(rg.backing / R.STATE_NAME, "rb") as f:
        on_disk = json.loads(f.read())
    assert on_disk["state"] == "done" and on_disk["started"] == st["started"]
    assert data.handed == ["big", "big", "small"], data.handed
    for rel in ("big", "small"):
        assert header(rg.backing / rel).key_version == v
    assert (rg.mnt / "big").read_bytes() == big
