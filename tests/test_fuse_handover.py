"""A guard point outlives its server process: the FUSE connection, the inode and
handle tables and (FUSE over io_uring) the ring entries go to a successor, and nothing
the applications hold notices (docs/guard-points.md, "Restarts without unmounting").

Each test runs on both channels: the classic /dev/fuse channel and FUSE over io_uring
(where the kernel offers it; the ring tests then check that the ring was really used).
"""

from __future__ import annotations

import os
import random
import threading
import traceback
from pathlib import Path

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

CHANNELS = [pytest.param(False, id="classic"), pytest.param(True, id="io_uring")]


def _mount_dev(path: Path) -> str | None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from takakrypt.guard import mount_device
    return mount_device(str(path))


@pytest.mark.parametrize("io_uring", CHANNELS)
def test_open_files_survive_a_handover(tmp_path, io_uring):
    with guard_mount(tmp_path, io_uring=io_uring) as g:
        data = os.urandom(300_000)
        (g.mnt / "d").mkdir()
        (g.mnt / "d" / "a").write_bytes(data)
        dev = _mount_dev(g.mnt)
        rfd = os.open(g.mnt / "d" / "a", os.O_RDONLY)
        wfd = os.open(g.mnt / "d" / "b", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(wfd, b"before ")
        dfd = os.open(g.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        cwd = os.getcwd()
        os.chdir(g.mnt / "d")
        try:
            first = g.server_pid()
            second = g.handover()
            assert second != first
            # the same mount, now served by the successor
            assert _mount_dev(g.mnt) == dev
            assert os.pread(rfd, len(data), 0) == data
            os.write(wfd, b"after")
            os.fsync(wfd)
            assert sorted(os.listdir(dfd)) == ["a", "b"]
            assert Path("a").read_bytes() == data  # relative to a cwd held across it
            os.close(wfd)
            assert (g.mnt / "d" / "b").read_bytes() == b"before after"
            # new files and a second handover
            (g.mnt / "d" / "c").write_bytes(b"c" * 5000)
            third = g.handover()
            assert third not in (first, second)
            assert os.pread(rfd, 10, 1000) == data[1000:1010]
            assert (g.mnt / "d" / "c").read_bytes() == b"c" * 5000
            st = g.stats()
            assert st["handover_lost_handles"] == 0
            if io_uring and st["uring_threads"]:
                assert st["uring_requests"] > 0
        finally:
            os.chdir(cwd)
            os.close(rfd)
            os.close(dfd)
        # ciphertext at rest, as before
        assert data[:64] not in (g.backing / "d" / "a").read_bytes()


def _stream_through(g, event, times: int, *, pages: bool, held: int | None = None) -> None:
    """A writer streams records with fsync and a reader lists, stats (and reads the
    file ``held`` open) while ``event()`` happens ``times`` times: every call returns
    and succeeds, and every byte reads back.  ``pages``: records of whole 4 KiB
    blocks (as a database writes), else of any length."""
    stop = threading.Event()
    errors: list[tuple[BaseException, str]] = []
    written = bytearray()

    def writer() -> None:
        rng = random.Random(7)
        try:
            with open(g.mnt / "stream", "wb", buffering=0) as f:
                n = 0
                while not stop.is_set() or n < 50:
                    head = f"record {n} ".encode()
                    rec = (head.ljust(4096 * rng.randrange(1, 4), b".") if pages else
                           head + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 9000))))
                    f.write(rec)
                    os.fsync(f.fileno())
                    written.extend(rec)
                    n += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((e, traceback.format_exc()))

    def reader() -> None:
        try:
            while not stop.is_set():
                for name in os.listdir(g.mnt):
                    os.stat(g.mnt / name)
                if held is not None:
                    assert os.pread(held, 100, 1000) == b"h" * 100
        except BaseException as e:  # noqa: BLE001
            errors.append((e, traceback.format_exc()))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        for _ in range(times):
            event()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, "\n".join(t for _, t in errors)
    assert (g.mnt / "stream").read_bytes() == bytes(written)


@pytest.mark.parametrize("io_uring", CHANNELS)
def test_writer_with_fsync_across_handovers(tmp_path, io_uring):
    """A writer streams records with fsync while the server is replaced five times:
    every call succeeds and every byte read back is the written one."""
    with guard_mount(tmp_path, io_uring=io_uring) as g:
        _stream_through(g, g.handover, 5, pages=False)


def test_damaged_state_is_refused(tmp_path):
    """The state a successor reads is parsed like any input: truncations and flipped
    bytes give a clear error, never a crash nor a mount."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from takakrypt.guard import GuardError, GuardPoint

    with guard_mount(tmp_path, io_uring=False) as g:
        # a real state: hand over to a successor that refuses nothing, keep its bytes
        g.handover()
        state = next(g.workdir.glob("handover-*.state")).read_bytes()
    rng = random.Random(1)
    mnt = tmp_path / "other"
    mnt.mkdir()
    samples = [state[:n] for n in range(0, len(state), max(1, len(state) // 60))]
    for _ in range(300):
        b = bytearray(state)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        samples.append(bytes(b))
    for s in samples:
        gp = GuardPoint(mnt, key_name="guard", get_key=lambda n, v: b"k" * 32,
                        decide=lambda *a: (["deny"], 0, 0, 1.0))
        with pytest.raises(GuardError):
            gp.resume([], s)  # no fds: whatever decodes, nothing can be taken over
        assert not gp.is_mounted


# how a successor gets back the requests a killed server had read: the kernel re-sends
# them (FUSE_NOTIFY_RESEND, Linux 6.9+), or -- older kernels, as Debian 12's 6.1 -- it
# serves again what the server's request journal holds
RECOVERY = [pytest.param(False, id="resend"), pytest.param(True, id="journal")]


def _recovery(monkeypatch, journal: bool) -> None:
    if journal:
        monkeypatch.setenv("TAKAKRYPT_TEST_NO_RESEND", "1")


@pytest.mark.parametrize("journal", RECOVERY)
def test_writer_with_fsync_across_kills(tmp_path, monkeypatch, journal):
    """A watchdog's restart: the server is SIGKILLed five times while a writer streams
    with fsync and a reader lists and stats; a successor takes the connection over
    from the fds kept outside the server (the test's "file descriptor store") -- no
    call fails, no byte differs, the path is never uncovered.  Records are whole
    4 KiB blocks, as a database writes pages: a kill in the middle of an unaligned
    write can leave its partial block unreadable (docs/guard-points.md, "After a
    kill").  The classic channel: on FUSE over io_uring a request handed to a ring
    entry as the server dies is lost by the kernel (test below)."""
    _recovery(monkeypatch, journal)
    with guard_mount(tmp_path, io_uring=False, keeper=True) as g:
        (g.mnt / "held").write_bytes(b"h" * 70000)
        held = os.open(g.mnt / "held", os.O_RDONLY)
        _stream_through(g, g.kill_and_resume, 5, pages=True, held=held)
        assert os.pread(held, 70000, 0) == b"h" * 70000
        os.close(held)
        assert g.stats()["handover_lost_handles"] == 0


def _die_at(g, monkeypatch, when: str, opcode: int, call) -> threading.Thread:
    """Run ``call`` in a thread; the server kills itself at ``when`` ("read": just
    after reading the request of ``opcode``, "reply": just before writing its reply);
    wait for the death, start the successor.  Returns the (finished) thread."""
    import time
    from fuse_helpers import _alive
    pid = g.server_pid()
    t = threading.Thread(target=call)
    t.start()
    for _ in range(3000):  # a wait for the server's death, not a timed assertion
        if not _alive(pid):
            break
        time.sleep(0.01)
    assert not _alive(pid), "the server did not die at the test's kill point"
    assert t.is_alive(), "the call returned although its server died before the reply"
    g.kill_and_resume()
    t.join(60)
    assert not t.is_alive(), "the request was lost: the call never returned"
    return t


@pytest.mark.parametrize("journal", RECOVERY)
@pytest.mark.parametrize("when", ["read", "reply"])
def test_killed_at_each_journal_state(tmp_path, monkeypatch, journal, when):
    """A kill at the two instants the journal must cover (sh_jslot, fuse_shadow.c):
    just after a request was read (a thread killed on its way back from read(2) runs
    nothing of ours: the successor must find the request in the slot) and just before
    its reply is written (the operation is done: the successor must send the saved
    reply, not do it again -- a second mkdir would answer EEXIST).  Every call returns
    what it would have without the kill."""
    _recovery(monkeypatch, journal)
    # FUSE_MKDIR; the marker file makes it the first server's death only
    monkeypatch.setenv("TAKAKRYPT_TEST_KILL_AT", f"{when}:9:{tmp_path / 'killed'}")
    with guard_mount(tmp_path, io_uring=False, keeper=True) as g:
        (g.mnt / "f").write_bytes(b"x" * 10000)
        result: list = []

        def mkdir() -> None:
            try:
                os.mkdir(g.mnt / "dir")
                result.append("ok")
            except OSError as e:
                result.append(e)

        _die_at(g, monkeypatch, when, 9, mkdir)
        assert result == ["ok"]
        assert (g.mnt / "dir").is_dir() and (g.backing / "dir").is_dir()
        assert (g.mnt / "f").read_bytes() == b"x" * 10000
        st = g.stats()
        # the saved reply is sent again, else the journal's request served again (or,
        # 6.9+, re-sent by the kernel)
        assert st["handover_replayed"] >= (1 if journal or when == "reply" else 0)
        assert st["handover_replayed"] + st["handover_resent"] >= 1
        # the successor's own readers journal too: a second kill, any request
        (g.mnt / "dir" / "g").write_bytes(b"g" * 5000)
        g.kill_and_resume()
        assert (g.mnt / "dir" / "g").read_bytes() == b"g" * 5000


def test_io_uring_successor_serves_after_a_kill(tmp_path):
    """FUSE over io_uring: after a SIGKILL the successor takes the ring over (the
    entries' buffers stay mapped at their address) and serves, with open files."""
    with guard_mount(tmp_path, io_uring=True, keeper=True) as g:
        (g.mnt / "a").write_bytes(b"a" * 100000)
        fd = os.open(g.mnt / "a", os.O_RDWR)
        expected = bytearray(b"a" * 100000)
        for i in range(3):
            g.kill_and_resume()
            assert os.pread(fd, 100000, 0) == expected
            os.pwrite(fd, b"b" * 10, 5000 + 20 * i)
            expected[5000 + 20 * i:5010 + 20 * i] = b"b" * 10
            os.fsync(fd)
            (g.mnt / "new").write_bytes(b"n" * 3000)
            assert (g.mnt / "new").read_bytes() == b"n" * 3000
        os.close(fd)
        assert (g.mnt / "a").read_bytes() == expected
        st = g.stats()
        if st["uring_threads"]:
            assert st["uring_requests"] > 0


@pytest.mark.parametrize("kill", [False, True], ids=["handover", "kill"])
def test_without_file_handles(tmp_path, monkeypatch, kill):
    """A backing file system without usable file handles (no export support): every
    inode is pinned on an O_PATH fd, which is never passed on (systemd's fd store
    refuses them); the successor finds each again by its name under its parent."""
    monkeypatch.setenv("TAKAKRYPT_TEST_NO_HANDLES", "1")
    with guard_mount(tmp_path, io_uring=False, keeper=kill) as g:
        (g.mnt / "d" / "e").mkdir(parents=True)
        (g.mnt / "d" / "e" / "f").write_bytes(b"f" * 50000)
        fd = os.open(g.mnt / "d" / "e" / "f", os.O_RDWR)
        dfd = os.open(g.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        (g.kill_and_resume if kill else g.handover)()
        assert os.pread(fd, 50000, 0) == b"f" * 50000
        os.pwrite(fd, b"g" * 10, 100)
        assert os.listdir(dfd) == ["e"]
        assert os.stat(g.mnt / "d" / "e" / "f").st_size == 50000
        assert (g.mnt / "d" / "e" / "f").read_bytes()[95:115] == b"f" * 5 + b"g" * 10 + b"f" * 5
        os.close(fd)
        os.close(dfd)
