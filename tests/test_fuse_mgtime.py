"""The engine's own stats of backing files do not ask for timestamps (tk_statx_fd).

On a file system with multigrain timestamps (ext4, xfs, btrfs, tmpfs since Linux 6.13)
a stat that reports ctime/mtime marks them as seen, and the file's next change then
stores a fine-grained time instead of the coarse one: the inode is dirtied by every
write, and an fsync of the backing file writes its inode block as well.  A write by a
caller without CAP_FSETID (a database server) makes the engine look at the file's mode
(to clear set-id bits, FUSE_HANDLE_KILLPRIV_V2); that look must not be a timestamp
query, or every commit's fdatasync pays an extra synchronous inode write
(benchmarks/wal_commit.py --user postgres).

Measured with the kernel's own ``timestamp:ctime_ns_xchg`` trace event (one per ctime
change of an inode), in a private trace instance, filtered on the backing file's inode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount, run_as

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "events/timestamp/ctime_ns_xchg"
NOBODY = 65534
WRITES = 1500


def _tracing_skip_reason() -> str | None:
    if not (TRACEFS / EVENT).is_dir():
        return ("no timestamp:ctime_ns_xchg trace event here (a kernel without multigrain "
                "timestamps, before 6.13, or tracefs not mounted)")
    return None


class _CtimeTrace:
    """ctime changes of one inode, counted in a trace instance of our own."""

    def __init__(self, ino: int) -> None:
        self.dir = TRACEFS / "instances" / f"tk-mgtime-{os.getpid()}"
        self.dir.mkdir()
        (self.dir / EVENT / "filter").write_text(f"ino == {ino}\n")

    def __enter__(self) -> _CtimeTrace:
        (self.dir / "trace").write_text("")
        (self.dir / EVENT / "enable").write_text("1\n")
        return self

    def __exit__(self, *exc) -> None:
        (self.dir / EVENT / "enable").write_text("0\n")

    def count(self) -> int:
        return sum(1 for line in (self.dir / "trace").read_text().splitlines()
                   if "ctime_ns_xchg:" in line)

    def close(self) -> None:
        self.dir.rmdir()


def _overwrite(path: str, n: int, stat_backing: str | None) -> float:
    """n 8 KiB overwrites of the same range (a WAL page rewritten); with stat_backing,
    a stat of the backing file after each (the control: a timestamp query each time)."""
    page = os.urandom(8192)
    fd = os.open(path, os.O_WRONLY)
    try:
        t0 = time.monotonic()
        for _ in range(n):
            os.pwrite(fd, page, 0)
            if stat_backing:
                os.stat(stat_backing)
        return time.monotonic() - t0
    finally:
        os.close(fd)


@pytest.mark.skipif(_tracing_skip_reason() is not None, reason=_tracing_skip_reason() or "")
def test_unprivileged_writes_keep_coarse_backing_timestamps(wtmp):
    with guard_mount(wtmp) as g:
        g.mnt.chmod(0o777)
        f = g.mnt / "wal"
        run_as(NOBODY, NOBODY, lambda: f.write_bytes(bytes(1 << 20)))
        back = g.backing / "wal"
        # the backing file is stat'ed here once, before the trace starts
        tr = _CtimeTrace(back.stat().st_ino)
        try:
            with tr:
                took = run_as(NOBODY, NOBODY, _overwrite, str(f), WRITES, None)
            plain = tr.count()
            # control: the same writes with a timestamp query of the backing file after
            # each (what the engine's fstat did): nearly every write changes the ctime
            with tr:
                run_as(0, 0, _overwrite, str(f), WRITES, str(back))
            queried = tr.count()
        finally:
            tr.close()
        assert queried >= WRITES * 0.9, (queried, "the trace does not see fine-grained "
                                         "ctime changes; the check below would prove nothing")
        # coarse timestamps: at most one change per clock tick (HZ <= 1000) and a few
        # more, far below one per write
        assert plain < WRITES / 4, (plain, WRITES, f"{took:.3f} s")
        assert plain <= took * 1000 + 10, (plain, f"{took:.3f} s")
        assert f.read_bytes()[8192:] == bytes((1 << 20) - 8192)
