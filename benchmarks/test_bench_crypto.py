"""Issue 2 benchmark: batched native AES-256-GCM vs pyca/cryptography, and the CLI.

(a) native batch over 4 KiB blocks     (b) pyca AESGCM.encrypt per 4 KiB block in a loop
(c) pyca AESGCM.encrypt on one 64 KiB buffer
Targets (single thread): (a) >= 3x (b), (a) >= 0.9x (c). Ratios print at the end.
Run: make bench   (or: .venv/bin/python -m pytest benchmarks --benchmark-only)
"""

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from takakrypt import format as fmt
from takakrypt._aesgcm import BlockCipher, engines

BS = 4096
KEY = os.urandom(32)
AAD = os.urandom(fmt.STATIC_SIZE)
BUF64K = os.urandom(64 * 1024)
BUF1M = os.urandom(1024 * 1024)


@pytest.mark.parametrize("engine", engines())
def test_a_native_batch_64k(benchmark, throughput, engine):
    c = BlockCipher(KEY, engine=engine)
    out = bytearray(len(BUF64K) + 16 * fmt.OVERHEAD)
    throughput(len(BUF64K))
    benchmark(c.encrypt_into, BUF64K, out, AAD, 0)


@pytest.mark.parametrize("engine", engines())
def test_a_native_batch_1m(benchmark, throughput, engine):
    c = BlockCipher(KEY, engine=engine)
    out = bytearray(len(BUF1M) + 256 * fmt.OVERHEAD)
    throughput(len(BUF1M))
    benchmark(c.encrypt_into, BUF1M, out, AAD, 0)


@pytest.mark.parametrize("engine", engines())
def test_a_native_decrypt_64k(benchmark, throughput, engine):
    c = BlockCipher(KEY, engine=engine)
    sealed = c.encrypt(BUF64K, AAD, 0)
    out = bytearray(len(BUF64K))
    throughput(len(BUF64K))
    benchmark(c.decrypt_into, sealed, out, AAD, 0)


def test_a_native_threads8_64k(benchmark, throughput):
    """8 threads, each encrypting its own 64 KiB batches: the GIL is released."""
    c = BlockCipher(KEY)
    outs = [bytearray(len(BUF64K) + 16 * fmt.OVERHEAD) for _ in range(8)]
    pool = ThreadPoolExecutor(8)

    def work(i):
        for _ in range(16):
            c.encrypt_into(BUF64K, outs[i], AAD, 0)

    def run():
        list(pool.map(work, range(8)))

    throughput(8 * 16 * len(BUF64K))
    benchmark(run)
    pool.shutdown()


def test_b_pyca_loop_4k(benchmark, throughput):
    """What a Python implementation of the format does per block: a fresh random
    nonce, the block's AAD, encrypt, and place nonce||ct||tag in the output."""
    a = AESGCM(KEY)
    view = memoryview(BUF64K)
    out = bytearray(len(BUF64K) + 16 * fmt.OVERHEAD)
    sbs = BS + fmt.OVERHEAD

    def loop():
        for i in range(len(view) // BS):
            nonce = os.urandom(12)
            ct = a.encrypt(nonce, view[i * BS:(i + 1) * BS], AAD + i.to_bytes(8, "little"))
            out[i * sbs:i * sbs + 12] = nonce
            out[i * sbs + 12:(i + 1) * sbs] = ct

    throughput(len(BUF64K))
    benchmark(loop)


def test_b0_pyca_bare_loop_4k(benchmark, throughput):
    """The most favourable loop for pyca: one fixed nonce, AADs built beforehand, no
    output assembly (not a usable implementation; a lower bound for (b))."""
    a = AESGCM(KEY)
    nonce = os.urandom(12)
    view = memoryview(BUF64K)
    blocks = [view[i:i + BS] for i in range(0, len(view), BS)]
    aads = [AAD + i.to_bytes(8, "little") for i in range(len(blocks))]

    def loop():
        for blk, aad in zip(blocks, aads):
            a.encrypt(nonce, blk, aad)

    throughput(len(BUF64K))
    benchmark(loop)


def test_c_pyca_single_64k(benchmark, throughput):
    a = AESGCM(KEY)
    nonce = os.urandom(12)
    throughput(len(BUF64K))
    benchmark(a.encrypt, nonce, BUF64K, AAD)


def test_cli_encrypt_1gib_tmpfs(benchmark, extra):
    """`takakrypt encrypt` of a 1 GiB file on tmpfs, end to end (process start included)."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as d:
        mk = os.path.join(d, "master.key")
        env = dict(os.environ, TAKAKRYPT_KEYSTORE=os.path.join(d, "ks.json"),
                   TAKAKRYPT_MASTER_KEY_FILE=mk)
        from takakrypt.keys import generate_master_key_file
        generate_master_key_file(mk)
        tk = [sys.executable, "-m", "takakrypt"]
        subprocess.run([*tk, "keys", "create", "bench"], env=env, check=True,
                       capture_output=True)
        src = os.path.join(d, "in")
        with open(src, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(chunk)
        size = os.path.getsize(src)

        def run_encrypt():
            subprocess.run([*tk, "encrypt", "-q", "--force", "--key", "bench", src,
                            os.path.join(d, "enc")], env=env, check=True)

        # reference: cp of the same file on the same tmpfs (new pages are slow on a VM)
        cps = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(["cp", src, os.path.join(d, "copy")], check=True)
            cps.append(time.perf_counter() - t)
            os.unlink(os.path.join(d, "copy"))
        extra["cp_1g_tmpfs"] = size / sorted(cps)[1] / 1e9
        benchmark.pedantic(run_encrypt, rounds=3, iterations=1)
        extra["cli_encrypt_1g"] = size / benchmark.stats.stats.median / 1e9
        t = time.perf_counter()
        subprocess.run([*tk, "decrypt", "-q", "--force", os.path.join(d, "enc"),
                        os.path.join(d, "out")], env=env, check=True)
        extra["cli_decrypt_1g"] = size / (time.perf_counter() - t) / 1e9
