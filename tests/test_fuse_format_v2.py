"""TAKA v2 files on the FUSE engine (fuse_taka.c; docs/file-format.md, "Version 2"):
blocks rewritten after a key rotation use the new version at once, files of any mix of
versions read back, a block outside the header's versions or without its key fails
closed, and the live rekey moves a v2 file whole to the new version.

The guard point is served by a child process (tests/rekey_helpers.py) with the keys of
a local keystore that the tests rotate, and told to re-read the key's current version
(``invalidate``), as takakryptd does after ``takakrypt keys rotate``.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from fuse_helpers import errno_of, fuse_skip_reason, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from rekey_helpers import header, key_lookup, make_keystore, rekey_mount, rotate  # noqa: E402
from takakrypt import format as fmt  # noqa: E402
from takakrypt.cryptofile import TakaFile  # noqa: E402
from takakrypt.keys import open_keystore  # noqa: E402

BS = 4096


@pytest.fixture(scope="module", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


@pytest.fixture
def keys(wtmp):
    return make_keystore(wtmp)


def block_versions(path: Path) -> list[int | None]:
    raw = path.read_bytes()
    h = fmt.parse_header(raw)
    out = []
    for i in range(h.nblocks):
        off = h.block_offset(i)
        n = min(h.plaintext_size - i * BS, BS) + fmt.OVERHEAD
        blk = raw[off:off + n]
        out.append(None if not any(blk) else struct.unpack("<I", blk[-4:])[0])
    return out


def pwrite(path: Path, data: bytes, off: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def test_new_files_are_v2_and_rewritten_blocks_move(wtmp, keys):
    data = bytearray(os.urandom(4 * BS + 123))
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        (g.mnt / "f").write_bytes(data)
        (g.mnt / "untouched").write_bytes(b"u" * 9000)
        h = header(g.backing / "f")
        assert (h.version, h.key_version, h.oldest_version) == (2, 1, 1)
        assert block_versions(g.backing / "f") == [1] * 5

        assert rotate(keys) == 2
        g.invalidate()
        before = g.stats()["version_moves"]
        pwrite(g.mnt / "f", b"NEW", BS + 7)  # one block, partly
        data[BS + 7:BS + 10] = b"NEW"
        pwrite(g.mnt / "f", b"tail", len(data))  # an append: the last block
        data += b"tail"
        assert block_versions(g.backing / "f") == [1, 2, 1, 1, 2]
        h = header(g.backing / "f")
        assert (h.key_version, h.oldest_version) == (2, 1)
        assert h.encryptions <= 1 << 16  # a fresh lease under the new file key
        assert g.stats()["version_moves"] == before + 1
        assert (g.mnt / "f").read_bytes() == data  # through the engine
        g.invalidate()  # and after the engine forgot everything it knew
        assert (g.mnt / "f").read_bytes() == data
        # a file nobody wrote keeps its version: no write, no move
        assert header(g.backing / "untouched").key_version == 1
    with TakaFile.open(str(g.backing / "f"), key_lookup(keys)) as f:  # the reference reader
        assert f.read(0, 1 << 20) == data


def test_truncate_to_zero_takes_the_current_version(wtmp, keys):
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        (g.mnt / "f").write_bytes(os.urandom(3 * BS))
        rotate(keys)
        g.invalidate()
        fid = header(g.backing / "f").file_id
        with open(g.mnt / "f", "r+b") as f:
            f.truncate(0)
        h = header(g.backing / "f")
        assert (h.key_version, h.oldest_version, h.plaintext_size) == (2, 2, 0)
        assert h.file_id == fid  # the same file, moved (v1 files get a new header)
        (g.mnt / "f").write_bytes(b"fresh")  # O_TRUNC of an empty file, then a block
        assert block_versions(g.backing / "f") == [2]


def test_v1_files_keep_working_beside_v2(wtmp, keys):
    with rekey_mount(wtmp, *keys) as g:  # the engine creates v1
        (g.mnt / "old").write_bytes(b"x" * 5000)
    assert header(g.backing / "old").version == 1
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        rotate(keys)
        g.invalidate()
        pwrite(g.mnt / "old", b"y", 0)
        (g.mnt / "new").write_bytes(b"z" * 10)
        h = header(g.backing / "old")
        assert (h.version, h.key_version) == (1, 1)  # v1 has one version per file
        assert (g.mnt / "old").read_bytes() == b"y" + b"x" * 4999
        assert (header(g.backing / "new").version, header(g.backing / "new").key_version) \
            == (2, 2)


def test_files_written_elsewhere_read_through_the_engine(wtmp, keys):
    """A v2 file of mixed versions made by the reference writer reads byte for byte."""
    rotate(keys)
    rotate(keys)  # versions 1..3
    kl = key_lookup(keys)
    backing = wtmp / "backing"
    backing.mkdir()
    data = bytearray(os.urandom(7 * BS + 1))
    with TakaFile.create(str(backing / "mixed"), "guard", 1, kl("guard", 1),
                         format_version=2) as f:
        f.write(0, data)
    for v, blk in ((2, 1), (3, 4), (2, 6)):  # (2 after 3: the file stays on 3)
        with TakaFile.open(str(backing / "mixed"), kl, writable=True, write_version=v) as f:
            f.write(blk * BS + 5, b"v%d" % v)
            data[blk * BS + 5:blk * BS + 7] = b"v%d" % v
    assert block_versions(backing / "mixed") == [1, 2, 1, 1, 3, 1, 3, 1]
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        assert (g.mnt / "mixed").read_bytes() == data
        with open(g.mnt / "mixed", "rb") as f:  # reads that start inside blocks
            f.seek(BS - 3)
            assert f.read(BS + 6) == data[BS - 3:2 * BS + 3]


def test_bad_block_versions_fail_closed(wtmp, keys):
    """A block relabelled to another version, or to one outside the header's range,
    gives EIO and an integrity audit event; the file's other blocks still read."""
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        data = os.urandom(3 * BS)
        (g.mnt / "f").write_bytes(data)
        rotate(keys)
        g.invalidate()
        pwrite(g.mnt / "f", b"2", 2 * BS)  # versions [1, 1, 2]
        raw = bytearray((g.backing / "f").read_bytes())
        h = fmt.parse_header(raw)
        for label in (2, 7):  # in range (the wrong key) / out of range
            bad = bytearray(raw)
            end = h.block_offset(1) + BS + fmt.OVERHEAD
            bad[end - 4:end] = struct.pack("<I", label)
            (g.backing / "f").write_bytes(bad)
            g.invalidate()
            assert errno_of(lambda: (g.mnt / "f").read_bytes()) == errno.EIO
            with open(g.mnt / "f", "rb") as f:
                assert f.read(BS) == data[:BS]
        events = [e for e in g.audit_events() if e["kind"] == "integrity"]
        assert events and all(e["path"] == "f" and "block 1" in e["detail"] for e in events)


def test_rekey_moves_a_v2_file_whole(wtmp, keys):
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        data = bytearray(os.urandom(5 * BS + 17))
        (g.mnt / "f").write_bytes(data)
        rotate(keys)
        g.invalidate()
        pwrite(g.mnt / "f", b"two", 2 * BS)
        data[2 * BS:2 * BS + 3] = b"two"
        assert header(g.backing / "f").oldest_version == 1
        assert g.rekey("f")[0] == "done"
        h = header(g.backing / "f")
        assert (h.version, h.key_version, h.oldest_version) == (2, 2, 2)
        assert block_versions(g.backing / "f") == [2] * 6
        assert (g.mnt / "f").read_bytes() == data
        # a v2 file already whole on the current version is not copied again
        assert g.rekey("f")[0] == "current"


def test_a_retired_version_fails_its_blocks_only(wtmp, keys):
    """Blocks of a version whose key is gone give EIO and an audit event naming the
    block; the file's blocks of other versions still read (never other bytes)."""
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        data = bytearray(os.urandom(2 * BS))
        (g.mnt / "f").write_bytes(data)
        rotate(keys)
        g.invalidate()
        pwrite(g.mnt / "f", b"v2", BS)  # versions [1, 2]
        data[BS:BS + 2] = b"v2"
        with open_keystore(str(keys[0]), master_key_file=str(keys[1])) as ks:
            ks.retire("guard", 1)  # what `keys retire` refuses while a file uses it
        g.drop_keys()
        g.invalidate()
        with open(g.mnt / "f", "rb") as f:
            assert errno_of(lambda: os.pread(f.fileno(), 10, 0)) == errno.EIO
            assert os.pread(f.fileno(), BS, BS) == data[BS:]
        with open(g.mnt / "f", "r+b") as f:  # a write that must merge block 0: refused
            assert errno_of(lambda: os.pwrite(f.fileno(), b"x", 5)) == errno.EIO
        events = [e for e in g.audit_events() if e["kind"] == "integrity"]
        assert any("key version of block 0 is unavailable" in e["detail"] for e in events)


def test_rekey_writes_the_guard_points_format(wtmp, keys):
    """A v1 file rekeyed on a guard point of format 2 becomes a v2 file (and one of
    format 1 a v1 file): the way existing files move to per-block versions."""
    with rekey_mount(wtmp, *keys) as g:  # format 1
        (g.mnt / "a").write_bytes(b"a" * 10000)
        (g.mnt / "b").write_bytes(b"b" * 10000)
    rotate(keys)
    with rekey_mount(wtmp, *keys, format_version=2) as g:
        assert g.rekey("a")[0] == "done"
        h = header(g.backing / "a")
        assert (h.version, h.key_version, h.oldest_version) == (2, 2, 2)
        assert (g.mnt / "a").read_bytes() == b"a" * 10000
    with rekey_mount(wtmp, *keys, format_version=1) as g:
        assert g.rekey("b")[0] == "done"
        assert (header(g.backing / "b").version, header(g.backing / "b").key_version) == (1, 2)
        assert (g.mnt / "a").read_bytes() == b"a" * 10000  # v2 read under format 1 too
