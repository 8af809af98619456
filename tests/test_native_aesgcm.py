"""Tests of the native batched AES-256-GCM (takakrypt._aesgcm), both engines.

Reference: pyca/cryptography AESGCM; every stored block must equal
nonce ‖ AESGCM(key).encrypt(nonce, block, aad_prefix ‖ u64le(first_block + i)).
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from takakrypt import _aesgcm
from takakrypt._aesgcm import NONCE_SIZE, OVERHEAD, TAG_SIZE, BlockCipher, engines
from takakrypt.errors import IntegrityError

ENGINES = engines()
U64_MAX = 2**64 - 1


def test_engines_listed():
    assert "openssl" in ENGINES
    assert len(set(ENGINES)) == len(ENGINES)
    assert set(ENGINES) <= {"ipsecmb", "openssl"}
    # the fast engine is the default where it exists
    with BlockCipher(bytes(32)) as c:
        assert c.engine == ENGINES[0]
    assert (NONCE_SIZE, TAG_SIZE, OVERHEAD) == (12, 16, 28)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def nblocks_of(length: int, bs: int) -> int:
    return -(-length // bs)


def reference(key, pt, bs, aad, first, nonces) -> bytes:
    a = AESGCM(bytes(key))
    out = []
    for i in range(nblocks_of(len(pt), bs)):
        n = nonces[i * 12 : i * 12 + 12]
        block_aad = bytes(aad) + ((first + i) % 2**64).to_bytes(8, "little")
        out.append(n + a.encrypt(n, pt[i * bs : (i + 1) * bs], block_aad))
    return b"".join(out)


def split_stored(ct: bytes, bs: int) -> list[bytes]:
    s = bs + OVERHEAD
    return [ct[i : i + s] for i in range(0, len(ct), s)]


# ---------------------------------------------------------------------------------
# equivalence with pyca, both engines


@st.composite
def cases(draw):
    bs = draw(st.sampled_from([512, 4096, 65536]))
    nb_full = draw(st.integers(0, 5))
    partial = draw(st.sampled_from([0, 1, 15, 16, 17, bs // 2, bs - 1]))
    length = nb_full * bs + partial
    nb = nblocks_of(length, bs)
    first = draw(
        st.one_of(
            st.integers(0, 100),
            st.integers(0, U64_MAX),
            st.integers(U64_MAX - 8, U64_MAX),
        )
    )
    if nb:
        first = min(first, U64_MAX - nb + 1)
    seed = draw(st.integers(0, 2**32))
    return dict(
        bs=bs,
        pt=random.Random(seed).randbytes(length),
        key=draw(st.binary(min_size=32, max_size=32)),
        aad=draw(st.binary(min_size=0, max_size=256)),
        first=first,
        nonces=draw(st.binary(min_size=nb * 12, max_size=nb * 12)),
    )


@settings(deadline=None)
@given(cases())
def test_matches_pyca_both_engines(case):
    bs, pt, key, aad, first, nonces = (case[k] for k in ("bs", "pt", "key", "aad", "first", "nonces"))
    expected = reference(key, pt, bs, aad, first, nonces)
    results = {}
    for eng in ENGINES:
        with BlockCipher(key, block_size=bs, engine=eng) as c:
            ct = c.encrypt(pt, aad, first, nonces)
            assert ct == expected, eng
            results[eng] = ct
            out = bytearray(len(expected) + 5)
            assert c.encrypt_into(pt, out, aad, first, nonces) == len(expected)
            assert bytes(out[: len(expected)]) == expected
            assert out[len(expected) :] == bytes(5)
    # every engine decrypts every engine's output
    for eng in ENGINES:
        with BlockCipher(key, block_size=bs, engine=eng) as c:
            for ct in results.values():
                assert c.decrypt(ct, aad, first) == pt
                buf = bytearray(len(pt))
                assert c.decrypt_into(ct, buf, aad, first) == len(pt)
                assert buf == pt


def test_engines_identical_and_cross_decrypt():
    key = os.urandom(32)
    pt = os.urandom(3 * 4096 + 100)
    nonces = os.urandom(4 * 12)
    cts = {e: BlockCipher(key, engine=e).encrypt(pt, b"hdr", 7, nonces) for e in ENGINES}
    assert len(set(cts.values())) == 1
    # random nonces from one engine decrypt with the other
    for a in ENGINES:
        ct = BlockCipher(key, engine=a).encrypt(pt, b"hdr", 7)
        for b in ENGINES:
            assert BlockCipher(key, engine=b).decrypt(ct, b"hdr", 7) == pt


def test_known_answer_gcm_spec_vector(engine):
    # McGrew/Viega GCM spec test case 14 (AES-256, zero key/IV, one zero block), with
    # our AAD = 8-byte block index 0 instead of empty AAD, checked against pyca.
    key, nonce, pt = bytes(32), bytes(12), bytes(16)
    ct = BlockCipher(key, block_size=512, engine=engine).encrypt(pt, b"", 0, nonce)
    assert ct[12:28] == bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18")  # keystream only
    assert ct == nonce + AESGCM(key).encrypt(nonce, pt, bytes(8))


# ---------------------------------------------------------------------------------
# random nonces


def test_random_nonces_roundtrip_and_unique(engine):
    c = BlockCipher(os.urandom(32), block_size=512, engine=engine)
    pt = os.urandom(512 * 300 + 7)  # > 256 blocks: heap nonce buffer path
    seen = set()
    for _ in range(3):
        ct = c.encrypt(pt, b"a", 0)
        assert len(ct) == len(pt) + 301 * OVERHEAD
        nonces = [blk[:12] for blk in split_stored(ct, 512)]
        assert len(nonces) == 301
        assert bytes(12) not in nonces
        seen.update(nonces)
        assert c.decrypt(ct, b"a", 0) == pt
    assert len(seen) == 3 * 301  # distinct per block and per call
    small = {c.encrypt(b"x", b"", 0)[:12] for _ in range(50)}  # stack nonce path
    assert len(small) == 50 and bytes(12) not in small


def test_empty_plaintext(engine):
    c = BlockCipher(os.urandom(32), engine=engine)
    assert c.encrypt(b"", b"", 0) == b""
    assert c.encrypt(b"", b"", 0, b"") == b""
    assert c.encrypt_into(b"", bytearray(0), b"", U64_MAX) == 0
    assert c.decrypt(b"", b"", 0) == b""
    with pytest.raises(ValueError):
        c.encrypt(b"", b"", 0, bytes(12))


# ---------------------------------------------------------------------------------
# buffer types


def _mmap_of(data: bytes) -> mmap.mmap:
    m = mmap.mmap(-1, max(len(data), 1))
    m[: len(data)] = data
    return m


INPUT_TYPES = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": lambda d: memoryview(bytearray(d)),
    "memoryview_slice": lambda d: memoryview(b"xx" + d + b"yy")[2:-2],
    "mmap": _mmap_of,
    "numpy_u8": lambda d: np.frombuffer(d, dtype=np.uint8).copy(),
    "numpy_u32": lambda d: np.frombuffer(d, dtype=np.uint32).copy(),
    "numpy_2d": lambda d: np.frombuffer(d, dtype=np.uint8).copy().reshape(4, -1),
}


@pytest.mark.parametrize("kind", sorted(INPUT_TYPES))
def test_input_types(engine, kind):
    make = INPUT_TYPES[kind]
    key = os.urandom(32)
    pt = os.urandom(2 * 4096 + 4000)  # multiple of 16 so numpy_u32 / 2d reshape work
    nonces = os.urandom(36)
    aad = os.urandom(40)
    expected = reference(key, pt, 4096, aad, 3, nonces)
    k_obj, pt_obj, aad_obj, n_obj = make(key), make(pt), make(aad), make(nonces)
    c = BlockCipher(k_obj, engine=engine)
    assert c.encrypt(pt_obj, aad_obj, 3, n_obj) == expected
    out = bytearray(len(expected))
    assert c.encrypt_into(pt_obj, out, aad_obj, 3, n_obj) == len(expected)
    assert out == expected
    if kind.startswith("numpy"):  # numpy shapes need a multiple of 16 bytes
        padded = make(expected + bytes(-len(expected) % 16))
        ct_obj = memoryview(padded).cast("B")[: len(expected)]
    else:
        ct_obj = make(expected)
    assert c.decrypt(ct_obj, aad_obj, 3) == pt


def _out_bytearray(n):
    b = bytearray(n)
    return b, lambda: bytes(b)


def _out_mv_slice(n):
    b = bytearray(b"\xee" * (n + 20))
    return memoryview(b)[10 : 10 + n], lambda: (bytes(b[:10]) + bytes(b[-10:]) == b"\xee" * 20
                                              and bytes(b[10 : 10 + n]))


def _out_numpy(n):
    a = np.zeros(n, dtype=np.uint8)
    return a, lambda: a.tobytes()


def _out_mmap(n):
    m = mmap.mmap(-1, n)
    return m, lambda: m[:n]


OUTPUT_TYPES = {
    "bytearray": _out_bytearray,
    "memoryview_slice": _out_mv_slice,
    "numpy": _out_numpy,
    "mmap": _out_mmap,
}


@pytest.mark.parametrize("kind", sorted(OUTPUT_TYPES))
def test_output_types(engine, kind):
    key, pt, nonces = os.urandom(32), os.urandom(4096 + 1000), os.urandom(24)
    expected = reference(key, pt, 4096, b"p", 9, nonces)
    c = BlockCipher(key, engine=engine)
    out, read = OUTPUT_TYPES[kind](len(expected))
    assert c.encrypt_into(pt, out, b"p", 9, nonces) == len(expected)
    assert read() == expected
    out2, read2 = OUTPUT_TYPES[kind](len(pt))
    assert c.decrypt_into(expected, out2, b"p", 9) == len(pt)
    assert read2() == pt


def test_bad_buffers(engine):
    c = BlockCipher(os.urandom(32), engine=engine)
    strided = memoryview(bytearray(8192))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        c.encrypt(strided, b"", 0)
    with pytest.raises(ValueError, match="contiguous"):
        c.encrypt_into(b"abc", strided, b"", 0)
    with pytest.raises(ValueError, match="contiguous"):
        c.decrypt(np.zeros((64, 64), dtype=np.uint8)[:, ::2], b"", 0)
    with pytest.raises(ValueError, match="contiguous"):
        BlockCipher(memoryview(bytearray(64))[::2], engine=engine)
    with pytest.raises(ValueError, match="writable"):
        c.encrypt_into(b"abc", bytes(100), b"", 0)
    with pytest.raises(ValueError, match="writable"):
        c.decrypt_into(c.encrypt(b"abc", b"", 0), memoryview(bytes(100)), b"", 0)
    with pytest.raises(TypeError):
        c.encrypt("text", b"", 0)
    with pytest.raises(TypeError):
        c.encrypt(b"abc", None, 0)
    # out overlapping an input is refused
    buf = bytearray(8192)
    with pytest.raises(ValueError, match="overlap"):
        c.encrypt_into(memoryview(buf)[:100], memoryview(buf)[50:], b"", 0)
    ct = bytearray(c.encrypt(b"z" * 100, b"", 0))
    with pytest.raises(ValueError, match="overlap"):
        c.decrypt_into(ct, ct, b"", 0)


# ---------------------------------------------------------------------------------
# tampering


def _encrypt_fixture(engine, nb=4, bs=512, first=1000):
    key = os.urandom(32)
    c = BlockCipher(key, block_size=bs, engine=engine)
    pt = os.urandom(nb * bs - 100)
    return key, c, pt, bytearray(c.encrypt(pt, b"file-id", first)), first


@pytest.mark.parametrize("where", ["nonce", "ct_first", "ct_last", "tag"])
def test_tamper_bit_flip(engine, where):
    key, c, pt, ct, first = _encrypt_fixture(engine)
    bs = c.block_size
    blocks = split_stored(bytes(ct), bs)
    for k in range(len(blocks)):
        n = len(blocks[k]) - OVERHEAD
        pos = {"nonce": 5, "ct_first": 12, "ct_last": 12 + n - 1, "tag": 12 + n + 15}[where]
        bad = bytearray(ct)
        bad[k * (bs + OVERHEAD) + pos] ^= 0x10
        out = bytearray(b"\xaa" * len(pt))
        with pytest.raises(IntegrityError) as ei:
            c.decrypt_into(bad, out, b"file-id", first)
        assert ei.value.block == first + k
        assert str(ei.value) == f"block {first + k} failed authentication"
        assert out[: k * bs] == pt[: k * bs]
        assert out[k * bs :] == bytes(len(pt) - k * bs)
        with pytest.raises(IntegrityError) as ei:
            c.decrypt(bytes(bad), b"file-id", first)
        assert ei.value.block == first + k


def test_tamper_context(engine):
    key, c, pt, ct, first = _encrypt_fixture(engine)
    bs = c.block_size
    assert c.decrypt(ct, b"file-id", first) == pt
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(ct, b"file-iD", first)
    assert ei.value.block == first
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(ct, b"file-id" + b"\0", first)
    assert ei.value.block == first
    with pytest.raises(IntegrityError) as ei:  # whole run moved
        c.decrypt(ct, b"file-id", first + 1)
    assert ei.value.block == first + 1
    # block 2 moved to the position of block 1 (swap)
    s = bs + OVERHEAD
    swapped = ct[:s] + ct[2 * s : 3 * s] + ct[s : 2 * s] + ct[3 * s :]
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(swapped, b"file-id", first)
    assert ei.value.block == first + 1
    # a single stored block decrypted at its own index works, at another index not
    assert c.decrypt(ct[s : 2 * s], b"file-id", first + 1) == pt[bs : 2 * bs]
    with pytest.raises(IntegrityError):
        c.decrypt(ct[s : 2 * s], b"file-id", first)
    # truncation of the last stored block
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(ct[:-1], b"file-id", first)
    assert ei.value.block == first + 3
    for other in ENGINES:
        with pytest.raises(IntegrityError) as ei:
            BlockCipher(os.urandom(32), block_size=bs, engine=other).decrypt(ct, b"file-id", first)
        assert ei.value.block == first


def test_short_stored_block(engine):
    c = BlockCipher(os.urandom(32), block_size=512, engine=engine)
    ct = c.encrypt(os.urandom(1024 + 1), b"", 5)
    assert len(split_stored(ct, 512)[-1]) == 29
    assert len(c.decrypt(ct, b"", 5)) == 1025
    for cut in range(1, 30):  # last stored block 28 .. 0 bytes long (0 = no block)
        short = ct[:-cut]
        if cut == 29:
            assert c.decrypt(short, b"", 5) == c.decrypt(ct, b"", 5)[:1024]
            continue
        with pytest.raises(ValueError, match="stored block 7 is too short"):
            c.decrypt(short, b"", 5)
        with pytest.raises(ValueError, match="stored block 7"):
            c.decrypt_into(short, bytearray(2000), b"", 5)
    for n in range(1, 29):
        with pytest.raises(ValueError, match="stored block 0 "):
            c.decrypt(bytes(n), b"", 0, holes=True)


# ---------------------------------------------------------------------------------
# sparse holes


def test_holes(engine):
    bs = 512
    c = BlockCipher(os.urandom(32), block_size=bs, engine=engine)
    s = bs + OVERHEAD
    pt = os.urandom(3 * bs + 77)
    ct = bytearray(c.encrypt(pt, b"h", 0))
    ct[s : 2 * s] = bytes(s)  # block 1 is a hole
    ct[3 * s :] = bytes(len(ct) - 3 * s)  # partial last block is a hole
    out = bytearray(b"\x55" * len(pt))
    assert c.decrypt_into(ct, out, b"h", 0, holes=True) == len(pt)
    want = pt[:bs] + bytes(bs) + pt[2 * bs : 3 * bs] + bytes(77)
    assert out == want
    assert c.decrypt(ct, b"h", 0, holes=True) == want
    assert c.decrypt(bytes(3 * s), b"h", 0, holes=True) == bytes(3 * bs)
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(ct, b"h", 0)
    assert ei.value.block == 1
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(bytes(s), b"h", 42, holes=False)
    assert ei.value.block == 42
    # almost-zero block is not a hole
    nearly = bytearray(s)
    nearly[100] = 1
    with pytest.raises(IntegrityError) as ei:
        c.decrypt(bytes(s) + nearly, b"h", 0, holes=True)
    assert ei.value.block == 1


# ---------------------------------------------------------------------------------
# argument errors


def test_argument_errors(engine):
    for n in (0, 16, 31, 33, 64):
        with pytest.raises(ValueError, match="32 bytes"):
            BlockCipher(bytes(n), engine=engine)
    for bs in (0, -4096, 256, 1000, 4095, 2**21, 3 * 4096, 2**70):
        with pytest.raises(ValueError, match="block_size"):
            BlockCipher(bytes(32), block_size=bs, engine=engine)
    for bs in (512, 1024, 2**20):
        assert BlockCipher(bytes(32), block_size=bs, engine=engine).block_size == bs
    for name in ("foo", "OpenSSL", "", None):
        with pytest.raises(ValueError, match="engine"):
            BlockCipher(bytes(32), engine=name)
    c = BlockCipher(bytes(32), engine=engine)
    with pytest.raises(AttributeError):
        c.engine = "openssl"
    with pytest.raises(AttributeError):
        c.block_size = 512
    pt = bytes(5000)
    with pytest.raises(ValueError, match="too small"):
        c.encrypt_into(pt, bytearray(5000 + 2 * 28 - 1), b"", 0)
    assert c.encrypt_into(pt, bytearray(5000 + 2 * 28), b"", 0) == 5056
    ct = c.encrypt(pt, b"", 0)
    with pytest.raises(ValueError, match="too small"):
        c.decrypt_into(ct, bytearray(4999), b"", 0)
    for nn in (0, 12, 36, 25):
        with pytest.raises(ValueError, match="nonces"):
            c.encrypt(pt, b"", 0, bytes(nn))
    with pytest.raises(ValueError, match="nonces"):
        c.encrypt_into(pt, bytearray(6000), b"", 0, bytes(36))
    assert len(c.encrypt(pt, bytes(256), 0)) == 5056
    with pytest.raises(ValueError, match="aad_prefix"):
        c.encrypt(pt, bytes(257), 0)
    with pytest.raises(ValueError, match="aad_prefix"):
        c.decrypt(ct, bytes(257), 0)
    for fb in (-1, 2**64, 2**100):
        with pytest.raises(ValueError, match="first_block"):
            c.encrypt(pt, b"", fb)
        with pytest.raises(ValueError, match="first_block"):
            c.decrypt(ct, b"", fb)
    # first_block + nblocks - 1 must stay below 2**64
    assert c.decrypt(c.encrypt(pt, b"", U64_MAX - 1), b"", U64_MAX - 1) == pt
    with pytest.raises(ValueError, match="overflow"):
        c.encrypt(pt, b"", U64_MAX)
    with pytest.raises(ValueError, match="overflow"):
        c.decrypt(ct, b"", U64_MAX)
    with pytest.raises(TypeError):
        c.encrypt(pt, b"", 1.5)


def test_wipe(engine):
    key = os.urandom(32)
    c = BlockCipher(key, engine=engine)
    ct = c.encrypt(b"data", b"", 0)
    c.wipe()
    c.wipe()  # idempotent
    calls = [
        lambda: c.encrypt(b"data", b"", 0),
        lambda: c.encrypt_into(b"data", bytearray(100), b"", 0),
        lambda: c.decrypt(ct, b"", 0),
        lambda: c.decrypt_into(ct, bytearray(100), b"", 0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="cipher wiped"):
            call()
    assert "wiped" in repr(c)
    with BlockCipher(key, engine=engine) as c2:
        assert c2.decrypt(ct, b"", 0) == b"data"
    with pytest.raises(ValueError, match="cipher wiped"):
        c2.decrypt(ct, b"", 0)
    # the key object is not kept alive / referenced by the cipher
    kb = bytearray(key)
    c3 = BlockCipher(kb, engine=engine)
    kb[:] = bytes(32)  # mutating the caller's key has no effect
    assert c3.decrypt(ct, b"", 0) == b"data"
    assert sys.getrefcount(kb) == 2


def test_not_picklable():
    import pickle

    with pytest.raises((TypeError, pickle.PicklingError)):
        pickle.dumps(BlockCipher(bytes(32)))


def test_module_constants():
    assert _aesgcm.MAX_AAD_PREFIX == 256


# ---------------------------------------------------------------------------------
# threads


def _thread_worker(cipher_for, key, jobs, errors, bs):
    try:
        for pt, aad, first, nonces, expected in jobs:
            c = cipher_for()
            ct = c.encrypt(pt, aad, first, nonces)
            if ct != expected:
                raise AssertionError("ciphertext mismatch")
            if c.decrypt(ct, aad, first) != pt:
                raise AssertionError("roundtrip mismatch")
            rnd = c.encrypt(pt, aad, first)  # random nonces
            out = bytearray(len(pt))
            if c.decrypt_into(rnd, out, aad, first) != len(pt) or out != pt:
                raise AssertionError("random-nonce roundtrip mismatch")
            bad = bytearray(ct)
            if bad:
                bad[-1] ^= 1
                try:
                    c.decrypt(bad, aad, first)
                except IntegrityError as e:
                    if e.block != first + nblocks_of(len(pt), bs) - 1:
                        raise AssertionError("wrong failing block") from None
                else:
                    raise AssertionError("tamper not detected")
    except BaseException as e:  # reported to the main thread
        errors.append(e)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_many_threads(engine, shared):
    bs = 4096
    key = os.urandom(32)
    rng = random.Random(1234)
    per_thread = []
    for t in range(8):
        jobs = []
        for j in range(12):
            # mixes small batches (GIL kept) and >= 16 KiB batches (GIL released)
            length = rng.choice([0, 1, 4096, 5000, 20000, 70000, 200000])
            pt = rng.randbytes(length)
            aad = rng.randbytes(rng.randint(0, 64))
            first = rng.randint(0, 2**40)
            nonces = rng.randbytes(nblocks_of(length, bs) * 12)
            jobs.append((pt, aad, first, nonces, reference(key, pt, bs, aad, first, nonces)))
        per_thread.append(jobs)
    shared_cipher = BlockCipher(key, block_size=bs, engine=engine)
    errors: list[BaseException] = []
    threads = []
    for jobs in per_thread:
        if shared:
            cipher_for = lambda: shared_cipher  # noqa: E731
        else:
            own = BlockCipher(key, block_size=bs, engine=engine)
            cipher_for = lambda own=own: own  # noqa: E731
        threads.append(threading.Thread(target=_thread_worker,
                                        args=(cipher_for, key, jobs, errors, bs)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(len(j) for j in per_thread) == 96


def test_wipe_while_other_threads_run(engine):
    # wipe() from one thread while others are mid-call must not crash; calls that
    # started before the wipe complete correctly, later calls raise "cipher wiped".
    c = BlockCipher(os.urandom(32), engine=engine)
    pt = os.urandom(1 << 20)
    results: list[object] = []
    start = threading.Barrier(5)

    def run():
        start.wait()
        for _ in range(20):
            try:
                ct = c.encrypt(pt, b"", 0)
            except ValueError as e:
                results.append(str(e))
                return
            results.append(len(ct) == len(pt) + 256 * OVERHEAD)

    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    start.wait()
    c.wipe()
    for t in ts:
        t.join()
    assert results
    assert all(r is True or r == "cipher wiped" for r in results), results
    with pytest.raises(ValueError, match="cipher wiped"):
        c.encrypt(b"x", b"", 0)


def test_gil_released_during_big_batch(engine):
    """A second thread runs Python code while a big batch is being encrypted.

    With a huge switch interval CPython never forces a GIL hand-off, so the waiting
    thread can only run if the C call releases the GIL.  The negative control (a
    small batch, which keeps the GIL) shows the check can fail.  Not timing based:
    a release is detected when the waiting thread gets scheduled during any of up to
    20 big calls.
    """
    c = BlockCipher(os.urandom(32), engine=engine)
    big = bytes(32 << 20)
    big_out = bytearray(len(big) + (len(big) // 4096) * OVERHEAD)
    small = bytes(4096)

    def attempt(pt, out):
        ready, go = threading.Event(), threading.Event()
        progressed = []

        def waiter():
            ready.set()
            go.wait()  # blocks without the GIL; then needs the GIL to continue
            progressed.append(True)

        t = threading.Thread(target=waiter)
        t.start()
        ready.wait()
        go.set()  # waiter now wants the GIL, which we hold
        c.encrypt_into(pt, out, b"", 0)
        seen = bool(progressed)
        t.join()
        return seen

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        assert attempt(small, bytearray(5000)) is False  # GIL kept -> no progress
        assert any(attempt(big, big_out) for _ in range(20))
    finally:
        sys.setswitchinterval(old)


def test_nonces_differ_between_parent_and_forked_child():
    """The per-thread nonce pool is wiped on fork: a child never repeats the parent's
    next nonces (which it would if it inherited the buffered random bytes).  (The
    child makes its own cipher: an inherited one is wiped too, tests/test_secmem.py.)"""
    import os
    c = BlockCipher(b"\x01" * 32)
    c.encrypt(b"x" * 100, b"", 0)  # the pool is now filled in this thread
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cc = BlockCipher(b"\x01" * 32)
            nonces = b"".join(cc.encrypt(b"y", b"", 0)[:12] for _ in range(8))
            os.write(w, nonces)
        finally:
            os._exit(0)
    os.close(w)
    parent = b"".join(c.encrypt(b"y", b"", 0)[:12] for _ in range(8))
    child = b""
    while len(child) < 96:
        chunk = os.read(r, 96)
        if not chunk:
            break
        child += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 96
    pn = {parent[i:i + 12] for i in range(0, 96, 12)}
    cn = {child[i:i + 12] for i in range(0, 96, 12)}
    assert not pn & cn
