"""FORGETs and the last close of deleted objects (fuse_uring.c io_read, fuse_inode.c).

With every request on the io_uring queues, the classic /dev/fuse channel carries the
kernel's FORGETs: one per inode it drops, so one per unlinked file.  The engine reads
that channel with one thread at a time and at most every millisecond, so FORGETs queue
in the kernel and arrive as BATCH_FORGET messages; the O_PATH fds of the freed inodes
are closed after the inode table's lock is let go (the last close of a deleted file
frees it on disk).  These tests check that forgets are batched, that nothing is leaked
(the space of deleted files comes back), and that the data path stays right meanwhile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

MiB = 1 << 20


def _wait_for(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _uring_or_skip(g) -> None:
    if g.stats()["uring_threads"] == 0:
        pytest.skip("FUSE over io_uring is not available here: FORGETs are read with "
                    "every other request")


def _unlink_many(g, n: int) -> dict:
    d = g.mnt / "many"
    d.mkdir()
    for i in range(n):
        (d / f"f{i}").write_bytes(b"x")
    base = g.stats()
    t0 = time.monotonic()
    for i in range(n):
        os.unlink(d / f"f{i}")
    assert _wait_for(lambda: g.stats()["forgets"] - base["forgets"] >= n), \
        "the kernel's forgets of the unlinked files did not all arrive"
    elapsed_ms = (time.monotonic() - t0) * 1000
    after = g.stats()
    got = {k: after[k] - base[k] for k in ("forgets", "forget_messages")}
    got["elapsed_ms"] = round(elapsed_ms, 1)
    return got


def test_forgets_of_unlinked_files_arrive_in_batches(wtmp):
    with guard_mount(wtmp) as g:
        _uring_or_skip(g)
        got = _unlink_many(g, 2000)
        # The gate: one read of the channel per millisecond at most (plus the one that
        # opens each gap), however fast the forgets come.  Read as they come, nearly
        # every forget is a message of its own: 2,000 unlinks take ~0.1-0.3 s here, so
        # that would be ~2,000 messages against a bound of a few hundred.  (Unlinks
        # slowed past 1 ms each by a loaded machine leave nothing to batch: the bound
        # still holds, the ratio below then does not have to.)
        assert got["forget_messages"] <= got["elapsed_ms"] + 50, got
        if got["elapsed_ms"] * 8 < got["forgets"]:
            assert got["forget_messages"] * 4 <= got["forgets"], got


def test_ungated_channel_reads_forgets_one_by_one(wtmp, monkeypatch):
    """The A/B knob benchmarks/rmrf.sh uses: with the gate off the same unlinks cost
    (nearly) a message each -- which is what the batching test above rules out."""
    monkeypatch.setenv("TAKAKRYPT_CLASSIC_GATE_US", "0")
    with guard_mount(wtmp) as g:
        _uring_or_skip(g)
        got = _unlink_many(g, 500)
        assert got["forget_messages"] * 4 > got["forgets"], got


def test_space_of_deleted_files_comes_back(wtmp):
    """Each freed inode's fd is closed (after the lock): the blocks are freed on disk."""
    with guard_mount(wtmp) as g:
        for i in range(4):
            (g.mnt / f"big{i}").write_bytes(os.urandom(16 * MiB))
        os.sync()
        free0 = os.statvfs(g.backing).f_bavail
        frsize = os.statvfs(g.backing).f_frsize
        for i in range(4):
            os.unlink(g.mnt / f"big{i}")
        assert _wait_for(lambda: (os.statvfs(g.backing).f_bavail - free0) * frsize
                         >= 48 * MiB), "deleted files still hold their blocks"
        assert not list(Path(g.backing).iterdir())


def test_lookups_and_io_stay_right_while_forgets_are_batched(wtmp):
    """Create, delete and recreate the same names: a batched forget of an old inode
    must never drop the new one that took its name (or its inode number)."""
    with guard_mount(wtmp) as g:
        d = g.mnt / "d"
        d.mkdir()
        for rnd in range(5):
            for i in range(300):
                (d / f"f{i}").write_bytes(f"{rnd}:{i}".encode() * 50)
            for i in range(300):
                assert (d / f"f{i}").read_bytes() == f"{rnd}:{i}".encode() * 50
            for i in range(0, 300, 2):
                os.unlink(d / f"f{i}")
        for i in range(1, 300, 2):
            assert (d / f"f{i}").read_bytes() == f"4:{i}".encode() * 50
        assert sorted(p.name for p in d.iterdir()) == sorted(f"f{i}" for i in range(1, 300, 2))
