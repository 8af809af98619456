"""The Python hot paths of the performance gate, one per run, for callgrind.

    python pyhot.py PERFMARK_SO SIGNAL N

Sets the signal up and runs it once (caches filled on first use are not part of the
figure); then, under callgrind started with --instr-atstart=no, turns instrumentation
on (perfmark.c) and runs it N times, dumps the counts ("n"), runs it 2N times and
dumps again ("2n").  collect.py takes (2n - n) / N: the loop and the calls into
perfmark cost the same in both parts and cancel out, and the interpreter's start-up
and imports are never counted; the cyclic garbage collector is off while counting
(docs/performance.md, "Performance gate").
Imports takakrypt from PYTHONPATH (the tree being measured).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_policy_module():
    """benchmarks/test_bench_policy.py (its 20-rule policy and request), without
    running pytest; cedarpy (the benchmark's peer) is not needed here."""
    sys.modules.setdefault("cedarpy", type(sys)("cedarpy"))
    spec = importlib.util.spec_from_file_location("_bench_policy",
                                                  HERE.parent / "test_bench_policy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def policy_uncached() -> Callable[[], object]:
    from takakrypt import policy

    bp = _bench_policy_module()
    eng = policy.Engine(bp._config())
    req = bp._request()
    d = eng.evaluate("bench", req)
    assert d.rule == 19 and d.apply_key, d
    return lambda: eng.evaluate("bench", req)


def _policy_check_request():
    from takakrypt import protocol as P

    return P.request(P.PolicyCheckRequest(
        pid=4242, uid=999, gid=60000, action=P.Action.READ, path="/srv/pg/base/16384/1259",
        process="/usr/lib/postgresql/15/bin/postgres", cwd="/", tid=4242,
        start_time=123456, exe_dev=2049, exe_ino=77), 1, timestamp=1_700_000_000_000_000_000)


def protocol_encode() -> Callable[[], object]:
    from takakrypt import protocol as P

    msg = _policy_check_request()
    return lambda: P.encode(msg)


def protocol_decode() -> Callable[[], object]:
    from takakrypt import protocol as P

    raw = P.encode(_policy_check_request())
    assert P.decode(raw) == _policy_check_request()
    return lambda: P.decode(raw)


SIGNALS: dict[str, Callable[[], Callable[[], object]]] = {
    "policy_uncached": policy_uncached,
    "protocol_encode": protocol_encode,
    "protocol_decode": protocol_decode,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in SIGNALS:
        print(f"usage: pyhot.py PERFMARK_SO {{{','.join(SIGNALS)}}} N", file=sys.stderr)
        return 2
    mark = ctypes.CDLL(argv[0])
    begin, dump = mark.perf_begin, mark.perf_dump
    dump.argtypes = [ctypes.c_char_p]
    op = SIGNALS[argv[1]]()
    n = int(argv[2])
    op()
    loop1, loop2 = range(n), range(2 * n)
    # the cyclic GC runs every 700 allocations, so a region of N calls holds a varying
    # share of its passes; collections are not the hot path's own work: off while counted
    gc.collect()
    gc.disable()
    begin()
    for _ in loop1:
        op()
    dump(b"n")
    for _ in loop2:
        op()
    dump(b"2n")
    sys.stdout.flush()
    os._exit(0)  # no interpreter tear-down: less to subtract, nothing that varies


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
