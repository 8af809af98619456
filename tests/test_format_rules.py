"""Every TAKA reader follows the same rules (docs/file-format.md): the Python random-access
reader (TakaFile), the streaming reader (`takakrypt decrypt`, `inspect`, xform) and the
C engine behind a guard point.

- the last block may be stored longer than the size implies, up to a full block (what a
  crash inside a growing write leaves): verified at that length, only the first
  ``size`` bytes are plaintext, bytes past a full stored last block are ignored;
- a key id is a key name of the keystore (docs/keys.md), else a format error (exit 4);
- a block whose nonce is all zero but that is not all zero is an ordinary block;
- a file whose header does not verify: stat shows its stored size, open/read fail (EIO).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_helpers import errno_of, fuse_skip_reason, guard_mount, sweep_stale_mounts
from takakrypt import format as fmt
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import FormatError, IntegrityError
from takakrypt.stream import decrypt_file, inspect_file

BS = 4096
KEY = bytes(range(32))
NAME = "guard"


def _keys(name, version):
    return bytearray(KEY)


def crash_file(path: Path, size: int, written: int, *, key: bytes = KEY,
               name: str = NAME) -> bytes:
    """What a crash in the middle of a growing write leaves: the reference writer wrote
    ``written`` bytes (blocks stored), but the header on disk still says ``size``.
    Returns the plaintext of the first ``size`` bytes."""
    data = os.urandom(written)
    with TakaFile.create(str(path), name, 1, bytearray(key)) as f:
        f.write(0, data[:size])
        old_header = f.header.pack(f._fk.mac_key)
        f.write(size, data[size:])
    with open(path, "r+b") as out:
        out.write(old_header)
    return data[:size]


# (size, bytes written by the interrupted write): block 1 stored as 1,404 plaintext bytes,
# as a full block, a full block 1 followed by more blocks, size 1 with a full block 0
CASES = [(5000, 5500), (5000, 8192), (5000, 3 * BS + 100), (1, BS), (BS + 1, 2 * BS),
         (3 * BS + 17, 4 * BS)]


def read_all_ways(path: Path, tmp: Path) -> dict[str, object]:
    """What each Python reader makes of ``path``: plaintext, or the error class."""
    out: dict[str, object] = {}
    try:
        with TakaFile.open(str(path), _keys) as f:
            out["random"] = f.read(0, f.size)
            # every block on its own too
            out["random_blocks"] = b"".join(f.read(o, BS) for o in range(0, f.size, BS))
    except (FormatError, IntegrityError) as e:
        out["random"] = out["random_blocks"] = type(e)
    dst = tmp / (path.name + ".out")
    for chunk_blocks in (1, 1024):
        try:
            decrypt_file(str(path), str(dst), _keys, force=True, chunk_blocks=chunk_blocks)
            out[f"stream{chunk_blocks}"] = dst.read_bytes()
        except (FormatError, IntegrityError) as e:
            out[f"stream{chunk_blocks}"] = type(e)
    return out


@pytest.mark.parametrize("size,written", CASES)
def test_longer_last_block_reads_everywhere(tmp_path, size, written):
    p = tmp_path / "f.taka"
    want = crash_file(p, size, written)
    assert read_all_ways(p, tmp_path) == {k: want for k in
                                          ("random", "random_blocks", "stream1", "stream1024")}
    info = inspect_file(str(p))
    assert info["plaintext_size"] == size and info["layout"] == "trailing"


@pytest.mark.parametrize("size,written", CASES)
def test_longer_last_block_tampered_fails_everywhere(tmp_path, size, written):
    p = tmp_path / "f.taka"
    crash_file(p, size, written)
    h = fmt.parse_header(p.read_bytes())
    raw = bytearray(p.read_bytes())
    raw[h.block_offset(h.nblocks - 1) + fmt.NONCE_SIZE + 1] ^= 1  # in the last block
    p.write_bytes(raw)
    got = read_all_ways(p, tmp_path)
    assert set(got.values()) == {IntegrityError}, got


def test_no_other_length_of_the_last_block(tmp_path):
    """The longer form is the stored bytes up to a full stored block, nothing between:
    a 1,404-byte version of block 1 followed by other bytes does not verify."""
    p = tmp_path / "f.taka"
    crash_file(p, 5000, 5500)
    with open(p, "ab") as f:
        f.write(b"\x01" * 10)
    assert set(read_all_ways(p, tmp_path).values()) == {IntegrityError}


def test_longer_last_block_then_written_again(tmp_path):
    """A writer continues such a file: bytes past the size are zeros, never old ones."""
    p = tmp_path / "f.taka"
    want = crash_file(p, 5000, 8192)
    with TakaFile.open(str(p), _keys, writable=True) as f:
        f.write(6000, b"x")
    assert read_all_ways(p, tmp_path)["stream1024"] == want + bytes(1000) + b"x"


# --- key ids -------------------------------------------------------------------------------

def _with_key_id(tmp: Path, key_id: bytes) -> Path:
    """A file whose header names key_id, with a valid tag (so only the name is wrong)."""
    p = tmp / "k.taka"
    with TakaFile.create(str(p), "k", 1, bytearray(KEY)) as f:
        f.write(0, b"hello")
        body = bytearray(f.header.unsigned())
        _, mac = fmt.derive_file_keys(KEY, f.header.file_id)
    body[32] = len(key_id)
    body[33:96] = key_id.ljust(63, b"\0")
    p.write_bytes(bytes(body) + fmt.header_tag(mac, bytes(body)) + p.read_bytes()[128:])
    return p


@pytest.mark.parametrize("key_id", ["ключ".encode(), b".hidden", b"-x", b"a b", b"a/b",
                                    b"a\x01"])
def test_key_id_outside_the_keystore_rule_is_a_format_error(tmp_path, key_id):
    p = _with_key_id(tmp_path, key_id)
    with pytest.raises(FormatError, match="key id"):
        inspect_file(str(p))
    with pytest.raises(FormatError, match="key id"):
        decrypt_file(str(p), None, _keys)
    with pytest.raises(FormatError, match="key id"):
        TakaFile.open(str(p), _keys)
    with pytest.raises(FormatError):
        fmt.Header(key_id=key_id.decode("utf-8", "replace"), key_version=1)


def test_key_id_rule_is_the_keystore_rule():
    from takakrypt.keys.backend import validate_key_name
    from takakrypt.errors import UsageError
    for name in ["k", "db_master", "share.key-1", "_x", "x" * 63, "ключ", ".a", "-a", "x" * 64,
                 "a b", ""]:
        try:
            validate_key_name(name)
            ok = True
        except UsageError:
            ok = False
        try:
            fmt.validate_key_id(name)
            assert ok, name
        except FormatError:
            assert not ok, name


def test_cli_agrees(tmp_path):
    """`takakrypt decrypt` and `inspect`: a longer last block decrypts; a key id outside
    the keystore's rule is a file error (exit 4), not a usage error."""
    env = dict(os.environ, TAKAKRYPT_KEYSTORE=str(tmp_path / "ks.json"),
               TAKAKRYPT_PASSPHRASE="pw-for-tests")

    def tk(*args):
        r = subprocess.run([sys.executable, "-m", "takakrypt", *map(str, args)], env=env,
                           capture_output=True, timeout=120)
        assert b"Traceback" not in r.stderr
        return r

    assert tk("keys", "create", "k").returncode == 0
    from takakrypt.keys import open_keystore
    with open_keystore(env["TAKAKRYPT_KEYSTORE"], passphrase=b"pw-for-tests") as ks:
        key = bytes(ks.get("k", 1))
    want = crash_file(tmp_path / "c.taka", 5000, 5500, key=key, name="k")
    r = tk("decrypt", tmp_path / "c.taka", tmp_path / "c.out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.out").read_bytes() == want
    assert tk("inspect", "--verify", tmp_path / "c.taka").returncode == 0
    p = _with_key_id(tmp_path, "ключ".encode())
    for args in (["decrypt", p, tmp_path / "o"], ["inspect", p]):
        r = tk(*args)
        assert r.returncode == FormatError.exit_code, r.stderr
        assert b"key id" in r.stderr


# --- all-zero nonce ---------------------------------------------------------------------

def test_zero_nonce_block_is_an_ordinary_block(tmp_path):
    """Writers never draw an all-zero nonce; a reader treats a block with one as any
    other block (its tag decides), and only an entirely zero block as a hole."""
    p = tmp_path / "z.taka"
    with TakaFile.create(str(p), NAME, 1, bytearray(KEY)) as f:
        f.write(0, b"A" * 5000)
    raw = bytearray(p.read_bytes())
    raw[128:128 + fmt.NONCE_SIZE] = bytes(fmt.NONCE_SIZE)  # block 0's nonce zeroed
    p.write_bytes(raw)
    got = read_all_ways(p, tmp_path)
    assert set(got.values()) == {IntegrityError}, got
    # a correctly sealed block under the zero nonce verifies (the key holder made it)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    h = fmt.parse_header(raw)
    enc, _ = fmt.derive_file_keys(KEY, h.file_id)
    sealed = AESGCM(bytes(enc)).encrypt(bytes(12), b"B" * BS, h.static + (0).to_bytes(8, "little"))
    raw[128:128 + BS + 28] = bytes(12) + sealed
    p.write_bytes(raw)
    got = read_all_ways(p, tmp_path)
    assert set(map(bytes, got.values())) == {b"B" * BS + b"A" * (5000 - BS)}, got


# --- the C engine ------------------------------------------------------------------------

fuse_only = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


@fuse_only
def test_guard_point_agrees(wtmp):
    sweep_stale_mounts()
    with guard_mount(wtmp, key=KEY, key_name=NAME) as g:
        want = {}
        for i, (size, written) in enumerate(CASES):
            want[f"c{i}"] = crash_file(g.backing / f"c{i}", size, written)
            crash_file(g.backing / f"t{i}", size, written)
            raw = bytearray((g.backing / f"t{i}").read_bytes())
            h = fmt.parse_header(raw)
            raw[h.block_offset(h.nblocks - 1) + 20] ^= 1
            (g.backing / f"t{i}").write_bytes(raw)
        crash_file(g.backing / "x", 5000, 5500)
        with open(g.backing / "x", "ab") as f:
            f.write(b"\x01" * 10)
        bad_key = _with_key_id(wtmp, "ключ".encode())
        os.rename(bad_key, g.backing / "badkey")
        zn = bytearray((g.backing / "c0").read_bytes())
        zn[128:128 + fmt.NONCE_SIZE] = bytes(fmt.NONCE_SIZE)  # not a hole: an ordinary block
        (g.backing / "zero-nonce").write_bytes(zn)
        forged = bytearray((g.backing / "c0").read_bytes())
        forged[120] ^= 0xFF
        (g.backing / "forged").write_bytes(forged)
        for name, data in want.items():
            assert (g.mnt / name).read_bytes() == data, name
            assert os.stat(g.mnt / name).st_size == len(data)
        for name in [f"t{i}" for i in range(len(CASES))] + ["x", "zero-nonce"]:
            assert errno_of(lambda: (g.mnt / name).read_bytes()) == errno.EIO, name
        # a header that does not verify (or names no valid key): stat shows the stored
        # size, open fails with EIO
        for name in ("forged", "badkey"):
            assert os.stat(g.mnt / name).st_size == (g.backing / name).stat().st_size
            assert errno_of(lambda: os.open(g.mnt / name, os.O_RDONLY)) == errno.EIO, name
        # the engine continues such a file the way the reference writer does
        fd = os.open(g.mnt / "c1", os.O_WRONLY)
        os.pwrite(fd, b"x", 6000)
        os.close(fd)
    with TakaFile.open(str(g.backing / "c1"), _keys) as f:
        assert f.read(0, f.size) == want["c1"] + bytes(1000) + b"x"
    assert json.dumps(inspect_file(str(g.backing / "c1")))
