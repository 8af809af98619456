"""Issue 14 item 7d: what secure memory costs a cipher's life (a file's open makes one).

One cycle = BlockCipher(key) (tk_gcm_new: key expansion into a secure slot) + one 4 KiB
block encrypted + wipe() (tk_gcm_free: slot zeroed).  The same cycle with the schedule on
the plain heap (``_set_secure_memory(False)``, the old allocation) is measured in the same
run, rounds interleaved; the ratio prints at the end.
Run: .venv/bin/python -m pytest benchmarks/test_bench_secmem.py --benchmark-only
"""

import os
import time

import pytest

from takakrypt import _aesgcm
from takakrypt._aesgcm import BlockCipher, engines

KEY = os.urandom(32)
BLOCK = os.urandom(4096)
N = 20_000
RESULTS: dict[str, float] = {}


def _cycles(engine: str, n: int = N) -> float:
    """ns per new + encrypt + wipe cycle."""
    t = time.perf_counter_ns()
    for _ in range(n):
        c = BlockCipher(KEY, engine=engine)
        c.encrypt(BLOCK, b"", 0)
        c.wipe()
    return (time.perf_counter_ns() - t) / n


def _measure(engine: str, secure: bool) -> float:
    _aesgcm._set_secure_memory(secure)
    try:
        return _cycles(engine)
    finally:
        _aesgcm._set_secure_memory(True)


@pytest.mark.parametrize("engine", engines())
def test_cipher_lifecycle_secure_vs_heap(benchmark, engine):
    benchmark.pedantic(_cycles, args=(engine, 2000), rounds=3, iterations=1)
    secure, heap = [], []
    for _ in range(5):  # interleaved: drift on a shared machine hits both alike
        secure.append(_measure(engine, True))
        heap.append(_measure(engine, False))
    RESULTS[f"{engine} secure ns"] = sorted(secure)[2]
    RESULTS[f"{engine} heap ns"] = sorted(heap)[2]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    from conftest import REPORT

    lines = ["", "cipher new + 4 KiB encrypt + wipe (median of 5 x 20,000):"]
    for engine in engines():
        s, h = RESULTS.get(f"{engine} secure ns"), RESULTS.get(f"{engine} heap ns")
        if s and h:
            lines.append(f"  {engine:<8} secure memory {s:8.0f} ns   plain heap {h:8.0f} ns"
                         f"   secure / heap {s / h:5.2f}x")
    REPORT.extend(lines)
