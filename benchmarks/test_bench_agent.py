"""Issue 4 benchmark: POLICY_CHECK round trips through the agent's request handler,
(1) through the in-process ring from native C producer threads and (2) over the
SOCK_SEQPACKET socket from client processes; cache hits and misses; 1 and 8 clients.
Target: >= 50k round trips/s through the ring on one core with hits.  Printed, never
asserted.  Results: benchmark.extra_info and benchmarks/results/agent-latest.json.

Ring rounds: the C producers send fixed records and check that each reply echoes its
request (the ring's load generator); the consumer runs the agent's full request handler
on a real POLICY_CHECK message for every record it drains (parse, cache lookup or policy
evaluation, answer encoding) and then echoes the record.  So each round trip carries the
handler's real work; only the bytes on the wire are the load generator's.
"""

import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from takakrypt import procinfo, ringserver
from takakrypt import protocol as P
from takakrypt._ring import Ring, _start_producers

uvloop = pytest.importorskip("uvloop")

OUT = Path(__file__).parent / "results" / "agent-latest.json"
RESULTS: dict[str, dict] = {}
ROUNDS = 3
TOTAL = {1: 20000, 8: 40000}
GP = "/srv/bench-guard"


def _agent(tmp: Path):
    from takakrypt.agent.daemon import Agent
    from takakrypt.agent.handler import RequestHandler
    from takakrypt.agent.keymanager import KeyManager, open_backend
    from takakrypt.keys import generate_master_key_file, open_keystore
    from takakrypt._cache import DecisionCache

    mk = tmp / "mk"
    generate_master_key_file(str(mk))
    with open_keystore(str(tmp / "ks.json"), master_key_file=str(mk), create=True) as ks:
        ks.create("k")
    cfg = {"keys": {"backend": "local", "local": {"path": str(tmp / "ks.json"),
                                                  "master_key_file": str(mk)}},
           "agent": {"control_socket": str(tmp / "c.sock"), "protocol_socket": str(tmp / "a.sock"),
                     "pid_file": str(tmp / "pid")},
           "process_sets": {"py": {"executables": [os.path.realpath(sys.executable)]}},
           "policies": {"p": {"rules": [{"process_set": "py", "actions": ["read_ops"],
                                          "effects": ["permit", "apply_key"]}]}},
           "guard_points": [{"path": GP, "policy": "p", "key": "k"}]}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    agent = Agent(str(tmp / "c.yaml"))
    agent.keys = KeyManager(open_backend(agent.config.keys))
    agent.cache = DecisionCache()
    agent.handler = RequestHandler(agent)
    return agent


def _policy_msg(seq: int, *, cached: bool) -> bytes:
    me = procinfo.inspect(os.getpid())
    st = os.stat(f"/proc/{os.getpid()}/exe")
    return P.encode(P.request(P.PolicyCheckRequest(
        pid=me.pid, uid=os.getuid(), gid=os.getgid(), action=P.Action.READ,
        path=f"{GP}/base/16384/1259", process=me.exe, cwd="/", tid=me.pid,
        start_time=me.start_time if cached else 0, exe_dev=st.st_dev, exe_ino=st.st_ino), seq))


def _ring_round(agent, nthreads: int, hit: bool) -> dict:
    loop = uvloop.new_event_loop()
    ring = Ring(slots=1024)
    n = TOTAL[nthreads] // nthreads
    msg = _policy_msg(1, cached=hit)
    handler = agent.handler
    first = loop.run_until_complete(handler.handle(msg))
    assert P.decode(first).payload.effects & P.Effect.PERMIT
    if hit:
        assert handler.fast_policy_hit(msg) is not None

    def serve(record: bytes):
        reply = handler.handle_ring(msg)  # bytes for a cache hit, else a coroutine
        if isinstance(reply, bytes):
            return record
        return _finish(reply, record)

    async def _finish(coro, record: bytes) -> bytes:
        reply = await coro
        if reply is None or len(reply) < 72:
            raise RuntimeError("no answer")
        return record

    async def main():
        srv = ringserver.attach(loop, ring, serve)
        h = _start_producers(ring, nthreads, n, 200, timeout=30)
        while not h.done():
            await asyncio.sleep(0.005)
        srv.close()
        return h.join()

    try:
        res = loop.run_until_complete(main())
    finally:
        loop.close()
    assert res["ok"] == nthreads * n, res
    return {"round_trips": res["ok"], "rt_per_s": res["ok"] / (res["elapsed_ns"] / 1e9),
            "p50_us": res["p50_ns"] / 1e3, "p99_us": res["p99_ns"] / 1e3}


def _median(rounds):
    rounds = sorted(rounds, key=lambda r: r["rt_per_s"])
    return dict(rounds[len(rounds) // 2], rounds=[round(r["rt_per_s"]) for r in rounds])


@pytest.mark.parametrize("hit", [True, False], ids=["hit", "miss"])
@pytest.mark.parametrize("nthreads", [1, 8])
def test_ring_policy_check(benchmark, tmp_path, nthreads, hit):
    agent = _agent(tmp_path)
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(_ring_round(agent, nthreads, hit)),
                       rounds=ROUNDS, iterations=1)
    RESULTS[f"ring_{'hit' if hit else 'miss'}_{nthreads}"] = r = _median(rounds)
    benchmark.extra_info.update(r)


def _client(path: str, n: int, hit: bool, q) -> None:
    from takakrypt.agent.client import AgentClient

    c = AgentClient(path)
    msg_start = procinfo.inspect(os.getpid()).start_time if hit else 0
    st = os.stat(f"/proc/{os.getpid()}/exe")
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter_ns()
        r = c.policy_check(path=f"{GP}/base/16384/1259", action="read",
                           process=os.path.realpath(sys.executable), start_time=msg_start,
                           exe_dev=st.st_dev, exe_ino=st.st_ino, tid=os.getpid())
        lat.append(time.perf_counter_ns() - t)
        if not (r.ok and r.payload.effects & P.Effect.PERMIT):
            raise SystemExit(f"bad answer {r}")
    q.put((n, time.perf_counter() - t0, lat))


def _socket_round(agent, nclients: int, hit: bool) -> dict:
    from takakrypt.agent.transports import SeqpacketServer

    loop = uvloop.new_event_loop()
    path = str(Path(agent.config_path).parent / "a.sock")
    srv = SeqpacketServer(path, agent.handler, agent)
    loop.run_until_complete(srv.start())
    n = TOTAL[min(nclients, 8)] // nclients // 4
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(path, n, hit, q)) for _ in range(nclients)]

    async def main():
        for p in procs:
            p.start()
        out = []
        while len(out) < nclients:
            await asyncio.sleep(0.01)
            while not q.empty():
                out.append(q.get())
        return out

    t0 = time.perf_counter()
    try:
        outs = loop.run_until_complete(main())
        elapsed = time.perf_counter() - t0
        loop.run_until_complete(srv.close())
    finally:
        loop.close()
        for p in procs:
            p.join(10)
    lat = sorted(x for _, _, lats in outs for x in lats)
    total = sum(c for c, _, _ in outs)
    return {"round_trips": total, "rt_per_s": total / max(t for _, t, _ in outs),
            "p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[len(lat) * 99 // 100] / 1e3,
            "wall_s": elapsed}


@pytest.mark.parametrize("hit", [True, False], ids=["hit", "miss"])
@pytest.mark.parametrize("nclients", [1, 8])
def test_seqpacket_policy_check(benchmark, tmp_path, nclients, hit):
    agent = _agent(tmp_path)
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(_socket_round(agent, nclients, hit)),
                       rounds=ROUNDS, iterations=1)
    RESULTS[f"seqpacket_{'hit' if hit else 'miss'}_{nclients}"] = r = _median(rounds)
    benchmark.extra_info.update(r)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    from conftest import REPORT

    if not RESULTS:
        return
    REPORT.append("")
    REPORT.append("POLICY_CHECK round trips (median of rounds):")
    for name in sorted(RESULTS):
        r = RESULTS[name]
        target = ""
        if name == "ring_hit_1":
            target = "  target >= 50k/s: " + ("MET" if r["rt_per_s"] >= 50000 else "NOT MET")
        REPORT.append(f"  {name:<22} {r['rt_per_s']:>9.0f}/s  p50 {r['p50_us']:7.1f} us  "
                      f"p99 {r['p99_us']:7.1f} us{target}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(RESULTS, indent=1))
