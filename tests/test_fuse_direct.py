"""Write-only plaintext opens use direct I/O (fuse_ops.c direct_for).

A handle opened O_WRONLY can neither read nor map its file, so the engine tells the
kernel to bypass the page cache for it: each write(2) becomes one WRITE request
instead of being cut at every partial page.  Other openers keep their page cache, and
the kernel (6.6+) drops a range's cached pages before a direct write to it.  These
tests check that the right opens get it, that cached readers and mappings see what a
write-only writer wrote, and that unaligned, sparse and appending write-only writes
leave exactly the bytes a plain directory gets.
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount, run_as

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

NOBODY = 65534


def _direct_or_skip(g) -> None:
    if not g.stats()["wronly_direct"]:
        pytest.skip("this kernel's FUSE is older than protocol 7.39 (Linux 6.6): "
                    "write-only opens keep the page cache")


def test_only_write_only_plaintext_opens_are_direct(wtmp):
    with guard_mount(wtmp) as g:
        _direct_or_skip(g)
        f = g.mnt / "f"
        base = g.stats()["direct_opens"]
        os.close(os.open(f, os.O_WRONLY | os.O_CREAT, 0o644))       # CREATE
        os.close(os.open(f, os.O_WRONLY))                             # OPEN
        os.close(os.open(f, os.O_WRONLY | os.O_APPEND))
        assert g.stats()["direct_opens"] - base == 3
        os.close(os.open(f, os.O_RDWR))
        os.close(os.open(f, os.O_RDONLY))
        os.close(os.open(g.mnt / "g", os.O_RDWR | os.O_CREAT, 0o644))
        assert g.stats()["direct_opens"] - base == 3


def test_knob_turns_it_off(wtmp, monkeypatch):
    monkeypatch.setenv("TAKAKRYPT_WRONLY_DIRECT", "0")
    with guard_mount(wtmp) as g:
        assert g.stats()["wronly_direct"] == 0
        (g.mnt / "f").write_bytes(b"x" * 10000)
        assert (g.mnt / "f").read_bytes() == b"x" * 10000
        assert g.stats()["direct_opens"] == 0


def _write_only(path: str, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def test_cached_reader_and_mapping_see_write_only_writes(wtmp):
    """Another process writes O_WRONLY while this one holds the file open, read in
    full (its pages cached) and mapped: both see the new bytes at once."""
    with guard_mount(wtmp) as g:
        _direct_or_skip(g)
        g.mnt.chmod(0o777)
        f = g.mnt / "shared"
        want = bytearray(os.urandom(300_000))
        f.write_bytes(want)
        f.chmod(0o666)
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(fd, len(want), 0) == want  # now in the page cache
            with mmap.mmap(fd, len(want), prot=mmap.PROT_READ) as m:
                assert m[:] == want
                rng = random.Random(5)
                writes = []
                for _ in range(40):  # unaligned: partial pages and partial blocks
                    off = rng.randrange(0, len(want) - 20_000)
                    data = os.urandom(rng.randrange(1, 20_000))
                    writes.append((off, data))
                    want[off:off + len(data)] = data
                run_as(NOBODY, NOBODY, _write_only, str(f), writes)
                assert os.pread(fd, len(want), 0) == want
                assert m[:] == want
        finally:
            os.close(fd)
        assert f.read_bytes() == want


def _pattern(root: Path, seed: int) -> None:
    """Write-only traffic of many shapes: tar-like records at unaligned offsets, holes
    beyond the end, overwrites across block edges, appends, truncating re-opens."""
    rng = random.Random(seed)
    for i in range(6):
        p = str(root / f"f{i}")
        size = rng.choice([0, 1, 4095, 4096, 10240, 16_500, 70_000])
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        off = 0
        while off < size:  # 10 KiB records, as tar writes them
            n = min(10240, size - off)
            os.write(fd, rng.randbytes(n))
            off += n
        for _ in range(8):
            at = rng.randrange(0, size + 20_000)
            os.pwrite(fd, rng.randbytes(rng.randrange(1, 9000)), at)
        os.close(fd)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        for _ in range(3):
            os.write(fd, rng.randbytes(rng.randrange(1, 5000)))
        os.close(fd)


def test_write_only_writes_match_a_plain_directory(wtmp):
    plain = wtmp / "plain"
    plain.mkdir()
    with guard_mount(wtmp) as g:
        _direct_or_skip(g)
        for seed in range(3):
            _pattern(plain, seed)
            _pattern(g.mnt, seed)
            for i in range(6):
                a, b = plain / f"f{i}", g.mnt / f"f{i}"
                assert b.stat().st_size == a.stat().st_size, (seed, i)
                assert b.read_bytes() == a.read_bytes(), (seed, i)
        assert g.stats()["direct_opens"] >= 36
