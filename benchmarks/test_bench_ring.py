"""Request ring benchmark: native producer threads -> event loop -> reply.

(a) C producer threads -> takakrypt._ring -> uvloop consumer (ringserver, trivial echo
    handler) -> reply; 1 and 8 producers, one request in flight per producer.
(b) baseline, same loop and handler: Python threads doing
    loop.call_soon_threadsafe + concurrent.futures.Future (b), and
    asyncio.run_coroutine_threadsafe with an async echo handler (b_coro).
(c) extra: Python threads using Ring.submit_and_wait (the ring's Python producer path).

Reports round trips per second and p50/p99 latency (ns; (a) measured in C, the rest
with perf_counter_ns) in benchmark.extra_info, prints the ratios (a)/(b) and writes
benchmarks/results/ring-latest.json.  Nothing here asserts a speed.

Run: .venv/bin/python -m pytest benchmarks/test_bench_ring.py --benchmark-only
"""

import asyncio
import concurrent.futures
import json
import os
import platform
import threading
import time
from pathlib import Path

import pytest

from takakrypt import ringserver
from takakrypt._ring import Ring, _start_producers
from takakrypt.bench.machine import cpu_model

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

PAYLOAD = 200  # a typical TAKA request: 32-byte header + path + identity
TOTAL = {1: 20000, 8: 40000}  # round trips per measurement round
ROUNDS = 5
RESULTS: dict[str, dict] = {}
OUT = Path(__file__).parent / "results" / "ring-latest.json"

pytestmark = pytest.mark.skipif(uvloop is None, reason="uvloop not installed")


def echo(p: bytes) -> bytes:
    return p


async def echo_async(p: bytes) -> bytes:
    return p


def percentiles(lat: list[int]) -> dict[str, int]:
    lat.sort()
    n = len(lat) - 1
    return {"p50_ns": lat[n * 50 // 100], "p99_ns": lat[n * 99 // 100]}


def best_of(rounds: list[dict]) -> dict:
    """The median round by throughput (the machine is shared and noisy)."""
    rounds = sorted(rounds, key=lambda r: r["rt_per_s"])
    med = dict(rounds[len(rounds) // 2])
    med["rt_per_s_rounds"] = [round(r["rt_per_s"]) for r in rounds]
    return med


def record(benchmark, name: str, rounds: list[dict]) -> None:
    res = best_of(rounds)
    RESULTS[name] = res
    benchmark.extra_info.update(res)


# -- (a) native producers through the ring ---------------------------------------------


def ring_round(nthreads: int) -> dict:
    loop = uvloop.new_event_loop()
    ring = Ring(slots=1024)
    n = TOTAL[nthreads] // nthreads

    async def main():
        srv = ringserver.attach(loop, ring, echo)
        h = _start_producers(ring, nthreads, n, PAYLOAD, timeout=30)
        while not h.done():
            await asyncio.sleep(0.005)
        srv.close()
        return h.join()

    try:
        res = loop.run_until_complete(main())
    finally:
        loop.close()
    assert res["ok"] == nthreads * n, res
    st = ring.stats()
    return {"round_trips": res["ok"], "rt_per_s": res["ok"] / (res["elapsed_ns"] / 1e9),
            "p50_ns": res["p50_ns"], "p99_ns": res["p99_ns"], "max_ns": res["max_ns"],
            "wakeups_per_request": st["wakeups"] / st["submitted"]}


@pytest.mark.parametrize("nthreads", [1, 8])
def test_a_ring_native_producers(benchmark, nthreads):
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(ring_round(nthreads)), rounds=ROUNDS,
                       iterations=1)
    record(benchmark, f"a_ring_{nthreads}", rounds)


# -- (b) baseline: Python threads into the loop ----------------------------------------


def threads_round(nthreads: int, call, setup=None) -> dict:
    """`call(loop, payload)` makes one round trip from a Python thread; `setup(loop)`
    runs first on the loop thread and returns a teardown callable."""
    loop = uvloop.new_event_loop()
    teardown = setup(loop) if setup is not None else None
    n = TOTAL[nthreads] // nthreads
    lats: list[list[int]] = [[] for _ in range(nthreads)]
    payload = os.urandom(PAYLOAD)
    start = threading.Barrier(nthreads + 1)

    def worker(i):
        lat = lats[i]
        start.wait()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            if call(loop, payload) != payload:
                raise AssertionError("wrong answer")
            lat.append(time.perf_counter_ns() - t0)

    async def main():
        ths = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
        for t in ths:
            t.start()
        await loop.run_in_executor(None, start.wait)
        t0 = time.perf_counter_ns()
        while any(t.is_alive() for t in ths):
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter_ns() - t0
        for t in ths:
            t.join()
        return elapsed

    try:
        elapsed = loop.run_until_complete(main())
    finally:
        if teardown is not None:
            teardown()
        loop.close()
    allv = [x for lat in lats for x in lat]
    assert len(allv) == nthreads * n
    return {"round_trips": len(allv), "rt_per_s": len(allv) / (elapsed / 1e9),
            **percentiles(allv)}


def call_soon_threadsafe(loop, payload):
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def serve():
        fut.set_result(echo(payload))

    loop.call_soon_threadsafe(serve)
    return fut.result()


def run_coroutine_threadsafe(loop, payload):
    return asyncio.run_coroutine_threadsafe(echo_async(payload), loop).result()


@pytest.mark.parametrize("nthreads", [1, 8])
def test_b_threadsafe_futures(benchmark, nthreads):
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(threads_round(nthreads, call_soon_threadsafe)),
                       rounds=ROUNDS, iterations=1)
    record(benchmark, f"b_call_soon_threadsafe_{nthreads}", rounds)


@pytest.mark.parametrize("nthreads", [1, 8])
def test_b_run_coroutine_threadsafe(benchmark, nthreads):
    rounds: list[dict] = []
    benchmark.pedantic(
        lambda: rounds.append(threads_round(nthreads, run_coroutine_threadsafe)),
        rounds=ROUNDS, iterations=1)
    record(benchmark, f"b_run_coroutine_threadsafe_{nthreads}", rounds)


# -- (c) extra: Python threads through the ring ----------------------------------------


def ring_python_round(nthreads: int) -> dict:
    ring = Ring(slots=1024)

    def setup(loop):
        return ringserver.attach(loop, ring, echo).close

    return threads_round(nthreads, lambda loop, p: ring.submit_and_wait(p, timeout=30), setup)


@pytest.mark.parametrize("nthreads", [1, 8])
def test_c_ring_python_threads(benchmark, nthreads):
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(ring_python_round(nthreads)), rounds=ROUNDS,
                       iterations=1)
    record(benchmark, f"c_ring_python_threads_{nthreads}", rounds)


# -- report ----------------------------------------------------------------------------


def ratios() -> dict[str, float]:
    out = {}
    for n in (1, 8):
        a = RESULTS.get(f"a_ring_{n}")
        for base in ("call_soon_threadsafe", "run_coroutine_threadsafe"):
            b = RESULTS.get(f"b_{base}_{n}")
            if a and b:
                out[f"a/b {base} {n} producer(s): round trips/s"] = a["rt_per_s"] / b["rt_per_s"]
                out[f"b/a {base} {n} producer(s): p50 latency"] = b["p50_ns"] / a["p50_ns"]
    return out


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if not RESULTS:
        return
    rat = ratios()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "results": RESULTS, "ratios": rat, "payload_bytes": PAYLOAD, "rounds": ROUNDS,
        "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "uvloop": uvloop.__version__ if uvloop else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=1) + "\n")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    tr.write_line("")
    tr.write_line("request ring round trips (median round):")
    for name, r in RESULTS.items():
        tr.write_line(f"  {name:<36} {r['rt_per_s']:>10,.0f} rt/s  p50 {r['p50_ns'] / 1e3:7.1f} us"
                      f"  p99 {r['p99_ns'] / 1e3:8.1f} us")
    for label, v in rat.items():
        tr.write_line(f"  {label:<58} {v:6.2f}x")
    tr.write_line(f"  written: {OUT}")

