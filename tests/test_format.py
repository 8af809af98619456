"""TAKA v1 format: known-answer vectors, header fuzzing (v2 headers too), tamper
detection.  Version 2: tests/test_format_v2.py."""

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from takakrypt import format as fmt
from takakrypt._aesgcm import BlockCipher
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import FormatError, IntegrityError
from takakrypt.stream import decrypt_file

from conftest import VECTORS


def _keys_for(v):
    def lookup(name, version):
        assert (name, version) == (v["key_id"], v["key_version"])
        return bytearray.fromhex(v["data_key"])
    return lookup


def _write(tmp_path, name, blob):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


# known answers -------------------------------------------------------------------------

def test_vector_header_fields(vector):
    blob = bytes.fromhex(vector["file"])
    h = fmt.parse_header(blob)
    assert h.key_id == vector["key_id"]
    assert h.key_version == vector["key_version"]
    assert h.file_id.hex() == vector["file_id"]
    assert h.block_size == vector["block_size"]
    assert h.plaintext_size == len(vector["plaintext"]) // 2
    assert h.stored_size == len(blob)


def test_vector_key_derivation(vector):
    enc, mac = fmt.derive_file_keys(bytearray.fromhex(vector["data_key"]),
                                    bytes.fromhex(vector["file_id"]))
    assert enc.hex() == vector["file_key"]
    assert mac.hex() == vector["mac_key"]


def test_vector_encrypt_reproduces_file(vector):
    """Our header packing + native batch cipher give the independent generator's bytes."""
    plaintext = bytes.fromhex(vector["plaintext"])
    h = fmt.Header(key_id=vector["key_id"], key_version=vector["key_version"],
                   file_id=bytes.fromhex(vector["file_id"]), block_size=vector["block_size"],
                   plaintext_size=len(plaintext))
    enc, mac = fmt.derive_file_keys(bytearray.fromhex(vector["data_key"]), h.file_id)
    nb = fmt.blocks_for(len(plaintext), h.block_size)
    for engine in ("ipsecmb", "openssl"):
        c = BlockCipher(enc, block_size=h.block_size, engine=engine)
        body = c.encrypt(plaintext, h.static, 0, nonces=bytes.fromhex(vector["nonces"])[:12 * nb])
        assert (h.pack(mac) + body).hex() == vector["file"], engine


def test_vector_decrypts(vector, tmp_path):
    p = _write(tmp_path, "v.taka", bytes.fromhex(vector["file"]))
    with TakaFile.open(p, _keys_for(vector)) as f:
        assert f.read(0, 1 << 30).hex() == vector["plaintext"]
    decrypt_file(str(p), str(tmp_path / "out"), _keys_for(vector))
    assert (tmp_path / "out").read_bytes().hex() == vector["plaintext"]


# header parser ------------------------------------------------------------------------

@given(st.binary(max_size=200))
def test_fuzz_header_random_bytes(data):
    try:
        h = fmt.parse_header(data)
    except FormatError:
        return
    assert len(data) >= fmt.HEADER_SIZE and data[:4] == b"TAKA"
    assert h.unsigned() == data[:fmt.TAG_OFFSET]


_VALID = bytes.fromhex(VECTORS[5]["file"])[:fmt.HEADER_SIZE]
# a v2 header of mixed block versions (tests/vectors/taka_v2.json, "v2-mixed")
_VALID_V2 = bytes.fromhex(next(
    v for v in json.loads((Path(__file__).parent / "vectors" / "taka_v2.json").read_text())
    ["vectors"] if v["name"] == "v2-mixed")["file"])[:fmt.HEADER_SIZE]


@pytest.mark.parametrize("valid", [_VALID, _VALID_V2], ids=["v1", "v2"])
@given(st.lists(st.tuples(st.integers(0, fmt.HEADER_SIZE - 1), st.integers(0, 255)),
                min_size=1, max_size=8), st.integers(0, fmt.HEADER_SIZE))
def test_fuzz_header_mutations(valid, edits, cut):
    data = bytearray(valid)
    for pos, val in edits:
        data[pos] = val
    data = bytes(data[:cut]) if cut < fmt.HEADER_SIZE else bytes(data)
    try:
        h = fmt.parse_header(data)
    except FormatError:
        return
    # whatever parses must serialise back to the same unsigned bytes
    assert h.unsigned() == data[:fmt.TAG_OFFSET]
    assert 1 <= h.oldest_version <= h.key_version


@given(key_id=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}", fullmatch=True),
       version=st.integers(1, 2**32 - 1), bs_log=st.integers(9, 20),
       size=st.integers(0, fmt.MAX_PLAINTEXT_SIZE), file_id=st.binary(min_size=16, max_size=16))
def test_header_round_trip(key_id, version, bs_log, size, file_id):
    h = fmt.Header(key_id=key_id, key_version=version, block_size=1 << bs_log,
                   plaintext_size=size, file_id=file_id)
    blob = h.pack(b"k" * 32)
    assert len(blob) == fmt.HEADER_SIZE
    h2 = fmt.parse_header(blob)
    assert h2 == h
    h2.verify(b"k" * 32)


def test_header_rejects_bad_values():
    with pytest.raises(FormatError):
        fmt.Header(key_id="", key_version=1)
    with pytest.raises(FormatError):
        fmt.Header(key_id="x" * 64, key_version=1)
    with pytest.raises(FormatError):
        fmt.Header(key_id="k", key_version=0)
    with pytest.raises(FormatError):
        fmt.Header(key_id="k", key_version=1, block_size=4095)
    with pytest.raises(FormatError, match="magic"):
        fmt.parse_header(b"NOPE" + bytes(124))
    with pytest.raises(FormatError, match="truncated"):
        fmt.parse_header(_VALID[:100])


# tamper: every header bit, every block ------------------------------------------------

TAMPER = VECTORS[5]  # three-blocks-partial


def test_every_header_bit_flip_is_detected(tmp_path):
    blob = bytes.fromhex(TAMPER["file"])
    keys = _keys_for_any(TAMPER)
    p = tmp_path / "t.taka"
    for byte in range(fmt.HEADER_SIZE):
        for bit in range(8):
            bad = bytearray(blob)
            bad[byte] ^= 1 << bit
            p.write_bytes(bad)
            with pytest.raises((FormatError, IntegrityError)):
                with TakaFile.open(p, keys) as f:
                    f.read(0, 1 << 20)


def _keys_for_any(v):
    """Key lookup that hands out the data key whatever (name, version) is asked, so a
    tampered key id/version is caught by the crypto, not by the lookup."""
    return lambda name, version: bytearray.fromhex(v["data_key"])


def _blocks(v):
    blob = bytes.fromhex(v["file"])
    h = fmt.parse_header(blob)
    return blob, h, [(h.block_offset(i), min(h.block_offset(i + 1), len(blob)))
                     for i in range(h.nblocks)]


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_every_block_tamper_names_block(tmp_path, where):
    blob, h, spans = _blocks(TAMPER)
    for k, (start, end) in enumerate(spans):
        pos = {"nonce": start + 3, "ciphertext": start + 12 + 7, "tag": end - 2}[where]
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        p = _write(tmp_path, f"b{k}.taka", bad)
        with TakaFile.open(p, _keys_for(TAMPER)) as f:
            with pytest.raises(IntegrityError) as ei:
                f.read(0, h.plaintext_size)
            assert ei.value.block == k
            # blocks other than k still read fine
            for j in range(h.nblocks):
                if j != k:
                    assert f.read(j * h.block_size, 10) == bytes.fromhex(
                        TAMPER["plaintext"])[j * h.block_size:j * h.block_size + 10]
        with pytest.raises(IntegrityError, match=f"block {k}"):
            decrypt_file(str(p), str(tmp_path / f"o{k}"), _keys_for(TAMPER))
        assert not (tmp_path / f"o{k}").exists()


def test_blocks_swapped_between_positions(tmp_path):
    blob, h, spans = _blocks(TAMPER)
    (a0, a1), (b0, b1) = spans[0], spans[1]
    bad = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    p = _write(tmp_path, "s.taka", bad)
    with TakaFile.open(p, _keys_for(TAMPER)) as f, pytest.raises(IntegrityError) as ei:
        f.read(0, h.plaintext_size)
    assert ei.value.block == 0


def test_block_moved_between_files_same_key(tmp_path):
    key = bytearray(os.urandom(32))
    paths = []
    for name in ("a", "b"):
        p = tmp_path / name
        with TakaFile.create(p, "k", 1, key) as f:
            f.write(0, name.encode() * 10000)
        paths.append(p)
    a, b = (p.read_bytes() for p in paths)
    h = fmt.parse_header(a)
    s0, s1 = h.block_offset(0), h.block_offset(1)
    mixed = b[:s0] + a[s0:s1] + b[s1:]  # block 0 of a into b, same position, same key
    paths[1].write_bytes(mixed)
    with TakaFile.open(paths[1], lambda n, v: bytearray(key)) as f, \
            pytest.raises(IntegrityError) as ei:
        f.read(0, 100)
    assert ei.value.block == 0


def test_dropped_last_block_is_detected(tmp_path):
    blob, h, spans = _blocks(TAMPER)
    p = _write(tmp_path, "d.taka", blob[:spans[-1][0]])
    with TakaFile.open(p, _keys_for(TAMPER)) as f:
        with pytest.raises(IntegrityError, match="truncated") as ei:
            f.read(0, h.plaintext_size)
        assert ei.value.block == h.nblocks - 1
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt_file(str(p), str(tmp_path / "o"), _keys_for(TAMPER))


def test_cut_inside_last_block_is_detected(tmp_path):
    blob, h, spans = _blocks(TAMPER)
    p = _write(tmp_path, "c.taka", blob[:-1])
    with pytest.raises(IntegrityError):
        decrypt_file(str(p), str(tmp_path / "o"), _keys_for(TAMPER))


def test_swapped_header_is_detected(tmp_path):
    key = bytearray(os.urandom(32))
    blobs = []
    for name in ("a", "b"):
        p = tmp_path / name
        with TakaFile.create(p, "k", 1, key) as f:
            f.write(0, os.urandom(10000))
        blobs.append(p.read_bytes())
    a, b = blobs
    p = _write(tmp_path, "x", a[:fmt.HEADER_SIZE] + b[fmt.HEADER_SIZE:])
    with TakaFile.open(p, lambda n, v: bytearray(key)) as f, pytest.raises(IntegrityError):
        f.read(0, 10000)


def test_wrong_key_fails_header(tmp_path):
    p = _write(tmp_path, "w.taka", bytes.fromhex(TAMPER["file"]))
    with pytest.raises(IntegrityError, match="header"):
        TakaFile.open(p, lambda n, v: bytearray(32))


def test_hole_reads_as_zeros(tmp_path):
    """Documented (docs/security.md): an all-zero stored block is a sparse hole."""
    blob, h, spans = _blocks(TAMPER)
    s, e = spans[1]
    p = _write(tmp_path, "h.taka", blob[:s] + bytes(e - s) + blob[e:])
    with TakaFile.open(p, _keys_for(TAMPER)) as f:
        assert f.read(h.block_size, h.block_size) == bytes(h.block_size)


def test_block_index_aad_layout():
    """AAD = static header (96 bytes) || uint64 LE block index, as documented."""
    v = VECTORS[4]
    blob = bytes.fromhex(v["file"])
    h = fmt.parse_header(blob)
    enc, _ = fmt.derive_file_keys(bytearray.fromhex(v["data_key"]), h.file_id)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    s = h.block_offset(1)
    block = blob[s:]
    pt = AESGCM(bytes(enc)).decrypt(block[:12], block[12:], blob[:96] + struct.pack("<Q", 1))
    assert pt == bytes.fromhex(v["plaintext"])[4096:]


def test_selftest_passes_and_detects_a_broken_engine(monkeypatch):
    from takakrypt import selftest
    from takakrypt.errors import NativeError
    selftest.run()
    monkeypatch.setattr(selftest, "_FILE_SHA256", "0" * 64)
    with pytest.raises(NativeError, match="self-test failed"):
        selftest.run()
