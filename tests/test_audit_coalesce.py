"""A denied caller must not be able to flush the audit trail: repeated events are
coalesced into one record plus a summary with the exact count, a caller's flood is rate
limited per uid, a new caller's first event is always written, and the summaries reach
the sinks on a timer and at shutdown without further events."""

import json
import os
import time

import pytest

from agent_helpers import base_config, running
from takakrypt.agent.client import AgentClient
from takakrypt.audit import AuditLogger, Coalescer, FileSink, access_event, system_event
from takakrypt.audit.config import load_audit_config


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def deny(uid=1000, pid=4242, path="/gp/secret", op="read"):
    return access_event(uid=uid, pid=pid, exe="/usr/bin/cat", path=path, operation=op,
                        decision="deny", effects=["deny", "audit"], policy="p", rule=-1,
                        reason="no rule matched (default deny)")


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def accounted(recs, **match):
    """Events represented by ``recs`` (a record each, or its summary's count)."""
    n = 0
    for r in recs:
        if any(r.get(k) != v for k, v in match.items()):
            continue
        n += r["detail"]["count"] if r["kind"] in ("coalesced", "rate-limited") else 1
    return n


def test_burst_of_identical_denies_is_one_record_and_one_exact_summary(tmp_path):
    log = tmp_path / "audit.jsonl"
    lg = AuditLogger([FileSink(str(log))],
                     coalescer=Coalescer(window=10, rate=20, burst=200, clock=Clock()))
    for _ in range(100_000):
        assert lg.log(deny())
    st = lg.stats()
    assert st["coalesced"] == 99_999 and st["open_windows"] == 1
    lg.close()
    recs = records(log)
    assert [r["kind"] for r in recs] == ["access", "coalesced"]
    first, summary = recs
    assert first["decision"] == "deny" and first["path"] == "/gp/secret"
    assert summary["detail"]["count"] == 99_999 and summary["detail"]["of"] == "access"
    assert summary["detail"]["first"] <= summary["detail"]["last"]
    for f in ("uid", "pid", "exe", "path", "operation", "decision", "policy", "rule"):
        assert summary[f] == first[f]


def test_flood_is_rate_limited_per_caller_and_a_new_caller_is_always_written(tmp_path):
    log = tmp_path / "audit.jsonl"
    clock = Clock()
    lg = AuditLogger([FileSink(str(log))], queue_size=100_000,
                     coalescer=Coalescer(window=10, rate=20, burst=200, clock=clock))
    for i in range(100_000):  # a new path each time: nothing to coalesce
        lg.log(deny(path=f"/gp/f{i}"))
        if i == 50_000:
            lg.log(deny(uid=1001, pid=5000, path="/gp/other"))
            lg.log(system_event("config-reload", "reloaded"))  # no caller: never held
            for _ in range(3):  # one record per key request, always
                lg.log(system_event("key-request", "key released", uid=1000, pid=4242,
                                    decision="permit", key="k1", key_version=1))
    clock.t += 1.0  # one second later: 20 more tokens for uid 1000
    for i in range(30):
        lg.log(deny(path=f"/gp/g{i}"))
    lg.close()
    recs = records(log)
    mine = [r for r in recs if r["uid"] == 1000 and r["kind"] == "access"]
    assert len(mine) == 200 + 20
    assert accounted(recs, uid=1000, kind="access") + accounted(
        recs, uid=1000, kind="rate-limited") == 100_030
    (other,) = [r for r in recs if r["uid"] == 1001]
    assert other["kind"] == "access" and other["path"] == "/gp/other"
    assert any(r["kind"] == "config-reload" for r in recs)
    assert len([r for r in recs if r["kind"] == "key-request"]) == 3
    limited = [r for r in recs if r["kind"] == "rate-limited"]
    assert len(limited) == 1 and limited[0]["uid"] == 1000
    assert limited[0]["detail"]["count"] == 100_030 - 220
    assert len(recs) < 240


def test_summary_is_written_on_the_timer_without_further_events(tmp_path):
    log = tmp_path / "audit.jsonl"
    lg = AuditLogger([FileSink(str(log))], coalescer=Coalescer(window=0.2))
    try:
        for _ in range(5):
            lg.log(deny())
        deadline = time.monotonic() + 30  # a bound on waiting, not a timing assertion
        while time.monotonic() < deadline:
            recs = records(log) if log.exists() else []
            if any(r["kind"] == "coalesced" for r in recs):
                break
            time.sleep(0.05)
        assert [r["kind"] for r in recs] == ["access", "coalesced"]
        assert recs[1]["detail"]["count"] == 4
        assert lg.stats()["open_windows"] == 0
    finally:
        lg.close()
    assert len(records(log)) == 2  # nothing counted twice at close


def test_no_coalescer_keeps_every_record(tmp_path):
    log = tmp_path / "audit.jsonl"
    with AuditLogger([FileSink(str(log))],
                     coalescer=Coalescer(window=0, rate=0)) as lg:
        for _ in range(50):
            lg.log(deny())
    assert len(records(log)) == 50


def test_config_defaults_and_errors():
    cfg = load_audit_config({})
    assert cfg.coalesce.window_seconds == 10 and cfg.rate_limit.per_caller == 5
    assert cfg.rate_limit.burst == 200
    from takakrypt.errors import ConfigError
    with pytest.raises(ConfigError, match=r"\$\.audit\.rate_limit\.burst"):
        load_audit_config({"rate_limit": {"burst": 0}})
    with pytest.raises(ConfigError, match=r"\$\.audit\.coalesce\.window_seconds"):
        load_audit_config({"coalesce": {"window_seconds": -1}})


def test_agent_coalesces_a_denied_callers_retries(tmp_path):
    """The real agent with its default audit settings: 3000 denied retries of one file
    by uid 1000 (decision-cache hits after the first) leave a handful of records."""
    from test_agent_protocol import _identity

    cfg = base_config(tmp_path)
    (tmp_path / "gp").mkdir()
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1"}]
    n = 3000
    with running(tmp_path, cfg) as d:
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            ident = _identity()
            for _ in range(n):
                r = c.policy_check(path=str(tmp_path / "gp" / "f"), action="write",
                                   uid=1000, gid=1000, **ident)
                assert r.ok
        st = json.loads(d.cli("audit", "stats", "--json").stdout)
        assert st["coalesced"] >= 1
    recs = [r for r in records(tmp_path / "audit.jsonl") if r["uid"] == 1000]
    assert accounted(recs) == n
    assert len(recs) <= 2 * 10  # one record and one summary per 10 s window
    assert recs[0]["kind"] == "access" and recs[0]["decision"] == "deny"
    assert os.path.getsize(tmp_path / "audit.jsonl") < 64 * 1024


def test_caller_fields_of_system_events_in_cef_and_syslog():
    from takakrypt.audit import to_cef, to_syslog

    ev = system_event("key-request", "key released", uid=0, pid=77, exe="/usr/bin/x",
                      operation="key_request", decision="permit", key="k1", key_version=3)
    cef = to_cef(ev)
    assert "|2006|key released|5|" in cef
    for part in ("suid=0", "spid=77", "sproc=/usr/bin/x", "cs2=k1", "cn2=3", "act=permit"):
        assert part in cef
    sd = to_syslog(ev).decode()
    assert 'uid="0"' in sd and 'key="k1"' in sd and 'keyVersion="3"' in sd
    refused = system_event("key-request", "off", uid=0, pid=77, decision="deny", key="k1")
    assert "|2007|key request refused|7|" in to_cef(refused)
    clock = Clock()
    co = Coalescer(window=1, clock=clock)
    assert co.admit(deny()) and not co.admit(deny())
    clock.t += 2
    (summary,) = co.expire()
    cef = to_cef(summary)
    assert "|2004|" in cef and "suid=1000" in cef and '"count":1' in cef
    assert to_cef(system_event("config-reload", "ok")).count("suid") == 0
