"""Byte-range bounds of the data path: random offsets x lengths x block sizes.

Issue 14, item 1: a READ that started on a block boundary with a length that is not a
multiple of the block size made the engine decrypt whole blocks into a reply buffer of
exactly the requested length, writing the file's plaintext past it (heap overflow in
the root daemon).  The io_uring channel hid it (its reply buffers are 1 MiB), so every
case here runs on both channels, and ci/asan.sh runs this file against the sanitized
server.  Reads, writes and the raw view, each through O_DIRECT (the application's
offset and length reach the engine as they are), buffered I/O with POSIX_FADV_RANDOM
(one page per READ, inside a block when blocks are large) and mmap.  Every file is
checked against a model and against the reference reader (takakrypt.cryptofile).
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from fuse_helpers import Guard, fuse_skip_reason, guard_mount, run_as, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from takakrypt.cryptofile import TakaFile  # noqa: E402

NOBODY = 65534
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
ROUNDS = 12 if SANITIZED else 40  # per block size and mode
BLOCK_SIZES = [512, 4096, 65536, 1 << 20]
CHANNELS = pytest.mark.parametrize("io_uring", [True, False], ids=["uring", "classic"])
PLAIN_AND_RAW = [{"uid": 0, "effects": ["permit", "apply_key"]},
                 {"uid": NOBODY, "effects": ["permit"]}]


@pytest.fixture(scope="module", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


def make_taka(g: Guard, name: str, data: bytes, bs: int) -> None:
    """A TAKA file of block size ``bs`` written by the reference writer straight into
    the backing directory (as a raw restore would put it there)."""
    with TakaFile.create(str(g.backing / name), "guard", 1, bytearray(g.key),
                         block_size=bs, mode=0o666) as f:
        f.write(0, data)
    os.chmod(g.backing / name, 0o666)  # past the umask: the raw caller writes too


def reference(g: Guard, name: str) -> bytes:
    with TakaFile.open(str(g.backing / name), g.keys()) as f:
        return f.read(0, f.size)


def ranges(rng: random.Random, size: int, bs: int, n: int) -> list[tuple[int, int]]:
    """Offsets on block boundaries, on 512-byte boundaries and anywhere (also past the
    end), lengths that are and are not multiples of the block size."""
    out = []
    for _ in range(n):
        off = rng.choice([rng.randrange(0, size // bs + 1) * bs,
                          rng.randrange(0, size // 512 + 1) * 512,
                          rng.randrange(0, size + 2)])
        ln = rng.choice([1, 100, 511, 512, 4096, bs - 1, bs, bs + 1, 2 * bs + 100,
                         rng.randrange(1, 3 * bs)])
        out.append((off, max(1, min(ln, 4 << 20))))
    return out


def read_mode(fd: int, mode: str, off: int, ln: int, size: int) -> bytes:
    if mode == "mmap":
        if size == 0 or off >= size:
            return b""
        # MAP_PRIVATE: the raw view is direct I/O, where only private maps exist
        with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
            return bytes(m[off:off + ln])
    return os.pread(fd, ln, off)


def open_mode(path: Path, mode: str, flags: int) -> int:
    fd = os.open(path, flags | (os.O_DIRECT if mode == "direct" else 0))
    if mode == "random":
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def check_reads(path: Path, data: bytes, bs: int, seed: int) -> list[str]:
    """Random range reads of ``path`` in every mode; the mismatches, described."""
    rng = random.Random(seed)
    bad = []
    for mode in ("direct", "random", "mmap"):
        fd = open_mode(path, mode, os.O_RDONLY)
        try:
            for off, ln in ranges(rng, len(data), bs, ROUNDS):
                got = read_mode(fd, mode, off, ln, len(data))
                if got != data[off:off + ln]:
                    bad.append(f"{path.name} {mode} [{off}, +{ln}): {len(got)} bytes, "
                               f"expected {len(data[off:off + ln])}")
        finally:
            os.close(fd)
    return bad


def random_writes(path: Path, model: bytearray, bs: int, seed: int,
                  modes: tuple[str, ...] = ("direct", "random", "mmap")) -> None:
    """Random writes in ``modes`` (growing the file too), applied to ``model``."""
    rng = random.Random(seed)
    for mode in modes:
        fd = open_mode(path, mode, os.O_RDWR)
        try:
            for off, ln in ranges(rng, len(model), bs, ROUNDS // 2):
                chunk = rng.randbytes(ln)
                if mode == "mmap":  # a mapping cannot grow the file: stay inside
                    if not model or off >= len(model):
                        continue
                    chunk = chunk[:len(model) - off]
                    with mmap.mmap(fd, len(model)) as m:
                        m[off:off + len(chunk)] = chunk
                        m.flush()
                else:
                    assert os.pwrite(fd, chunk, off) == len(chunk)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(chunk)] = chunk
            os.fsync(fd)
        finally:
            os.close(fd)


@CHANNELS
def test_plaintext_reads_never_overrun(wtmp, io_uring):
    rng = random.Random(14_1)
    with guard_mount(wtmp, io_uring=io_uring) as g:
        files = {}
        for bs in BLOCK_SIZES:
            size = 2 * bs + rng.randrange(1, bs)  # a partial last block
            files[bs] = rng.randbytes(size)
            make_taka(g, f"b{bs}", files[bs], bs)
        # the two reproductions from the review, first: 100 then 512 bytes O_DIRECT at
        # offset 0 of a 16 KiB file; a 4 KiB random-access read of a 64 KiB-block file
        data16 = rng.randbytes(16384)
        make_taka(g, "k16", data16, 4096)
        fd = os.open(g.mnt / "k16", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 100, 0) == data16[:100]
            assert os.pread(fd, 512, 0) == data16[:512]
        finally:
            os.close(fd)
        fd = open_mode(g.mnt / "b65536", "random", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == files[65536][:4096]
            assert os.pread(fd, 4096, 65536 + 8192) == files[65536][65536 + 8192:65536 + 12288]
        finally:
            os.close(fd)
        bad = []
        for bs, data in files.items():
            bad += check_reads(g.mnt / f"b{bs}", data, bs, seed=bs)
        assert not bad, bad[:10]
        assert g.proc.poll() is None  # the server is alive


@CHANNELS
def test_plaintext_writes_random_ranges(wtmp, io_uring):
    rng = random.Random(14_2)
    with guard_mount(wtmp, io_uring=io_uring) as g:
        bad = []
        for bs in BLOCK_SIZES:
            model = bytearray(rng.randbytes(bs + rng.randrange(1, bs)))
            make_taka(g, f"w{bs}", bytes(model), bs)
            random_writes(g.mnt / f"w{bs}", model, bs, seed=bs + 1)
            if reference(g, f"w{bs}") != bytes(model):
                bad.append(f"w{bs}: stored plaintext differs from the model")
            bad += check_reads(g.mnt / f"w{bs}", bytes(model), bs, seed=bs + 2)
        assert not bad, bad[:10]
        assert g.proc.poll() is None


@CHANNELS
def test_raw_view_random_ranges(wtmp, io_uring):
    """The raw view reads and writes the stored bytes at any range, in every mode."""
    rng = random.Random(14_3)
    with guard_mount(wtmp, rules=PLAIN_AND_RAW, io_uring=io_uring) as g:
        os.chmod(g.mnt, 0o777)
        for bs in (512, 65536):
            make_taka(g, f"r{bs}", rng.randbytes(2 * bs + 77), bs)
        stored = {bs: (g.backing / f"r{bs}").read_bytes() for bs in (512, 65536)}

        def raw_side(mnt: str) -> tuple[list[str], dict[int, bytes]]:
            out, models = [], {}
            for bs, raw in stored.items():
                p = Path(mnt) / f"r{bs}"
                out += check_reads(p, raw, bs, seed=bs + 3)
                model = bytearray(raw)
                # a shared writable map of a direct-I/O file is refused (ENODEV)
                random_writes(p, model, bs, seed=bs + 4, modes=("direct", "random"))
                models[bs] = bytes(model)
                out += check_reads(p, models[bs], bs, seed=bs + 5)
            return out, models

        bad, models = run_as(NOBODY, NOBODY, raw_side, str(g.mnt))
        assert not bad, bad[:10]
        for bs, model in models.items():  # the raw writes reached the backing file as sent
            assert model != stored[bs]
            assert (g.backing / f"r{bs}").read_bytes() == model
        assert g.proc.poll() is None
