"""The TAKA protocol over takakryptd's SOCK_SEQPACKET transport: decisions, cache hits,
key requests, fail-closed timeouts, malformed and fuzzed input never hurting the agent."""

import json
import os
import socket
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_helpers import base_config, running
from takakrypt import procinfo
from takakrypt import protocol as P
from takakrypt.agent.client import AgentClient, permitted


def _cfg(tmp_path):
    cfg = base_config(tmp_path)
    (tmp_path / "gp").mkdir()
    cfg["guard_points"] = []  # decisions only: no mount needed for the protocol tests
    cfg["process_sets"] = {"me": {"executables": [os.path.realpath(sys.executable)]}}
    cfg["policies"]["p"]["rules"].insert(0, {"user_set": "root", "process_set": "me",
                                             "actions": ["write"],
                                             "effects": ["permit", "apply_key", "audit"]})
    return cfg


def _identity():
    me = procinfo.inspect(os.getpid())
    st = os.stat(f"/proc/{os.getpid()}/exe")
    return dict(pid=me.pid, tid=me.pid, start_time=me.start_time, exe_dev=st.st_dev,
                exe_ino=st.st_ino, process=me.exe)


def test_policy_check_hit_miss_and_audit(tmp_path):
    cfg = _cfg(tmp_path)
    # guard points need a path the handler can map; use a configured one without mounting
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1",
                            }]
    cfg["agent"]["key_requests"] = True
    with running(tmp_path, cfg) as d:
        path = str(tmp_path / "gp" / "data" / "f")
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            ident = _identity()
            r = c.policy_check(path=path, action="write", uid=0, gid=0, **ident)
            assert r.ok and permitted(r)
            p = r.payload
            assert p.effects & P.Effect.APPLY_KEY and p.key_id == "k1" and p.key_version == 1
            assert p.rule_index == 0 and p.cache_ttl_ms > 0
            # no resource set in this policy: the answer holds for every path (hint bit)
            assert p.effects & P.Effect.ANY_PATH
            r2 = c.policy_check(path=path, action="write", uid=0, gid=0, **ident)
            assert r2.payload.effects == p.effects
            r3 = c.policy_check(path=path, action="delete", uid=0, gid=0, **ident)
            assert r3.ok and not permitted(r3) and r3.payload.rule_index == 2
            r4 = c.policy_check(path="/elsewhere/x", action="read", uid=0, gid=0, **ident)
            assert r4.header.status == P.Status.NOT_FOUND and not permitted(r4)
            h = c.call(P.HealthCheckRequest())
            assert h.ok and h.payload.processed_requests >= 4
            k = c.call(P.KeyRequest(key_id="k1"))  # agent.key_requests: true above
            assert k.ok and len(k.payload.key) == 32 and k.payload.key_version == 1
            nk = c.call(P.KeyRequest(key_id="nope"))
            assert nk.header.status == P.Status.DENIED  # no guard point uses it
        st = json.loads(d.cli("status", "--json", check=False).stdout)
        assert st["cache"]["hits"] >= 1 and st["cache"]["misses"] >= 1
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    access = [e for e in events if e["kind"] == "access"]
    # the first write (miss) and the second (cache hit) are both audited, the second in
    # the summary of repeated identical events (docs/audit.md "Flood control"); the
    # delete denied
    writes = [e for e in access if e["operation"] == "write"]
    assert len(writes) == 1 and {e["decision"] for e in writes} == {"permit"}
    (again,) = [e for e in events if e["kind"] == "coalesced" and e["operation"] == "write"]
    assert again["detail"]["count"] == 1 and again["decision"] == "permit"
    assert any(e["operation"] == "delete" and e["decision"] == "deny" for e in access)
    assert all("k1" != e.get("key") or e["decision"] == "permit" for e in access)


def test_any_path_hint_only_without_resource_sets(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1"}]
    cfg["resource_sets"] = {"logs": {"paths": ["logs/**"]}}
    cfg["policies"]["p"]["rules"].insert(0, {"resource_set": "logs", "actions": ["write"],
                                             "effects": ["deny", "audit"]})
    with running(tmp_path, cfg) as d:
        del d
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            ident = _identity()
            gp = tmp_path / "gp"
            w = c.policy_check(path=str(gp / "data/f"), action="write", uid=0, gid=0, **ident)
            assert permitted(w) and not w.payload.effects & P.Effect.ANY_PATH
            lw = c.policy_check(path=str(gp / "logs/f"), action="write", uid=0, gid=0, **ident)
            assert not permitted(lw) and not lw.payload.effects & P.Effect.ANY_PATH
            r = c.policy_check(path=str(gp / "logs/f"), action="read", uid=0, gid=0, **ident)
            assert permitted(r) and r.payload.effects & P.Effect.ANY_PATH
            # a policy with a process set: never ANY_PROCESS
            assert not (w.payload.effects | lw.payload.effects | r.payload.effects) \
                & P.Effect.ANY_PROCESS


def test_pid_reuse_is_denied(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1",
                            }]
    with running(tmp_path, cfg):
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            ident = _identity()
            ident["start_time"] += 1  # a different process that got our pid
            r = c.policy_check(path=str(tmp_path / "gp" / "f"), action="write", uid=0, gid=0,
                               **ident)
            assert r.ok and not permitted(r)


def test_malformed_messages_are_dropped_and_agent_survives(tmp_path):
    cfg = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(cfg["agent"]["protocol_socket"])
        s.settimeout(0.5)
        good = P.encode(P.request(P.HealthCheckRequest(), 7))
        for bad in (b"", b"TAKA", b"\0" * 32, good[:31], good[:-1] + b"\xff" if len(good) > 32
                    else good + b"\xff", b"x" * 9000, bytes(reversed(good))):
            if bad:
                s.send(bad)
        s.send(good)
        # only the good message is answered
        rsp = P.decode(s.recv(9000))
        assert rsp.sequence == 7 and rsp.ok
        s.close()
        assert json.loads(d.cli("status", "--json", check=False).stdout)["pid"] == d.proc.pid


def test_fuzzed_messages_never_kill_the_agent(tmp_path):
    cfg = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(cfg["agent"]["protocol_socket"])
        good = P.encode(P.request(P.PolicyCheckRequest(
            pid=1, uid=0, gid=0, action=P.Action.READ, path="/x", process="/bin/true",
            cwd="/"), 9))

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                        max_size=6), st.binary(max_size=64))
        def send(edits, tail):
            b = bytearray(good)
            for i, v in edits:
                b[i] = v
            s.send(bytes(b) + tail)

        send()
        s.setblocking(False)
        s.close()
        assert json.loads(d.cli("status", "--json", check=False).stdout)["pid"] == d.proc.pid
        assert d.proc.poll() is None


def test_no_agent_fails_closed(tmp_path):
    import pytest
    from takakrypt.errors import AgentUnavailable
    with pytest.raises(AgentUnavailable):
        AgentClient(str(tmp_path / "none.sock"))


def test_timeout_fails_closed(tmp_path):
    """A server that never answers: the client gets a TIMEOUT response = deny."""
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    c = AgentClient(path, timeout=0.3)
    try:
        r = c.policy_check(path="/x", action="read")
        assert r.header.status == P.Status.TIMEOUT and not permitted(r)
    finally:
        c.close()
        srv.close()
