"""Issue 3 benchmark: policy evaluation, uncached (Python) and cached (C cache), with
the same 20-rule policy written in Cedar and evaluated by cedarpy as a peer reference.

Targets: uncached Python median <= 20 us; cached lookup <= 150 ns from C and <= 1 us
from Python; faster than Cedar uncached, far faster cached.  Printed, never asserted.
Run: make bench  (or: .venv/bin/python -m pytest benchmarks/test_bench_policy.py --benchmark-only -s)
"""

import datetime as dt
import json
import os

import cedarpy
import pytest
import yaml

from takakrypt import config, policy, procinfo
from takakrypt._cache import DecisionCache, _bench_lookup_loop

RESULTS: dict[str, float] = {}
UTC = dt.timezone.utc

# 20 rules; the benchmark request matches only the last one, so every engine has to
# look at all of them (Cedar always evaluates every policy anyway).
GROUPS = [f"team{i}" for i in range(19)]


def _config() -> config.Config:
    doc: dict = {"user_sets": {}, "process_sets": {}, "resource_sets": {}, "policies": {}}
    rules = []
    for i, g in enumerate(GROUPS):
        doc["user_sets"][f"u{i}"] = {"groups": [50000 + i]}
        doc["process_sets"][f"p{i}"] = {"executables": [f"/opt/app{i}/bin/*"]}
        doc["resource_sets"][f"r{i}"] = {"paths": [f"data{i}/**"]}
        rules.append({"user_set": f"u{i}", "process_set": f"p{i}", "resource_set": f"r{i}",
                      "actions": ["read_ops"], "effects": ["permit", "apply_key"]})
    doc["user_sets"]["dba"] = {"groups": [60000]}
    doc["process_sets"]["pg"] = {"executables": ["/usr/lib/postgresql/*/bin/postgres"]}
    doc["resource_sets"]["base"] = {"paths": ["base/**"]}
    rules.append({"user_set": "dba", "process_set": "pg", "resource_set": "base",
                  "actions": ["all_ops"], "effects": ["permit", "apply_key"]})
    doc["policies"]["bench"] = {"rules": rules}
    return config.loads(yaml.safe_dump(doc))


def _request() -> policy.Request:
    exe = "/usr/lib/postgresql/15/bin/postgres"
    p = procinfo.Process(pid=4242, start_time=123456, exe=exe, comm="postgres",
                         cmdline=(exe,), database="postgres")
    return policy.Request(uid=999, gid=60000, groups=(60000,), process=p, path="base/16384/1259",
                          action="read", when=dt.datetime(2026, 11, 23, 10, tzinfo=UTC))


CEDAR_POLICIES = "\n".join(
    [f'permit(principal in Group::"g{i}", action in [Action::"read", Action::"getattr", '
     f'Action::"list", Action::"getxattr"], resource) when {{ context.exe like "/opt/app{i}/bin/*" '
     f'&& resource.path like "data{i}/*" }};' for i in range(19)]
    + ['permit(principal in Group::"dba", action, resource) when { context.exe like '
       '"/usr/lib/postgresql/*/bin/postgres" && resource.path like "base/*" };'])
CEDAR_ENTITIES = [
    {"uid": {"type": "User", "id": "999"}, "attrs": {},
     "parents": [{"type": "Group", "id": "dba"}]},
    {"uid": {"type": "Group", "id": "dba"}, "attrs": {}, "parents": []},
    {"uid": {"type": "File", "id": "base/16384/1259"}, "attrs": {"path": "base/16384/1259"},
     "parents": []},
]
CEDAR_REQUEST = {"principal": 'User::"999"', "action": 'Action::"read"',
                 "resource": 'File::"base/16384/1259"',
                 "context": {"exe": "/usr/lib/postgresql/15/bin/postgres"}}


def test_python_uncached_20_rules(benchmark):
    eng = policy.Engine(_config())
    req = _request()
    d = eng.evaluate("bench", req)
    assert d.rule == 19 and d.apply_key  # same decision as Cedar below
    benchmark(eng.evaluate, "bench", req)
    RESULTS["python_uncached_us"] = benchmark.stats.stats.median * 1e6


def test_cedar_uncached_20_policies(benchmark):
    ps = cedarpy.PolicySet.from_str(CEDAR_POLICIES)
    ents = cedarpy.Entities.from_json_str(json.dumps(CEDAR_ENTITIES))
    r = cedarpy.is_authorized(CEDAR_REQUEST, ps, ents)
    assert r.decision == cedarpy.Decision.Allow
    benchmark(cedarpy.is_authorized, CEDAR_REQUEST, ps, ents)
    RESULTS["cedar_us"] = benchmark.stats.stats.median * 1e6


def test_cached_lookup_python(benchmark):
    c = DecisionCache()
    args = (999, 60000, 4242, 123456, 2049, 77, b"base/16384/1259", 1)
    c.insert(*args, 0b101, 19)
    assert c.lookup(*args) == (0b101, 19, 0, 0)
    benchmark(c.lookup, *args)
    RESULTS["python_cached_ns"] = benchmark.stats.stats.median * 1e9


def test_cached_lookup_c(benchmark):
    c = DecisionCache()
    ns = benchmark.pedantic(_bench_lookup_loop, args=(c, 2_000_000), kwargs={"path": b"base/16384/1259"},
                            rounds=5, iterations=1)
    samples = [_bench_lookup_loop(c, 2_000_000, path=b"base/16384/1259") for _ in range(5)]
    RESULTS["c_cached_ns"] = sorted(samples)[2]
    assert ns > 0


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report_lines()


def report_lines() -> None:
    """Summary lines, printed by benchmarks/conftest.py at the end of the run."""
    from conftest import REPORT

    r = RESULTS
    if not r:
        return
    lines = ["", "policy evaluation (medians):"]
    targets = [("python_uncached_us", "Python uncached, 20 rules", "us", 20.0),
               ("cedar_us", "cedarpy, 20 policies (peer)", "us", None),
               ("python_cached_ns", "cached lookup from Python", "ns", 1000.0),
               ("c_cached_ns", "cached lookup from C", "ns", 150.0)]
    for key, label, unit, target in targets:
        if key in r:
            verdict = "" if target is None else ("  target <= %g %s: %s" % (
                target, unit, "MET" if r[key] <= target else "NOT MET"))
            lines.append(f"  {label:<34} {r[key]:9.3f} {unit}{verdict}")
    if "cedar_us" in r and "python_uncached_us" in r:
        lines.append(f"  cedar / python uncached            {r['cedar_us'] / r['python_uncached_us']:9.2f}x")
    if "cedar_us" in r and "python_cached_ns" in r:
        lines.append(f"  cedar / python cached              {r['cedar_us'] * 1e3 / r['python_cached_ns']:9.1f}x")
    if "cedar_us" in r and "c_cached_ns" in r:
        lines.append(f"  cedar / C cached                   {r['cedar_us'] * 1e3 / r['c_cached_ns']:9.1f}x")
    REPORT.extend(lines)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/policy-latest.json", "w") as f:
        json.dump(r, f, indent=1)
