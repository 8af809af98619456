"""TAKA v2 (per-block key versions): known answers, tamper, fuzzing, and the writer rule
"rewritten blocks use the new version at once" (docs/file-format.md, "Version 2")."""

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

import test_cryptofile

from takakrypt import format as fmt
from takakrypt._aesgcm import BlockCipher
from takakrypt.agent.rekey import usage
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import FormatError, IntegrityError, KeyNotFound
from takakrypt.stream import decrypt_file, inspect_file

V2 = json.loads((Path(__file__).parent / "vectors" / "taka_v2.json").read_text())["vectors"]


@pytest.fixture(params=V2, ids=[v["name"] for v in V2])
def vector(request):
    return request.param


def _keys_for(v):
    def lookup(name, version):
        if name != v["key_id"] or str(version) not in v["keys"]:
            raise KeyNotFound(f"no version {version}")
        return bytearray.fromhex(v["keys"][str(version)])
    return lookup


# known answers --------------------------------------------------------------------------

def test_vector_header_fields(vector):
    blob = bytes.fromhex(vector["file"])
    h = fmt.parse_header(blob)
    assert h.version == 2
    assert (h.key_id, h.key_version, h.oldest_version, h.encryptions) == (
        vector["key_id"], vector["key_version"], vector["oldest_version"],
        vector["encryptions"])
    assert h.plaintext_size == len(vector["plaintext"]) // 2
    assert h.stored_size == len(blob)
    assert list(h.versions) == list(range(vector["oldest_version"], vector["key_version"] + 1))


def test_vector_key_derivation(vector):
    fid = bytes.fromhex(vector["file_id"])
    for v, key in vector["keys"].items():
        enc, _mac = fmt.derive_file_keys(bytearray.fromhex(key), fid, info=fmt.HKDF_INFO_V2)
        assert enc.hex() == vector["file_keys"][v]
        v1, _ = fmt.derive_file_keys(bytearray.fromhex(key), fid)
        assert v1 != enc  # v1 and v2 file keys are separate


def test_vector_encrypt_reproduces_file(vector):
    """Header packing and the native v2 block cipher give the independent bytes."""
    pt = bytes.fromhex(vector["plaintext"])
    bs, fid = vector["block_size"], bytes.fromhex(vector["file_id"])
    h = fmt.Header(key_id=vector["key_id"], key_version=vector["key_version"], file_id=fid,
                   block_size=bs, plaintext_size=len(pt), encryptions=vector["encryptions"],
                   version=2, oldest_version=vector["oldest_version"])
    keys = {int(v): bytearray.fromhex(k) for v, k in vector["keys"].items()}
    _enc, mac = fmt.derive_file_keys(keys[h.key_version], fid, info=fmt.HKDF_INFO_V2)
    nonces = bytes.fromhex(vector["nonces"])
    for engine in ("ipsecmb", "openssl"):
        out = bytearray(h.pack(mac))
        for i, v in enumerate(vector["block_versions"]):
            piece = pt[i * bs:(i + 1) * bs]
            if v is None:
                out += bytes(len(piece) + fmt.OVERHEAD)
                continue
            enc, _ = fmt.derive_file_keys(keys[v], fid, info=fmt.HKDF_INFO_V2)
            c = BlockCipher(enc, block_size=bs, engine=engine, block_version=v)
            out += c.encrypt(piece, h.aad_prefix, i, nonces=nonces[12 * i:12 * i + 12])
        assert out.hex() == vector["file"], engine


def test_vector_decrypts(vector, tmp_path):
    p = tmp_path / "v.taka"
    p.write_bytes(bytes.fromhex(vector["file"]))
    with TakaFile.open(p, _keys_for(vector)) as f:
        assert f.read(0, 1 << 30).hex() == vector["plaintext"]
    decrypt_file(str(p), str(tmp_path / "out"), _keys_for(vector))
    assert (tmp_path / "out").read_bytes().hex() == vector["plaintext"]
    info = inspect_file(str(p))
    assert (info["version"], info["key_version"], info["oldest_key_version"]) == (
        2, vector["key_version"], vector["oldest_version"])


@pytest.mark.parametrize("engine", ["ipsecmb", "openssl"])
def test_native_version_mismatch_contract(engine):
    """A batch stops at the first block of another version (BlockVersionMismatch: the
    block's index and version); blocks before it are decrypted, out is left as it was
    from it on (nothing was written there)."""
    from takakrypt.errors import BlockVersionMismatch
    key, pre = os.urandom(32), os.urandom(96)
    pt = os.urandom(3 * 4096)
    c3 = BlockCipher(key, engine=engine, block_version=3)
    c4 = BlockCipher(key, engine=engine, block_version=4)
    sealed = bytearray(c3.encrypt(pt, pre, 10))
    sbs = 4096 + fmt.OVERHEAD
    sealed[sbs:2 * sbs] = c4.encrypt(pt[4096:8192], pre, 11)
    out = bytearray(b"\xaa" * len(pt))
    with pytest.raises(BlockVersionMismatch) as ei:
        c3.decrypt_into(sealed, out, pre, 10)
    assert (ei.value.block, ei.value.version) == (11, 4)
    assert out[:4096] == pt[:4096] and out[4096:] == b"\xaa" * 8192
    assert c4.decrypt(bytes(sealed[sbs:2 * sbs]), pre, 11) == pt[4096:8192]
    with pytest.raises(IntegrityError):  # the version is bound: another index fails
        c4.decrypt(bytes(sealed[sbs:2 * sbs]), pre, 12)


def test_missing_old_version_fails_closed(tmp_path):
    v = next(x for x in V2 if x["name"] == "v2-mixed")
    p = tmp_path / "v.taka"
    p.write_bytes(bytes.fromhex(v["file"]))
    keys = _keys_for(v)

    def without_v2(name, version):
        if version == 2:
            raise KeyNotFound("version 2 retired")
        return keys(name, version)

    with TakaFile.open(p, without_v2) as f:
        assert f.read(0, 4096).hex() == v["plaintext"][:8192]  # block 0 is version 1
        with pytest.raises(KeyNotFound):
            f.read(2 * 4096, 10)  # block 2 is version 2
    with pytest.raises(KeyNotFound):
        decrypt_file(str(p), str(tmp_path / "out"), without_v2)
    assert not (tmp_path / "out").exists()


# tamper ---------------------------------------------------------------------------------

MIXED = next(x for x in V2 if x["name"] == "v2-mixed")


def _read_all(p, keys):
    with TakaFile.open(p, keys) as f:
        return f.read(0, 1 << 30)


def test_every_header_bit_flip_is_detected(tmp_path):
    blob = bytes.fromhex(MIXED["file"])
    p = tmp_path / "t.taka"
    for bit in range(fmt.HEADER_SIZE * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(bad)
        with pytest.raises((FormatError, IntegrityError, KeyNotFound)):
            _read_all(p, _keys_for(MIXED))


@pytest.mark.parametrize("block", range(5))
def test_block_tamper_is_detected(tmp_path, block):
    blob = bytes.fromhex(MIXED["file"])
    sbs = 4096 + fmt.OVERHEAD
    start = fmt.HEADER_SIZE + block * sbs
    end = min(len(blob), start + sbs)
    p = tmp_path / "t.taka"
    rng = list(range(start, start + 12)) + list(range(end - 16, end)) + [start + 100]
    for pos in rng:
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            p.write_bytes(bad)
            with pytest.raises((IntegrityError, KeyNotFound)):
                _read_all(p, _keys_for(MIXED))


def test_block_relabelled_to_another_known_version_fails(tmp_path):
    """The version is in the AAD and picks the key: relabelling fails the tag."""
    blob = bytearray.fromhex(MIXED["file"])
    sbs = 4096 + fmt.OVERHEAD
    trailer = fmt.HEADER_SIZE + sbs - 4  # block 0: version 1
    for v in (2, 3):
        bad = bytearray(blob)
        bad[trailer:trailer + 4] = struct.pack("<I", v)
        p = tmp_path / f"t{v}.taka"
        p.write_bytes(bad)
        with pytest.raises(IntegrityError, match="block 0 failed authentication"):
            _read_all(p, _keys_for(MIXED))


def test_block_version_outside_the_header_range_fails(tmp_path):
    """A block older than the header's oldest version (e.g. put back from before a
    rekey) is refused before any key of that version is asked for."""
    v = next(x for x in V2 if x["name"] == "v2-mixed-hole")  # versions 4..5
    blob = bytearray.fromhex(v["file"])
    sbs = 4096 + fmt.OVERHEAD
    trailer = fmt.HEADER_SIZE + sbs - 4
    asked = []

    def keys(name, version):
        asked.append(version)
        return bytearray(32)

    for bad_version in (3, 6, 0xFFFFFFFF):
        bad = bytearray(blob)
        bad[trailer:trailer + 4] = struct.pack("<I", bad_version)
        p = tmp_path / "t.taka"
        p.write_bytes(bad)
        asked.clear()
        with pytest.raises(IntegrityError, match="outside the file's versions 4..5"):
            with TakaFile.open(p, _keys_for(v)) as f:
                f.read(0, 10)
    assert 3 not in asked


def test_a_zeroed_version_is_not_a_hole(tmp_path):
    """A block whose version field alone was zeroed is not skipped as a hole: every
    reader (whichever run of versions it falls in) fails it, never shows other bytes."""
    blob = bytes.fromhex(MIXED["file"])
    sbs = 4096 + fmt.OVERHEAD
    for block in (0, 2, 4):
        bad = bytearray(blob)
        end = min(len(bad), fmt.HEADER_SIZE + (block + 1) * sbs)
        bad[end - 4:end] = bytes(4)
        p = tmp_path / f"z{block}"
        p.write_bytes(bad)
        with pytest.raises(IntegrityError):
            _read_all(p, _keys_for(MIXED))
        with pytest.raises(IntegrityError):
            decrypt_file(str(p), str(tmp_path / "out"), _keys_for(MIXED))


def test_holes_before_and_between_versions(tmp_path):
    p = tmp_path / "f"
    with TakaFile.create(p, "db", 1, vkey("db", 1), format_version=2) as f:
        f.write(2 * 4096, b"a" * 4096)
    with TakaFile.open(p, vkey, writable=True, write_version=2) as f:
        f.write(5 * 4096, b"b" * 100)
    assert stored_versions(p) == [None, None, 1, None, None, 2]
    with TakaFile.open(p, vkey) as f:
        assert f.read(0, 1 << 20) == bytes(8192) + b"a" * 4096 + bytes(8192) + b"b" * 100


def test_swapped_blocks_fail(tmp_path):
    blob = bytearray.fromhex(MIXED["file"])
    sbs = 4096 + fmt.OVERHEAD
    b1 = slice(fmt.HEADER_SIZE + sbs, fmt.HEADER_SIZE + 2 * sbs)
    b3 = slice(fmt.HEADER_SIZE + 3 * sbs, fmt.HEADER_SIZE + 4 * sbs)  # both version 3
    blob[b1], blob[b3] = blob[b3], blob[b1]
    p = tmp_path / "t.taka"
    p.write_bytes(blob)
    with pytest.raises(IntegrityError, match="block 1 failed"):
        _read_all(p, _keys_for(MIXED))


# header parser (its mutation fuzzing: tests/test_format.py, for both versions) -------------

_VALID = bytes.fromhex(MIXED["file"])[:fmt.HEADER_SIZE]


@given(version=st.integers(1, 2**32 - 1), back=st.integers(0, 2**32), size=st.integers(0, 2**40),
       enc=st.integers(0, 2**32 - 1))
def test_header_round_trip(version, back, size, enc):
    oldest = max(1, version - back)
    h = fmt.Header(key_id="k", key_version=version, plaintext_size=size, encryptions=enc,
                   version=2, oldest_version=oldest)
    h2 = fmt.parse_header(h.pack(b"m" * 32))
    assert h2 == h
    h2.verify(b"m" * 32)


def test_header_rejects_bad_v2_values():
    with pytest.raises(FormatError, match="oldest"):
        fmt.Header(key_id="k", key_version=2, version=2, oldest_version=3)
    with pytest.raises(FormatError, match="encryption count"):
        fmt.Header(key_id="k", key_version=2, version=2, encryptions=1 << 32)
    body = bytearray(_VALID)
    body[108:112] = struct.pack("<I", 0)
    with pytest.raises(FormatError, match="oldest"):
        fmt.parse_header(bytes(body))
    body[108:112] = struct.pack("<I", 4)  # newer than the write version 3
    with pytest.raises(FormatError, match="oldest"):
        fmt.parse_header(bytes(body))
    body[4] = 3
    with pytest.raises(FormatError, match="unsupported TAKA version 3"):
        fmt.parse_header(bytes(body))


# writers: rewritten blocks move to the new version at once ----------------------------

SECRET = os.urandom(32)


def vkey(name, version):
    return bytearray(hashlib.sha256(SECRET + struct.pack("<I", version)).digest())


def stored_versions(path, bs=4096):
    """The version in each stored block's trailer (None for a hole)."""
    raw = Path(path).read_bytes()
    h = fmt.parse_header(raw)
    out = []
    sbs = bs + fmt.OVERHEAD
    for i in range(h.nblocks):
        start = fmt.HEADER_SIZE + i * sbs
        n = min(h.plaintext_size - i * bs, bs)
        blk = raw[start:start + n + fmt.OVERHEAD]
        out.append(None if not any(blk) else struct.unpack("<I", blk[-4:])[0])
    return out


def test_rewritten_blocks_use_the_new_version(tmp_path):
    p = tmp_path / "f"
    data = bytearray(os.urandom(3 * 4096 + 50))
    with TakaFile.create(p, "db", 1, vkey("db", 1), format_version=2) as f:
        f.write(0, data)
    assert stored_versions(p) == [1, 1, 1, 1]
    with TakaFile.open(p, vkey, writable=True, write_version=2) as f:
        assert f.header.key_version == 1  # nothing written yet: the file is unchanged
        f.write(4096 + 10, b"new")
        data[4096 + 10:4096 + 13] = b"new"
        h = f.header
        assert (h.key_version, h.oldest_version, h.encryptions) == (2, 1, fmt.NONCE_CHUNK)
    assert stored_versions(p) == [1, 2, 1, 1]
    with TakaFile.open(p, vkey, writable=True, write_version=3) as f:
        f.write(3 * 4096 + 40, b"tail!!!!!!!!!!!")  # the last block, growing
        data[3 * 4096 + 40:] = b"tail!!!!!!!!!!!"
    assert stored_versions(p) == [1, 2, 1, 3]
    h = fmt.parse_header(p.read_bytes())
    assert (h.key_version, h.oldest_version) == (3, 1)
    with TakaFile.open(p, vkey) as f:
        assert f.read(0, 1 << 20) == data
    decrypt_file(str(p), str(tmp_path / "out"), vkey)
    assert (tmp_path / "out").read_bytes() == data
    # usage counts the file under every version it may use
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        u = usage(fd, "db")
    finally:
        os.close(fd)
    assert u["versions"] == {1: 1, 2: 1, 3: 1}


def test_truncate_to_zero_drops_old_versions(tmp_path):
    p = tmp_path / "f"
    with TakaFile.create(p, "db", 1, vkey("db", 1), format_version=2) as f:
        f.write(0, os.urandom(9000))
    with TakaFile.open(p, vkey, writable=True, write_version=2) as f:
        f.write(0, b"x")
        f.truncate(0)
        assert (f.header.key_version, f.header.oldest_version) == (2, 2)
        f.write(0, b"fresh")
    assert stored_versions(p) == [2]
    h = fmt.parse_header(p.read_bytes())
    assert (h.key_version, h.oldest_version) == (2, 2)


def test_empty_file_moves_whole(tmp_path):
    p = tmp_path / "f"
    TakaFile.create(p, "db", 1, vkey("db", 1), format_version=2).close()
    with TakaFile.open(p, vkey, writable=True, write_version=4) as f:
        f.write(0, b"abc")
    h = fmt.parse_header(p.read_bytes())
    assert (h.key_version, h.oldest_version) == (4, 4)


def test_v1_file_keeps_its_version(tmp_path):
    """v1 has one key version per file: write_version does not apply (a rekey moves it)."""
    p = tmp_path / "f"
    with TakaFile.create(p, "db", 1, vkey("db", 1)) as f:
        f.write(0, b"a" * 5000)
    with TakaFile.open(p, vkey, writable=True, write_version=2) as f:
        f.write(0, b"b")
    h = fmt.parse_header(p.read_bytes())
    assert (h.version, h.key_version) == (1, 1)


class TakaV2Model(test_cryptofile.TakaModel):
    """test_cryptofile's random write/truncate/read/reopen sequences on a v2 file, with
    rotations: blocks written since the last rotation must carry the new version."""

    @initialize()
    def setup(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "f.taka")
        self.version = 1
        self.f = TakaFile.create(self.path, "model", 1, vkey("model", 1), block_size=self.BS,
                                 format_version=2)
        self.model = bytearray()
        self.fresh: set[int] = set()  # blocks written since the last rotation

    @rule(offset=test_cryptofile.TakaModel.offsets, data=st.binary(min_size=1, max_size=1300))
    def write(self, offset, data):
        super().write(offset, data)
        self.fresh.update(range(offset // self.BS, (offset + len(data) - 1) // self.BS + 1))

    @rule()
    def reopen(self):
        self.f.close()
        self.f = TakaFile.open(self.path, vkey, writable=True, write_version=self.version)

    @rule()
    def rotate(self):
        self.version += 1
        self.fresh.clear()
        self.reopen()

    @invariant()
    def versions_agree(self):
        if not hasattr(self, "f"):
            return
        vers = stored_versions(self.path, self.BS)
        h = fmt.parse_header(Path(self.path).read_bytes())
        for i, v in enumerate(vers):
            if v is not None:
                assert v in h.versions
            if i in self.fresh and v is not None:
                assert v == self.version, (i, vers)

    def teardown(self):
        if hasattr(self, "f"):
            self.f.close()
            out = os.path.join(self.dir, "out")
            decrypt_file(self.path, out, vkey)
            assert Path(out).read_bytes() == bytes(self.model)
            shutil.rmtree(self.dir)


TestTakaV2Model = TakaV2Model.TestCase
TestTakaV2Model.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
