"""Large reads decrypted in parts by helper threads on the other CPUs (fuse_split.c).

A READ of at least 128 blocks goes to helpers pinned to the CPUs other than the one it
was issued on; what the reader gets -- bytes, errors, the audit trail, the prefetch hint
-- must be exactly what one decryption of the whole range would give.  On a machine
with two CPUs a read is one part; ``TAKAKRYPT_TEST_SPLIT_PARTS`` cuts each large read
into more parts, so that merging the parts' results is exercised here too.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount
from takakrypt import format as fmt

pytestmark = [
    pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or ""),
    pytest.mark.skipif((os.cpu_count() or 1) < 2,
                       reason="one CPU: reads are never handed to helpers"),
]

MiB = 1 << 20
BS = fmt.DEFAULT_BLOCK_SIZE
STORED_BS = BS + fmt.OVERHEAD


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def _flip(backing: Path, block: int) -> None:
    """Flip one ciphertext byte inside stored block `block`."""
    with open(backing, "r+b") as f:
        pos = fmt.HEADER_SIZE + block * STORED_BS + 100
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


def _integrity_blocks(g) -> list[int]:
    return [int(m.group(1)) for e in g.audit_events() if e["kind"] == "integrity"
            for m in [re.search(r"block (\d+) failed", e.get("detail", ""))] if m]


def test_large_reads_go_to_helpers_and_read_back_exactly(wtmp):
    with guard_mount(wtmp) as g:
        data = os.urandom(8 * MiB + 3 * BS + 777)  # the last block is partial
        (g.mnt / "f").write_bytes(data)
        _drop_caches()
        base = g.stats()
        assert (g.mnt / "f").read_bytes() == data  # readahead: READs of 1 MiB
        after = g.stats()
        # at least one part per 1 MiB request, and the hint for the next requests went
        # with them (given by the helper doing the last part)
        assert after["read_splits"] - base["read_splits"] >= 8
        names = {p.read_text().strip() for p in Path(f"/proc/{g.proc.pid}/task").glob("*/comm")}
        assert {f"tk-split{c}" for c in range(min(os.cpu_count() or 1, 8))} <= names
        assert after["read_prefetches"] > base["read_prefetches"]
        # small reads are the worker's own: nothing handed over
        fd = os.open(g.mnt / "f", os.O_RDONLY)
        try:
            for off in (0, 5 * MiB + 4096 * 7, 8 * MiB):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, 4096, off) == data[off:off + 4096]
        finally:
            os.close(fd)
        assert g.stats()["read_splits"] == after["read_splits"]


def test_without_read_helpers_the_worker_reads_alone(wtmp):
    # read_helpers: false (config), --no-read-helpers: no helper threads, same bytes
    with guard_mount(wtmp, read_helpers=False) as g:
        data = os.urandom(4 * MiB + 5)
        (g.mnt / "f").write_bytes(data)
        _drop_caches()
        assert (g.mnt / "f").read_bytes() == data
        st = g.stats()
        assert st["read_splits"] == 0 and st["read_prefetches"] > 0
        names = {p.read_text().strip() for p in Path(f"/proc/{g.proc.pid}/task").glob("*/comm")}
        assert not any(n.startswith("tk-split") for n in names)


def test_parts_read_back_exactly_at_every_cut(wtmp, monkeypatch):
    monkeypatch.setenv("TAKAKRYPT_TEST_SPLIT_PARTS", "5")  # 256 blocks: 52,51,51,51,51
    with guard_mount(wtmp) as g:
        sizes = {"a": 2 * MiB + 1000, "b": MiB - 1, "c": 129 * BS, "d": 5 * BS + 3}
        files = {n: os.urandom(s) for n, s in sizes.items()}
        for n, d in files.items():
            (g.mnt / n).write_bytes(d)
        _drop_caches()
        base = g.stats()["read_splits"]
        for n, d in files.items():
            assert (g.mnt / n).read_bytes() == d, n
        assert g.stats()["read_splits"] - base >= 5 * 3  # a's two READs and b's, 5 parts


def test_a_bad_block_in_any_part_fails_the_read_and_names_the_first(wtmp, monkeypatch):
    monkeypatch.setenv("TAKAKRYPT_TEST_SPLIT_PARTS", "4")  # 256 blocks: 64 per part
    with guard_mount(wtmp) as g:
        data = os.urandom(2 * MiB)
        (g.mnt / "f").write_bytes(data)
        # parts 1 and 3 of the first 1 MiB request: the read fails, and the block named
        # is the lower one, as one decryption of the whole range would name it
        _flip(g.backing / "f", 200)
        _flip(g.backing / "f", 70)
        _drop_caches()
        fd = os.open(g.mnt / "f", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            # the 1 MiB READ fails as a whole; the kernel then reads page by page and
            # hands over what precedes the bad block, the next read gets EIO
            assert os.pread(fd, MiB, 0) == data[:70 * BS]
            with pytest.raises(OSError) as e:
                os.pread(fd, BS, 70 * BS)
            assert e.value.errno == errno.EIO
            # the second MiB is intact and reads back (its own READ, its own parts)
            assert os.pread(fd, MiB, MiB) == data[MiB:]
        finally:
            os.close(fd)
        blocks = _integrity_blocks(g)
        assert blocks and blocks[0] == 70 and 200 not in blocks
        assert g.stats()["integrity_failures"] >= 1
