"""TAKA v2 on takakryptfs (docs/file-format.md, "Version 2"; docs/kernel.md): a mount
with format=2 makes v2 files; after a key rotation, blocks written back through a file
that stayed open take the new version at once while its other blocks keep theirs; files
of mixed versions read byte for byte through the module, the FUSE engine and the
reference reader; a block relabelled to another version fails closed (EIO).

The environment is tkfs_env.kernel_env (ext4 lower, takakryptd serving keys, a FUSE
guard point over the same lower directory).  The kernel mount is mounted again with
format=2 for this file and put back as it was at the end.  The file's name sorts it
before test_tkfs_policy.py, whose own takakryptd takes the module's registration over.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from tkfs_env import drop_caches, kmount, kumount

HDR, BS, SBS = 128, 4096, 4096 + 28


@pytest.fixture
def v2(kenv):
    kumount(kenv.kmnt)
    kmount(kenv.lower, kenv.kmnt, "key=k1,gp=1,decide=none,format=2")
    try:
        yield kenv
    finally:
        kumount(kenv.kmnt)
        kmount(kenv.lower, kenv.kmnt)


def keystore(env):
    from takakrypt.keys import open_keystore
    return open_keystore(str(env.base / "keystore.json"),
                         master_key_file=str(env.base / "master.key"))


def header(path: Path):
    from takakrypt import format as fmt
    return fmt.parse_header(path.read_bytes()[:HDR])


def block_versions(path: Path) -> list[int | None]:
    raw = path.read_bytes()
    h = header(path)
    out = []
    for i in range(h.nblocks):
        off = HDR + i * SBS
        n = min(h.plaintext_size - i * BS, BS) + 28
        blk = raw[off:off + n]
        out.append(None if not any(blk) else struct.unpack("<I", blk[-4:])[0])
    return out


def config_updates(env) -> int:
    st = json.loads(env.agent.cli("status", "--json", check=False).stdout)
    return next(t for t in st["transports"] if t["transport"] == "genl")["config_updates"]


def rotate(env) -> int:
    """A new version of k1, then a reload: takakryptd reads the keystore again and its
    CONFIG_UPDATE makes the module forget the current version it held."""
    with keystore(env) as ks:
        v = ks.rotate("k1").current_version
    before = config_updates(env)
    env.agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and config_updates(env) <= before:
        time.sleep(0.5)
    assert config_updates(env) > before
    return v


def test_rotation_moves_rewritten_blocks_of_an_open_file(v2):
    env = v2
    d = env.kmnt / "v2"
    d.mkdir()
    data = bytearray(os.urandom(5 * BS + 77))
    (d / "f").write_bytes(data)
    (d / "idle").write_bytes(b"i" * 9000)
    os.sync()
    stored = env.lower / "v2" / "f"
    h = header(stored)
    base = h.key_version
    assert (h.version, h.oldest_version) == (2, base)
    assert block_versions(stored) == [base] * 6
    assert env.decrypt(stored) == data  # the reference reader

    fd = os.open(d / "f", os.O_RDWR)  # a long-running writer keeps it open
    try:
        new = rotate(env)
        assert new == base + 1
        os.pwrite(fd, b"NEW", BS + 7)
        data[BS + 7:BS + 10] = b"NEW"
        os.pwrite(fd, b"tail", len(data))
        data += b"tail"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert block_versions(stored) == [base, new, base, base, base, new]
    h = header(stored)
    assert (h.key_version, h.oldest_version, h.plaintext_size) == (new, base, len(data))
    assert header(env.lower / "v2" / "idle").key_version == base  # not written: not moved
    drop_caches()
    assert (d / "f").read_bytes() == data  # both versions through the module
    assert env.decrypt(stored) == data
    assert (env.fmnt / "v2" / "f").read_bytes() == data  # the FUSE engine

    # a v2 file of mixed versions made by the reference writer reads through the module
    from takakrypt.cryptofile import TakaFile
    ks = keystore(env)
    try:
        ref = bytearray(os.urandom(4 * BS))
        p = env.lower / "v2" / "ref"
        with TakaFile.create(str(p), "k1", base, ks.get("k1", base), format_version=2) as f:
            f.write(0, ref)
        with TakaFile.open(str(p), ks.get, writable=True, write_version=new) as f:
            f.write(2 * BS + 1, b"R")
            ref[2 * BS + 1:2 * BS + 2] = b"R"
    finally:
        ks.close()
    assert block_versions(p) == [base, base, new, base]
    drop_caches()
    assert (d / "ref").read_bytes() == ref

    # truncated to 0 and written: nothing of the old version is left
    with open(d / "f", "r+b") as f:
        f.truncate(0)
        f.write(b"fresh")
    os.sync()
    h = header(stored)
    assert (h.key_version, h.oldest_version) == (new, new)
    assert block_versions(stored) == [new]


def test_relabelled_block_version_fails_closed(v2):
    env = v2
    d = env.kmnt / "v2t"
    d.mkdir()
    data = os.urandom(3 * BS)
    (d / "f").write_bytes(data)
    os.sync()
    stored = env.lower / "v2t" / "f"
    raw = bytearray(stored.read_bytes())
    v = header(stored).key_version
    end = HDR + 2 * SBS  # block 1's last four bytes: its version
    for label in (v + 5, v - 1 if v > 1 else 0xFFFFFFFF):
        bad = bytearray(raw)
        bad[end - 4:end] = struct.pack("<I", label)
        kumount(env.kmnt)  # no page cache of it survives
        stored.write_bytes(bad)
        kmount(env.lower, env.kmnt, "key=k1,gp=1,decide=none,format=2")
        with open(d / "f", "rb") as f:
            assert f.read(BS) == data[:BS]
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), BS, BS)
            assert e.value.errno == errno.EIO
            assert os.pread(f.fileno(), BS, 2 * BS) == data[2 * BS:]
