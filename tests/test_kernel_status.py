"""The kernel module's counters in takakryptd: STATUS_REQUEST's version-2 layout (the
docs' byte tables against the codec), a malformed answer failing its request at once,
`takakrypt status` and the Prometheus metrics with and without the module.  With the
module, in the VM: tests/kernel/guest/test_agent_engine.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from agent_helpers import base_config, running
from takakrypt import protocol as P
from takakrypt.agent import genl
from takakrypt.agent.metrics import KERNEL_COUNTERS, KERNEL_GAUGES, Metrics
from takakrypt.cli import _kernel_line
from takakrypt.errors import ProtocolError

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
V2 = ("policy_denials", "integrity_errors", "audit_events", "audit_drops")


def _doc_table(c_struct: str) -> tuple[tuple[int, int], list[tuple[int, int, str, int]]]:
    """((v1, v2) fixed sizes, [(offset, size, field, version)]) of a byte table."""
    text = DOC.read_text()
    m = re.search(rf"^`struct {c_struct}` \(fixed part (\d+) bytes in v1, (\d+) in v2\):\n\n"
                  r"((?:\|.*\n)+)", text, re.M)
    assert m, f"no byte table for {c_struct} in {DOC}"
    rows = []
    for line in m.group(3).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        off = re.match(r"\d+", cells[0])
        if off and cells[1].isdigit() and cells[2].startswith("`"):
            rows.append((int(off.group()), int(cells[1]), cells[2].strip("`"), int(cells[3])))
    return (int(m.group(1)), int(m.group(2))), rows


@pytest.mark.parametrize("lay", P.LAYOUTS, ids=lambda lay: lay.c_struct)
def test_docs_byte_tables_match_the_codec(lay):
    sizes, rows = _doc_table(lay.c_struct)
    assert sizes == (lay.size(1), lay.size(2))
    base = P.HEADER_SIZE if lay.with_header else 0
    since = {f.name: f.since for f in lay.fixed}
    want = [(base + off, size, name, since[name]) for name, off, size in lay.offsets(2)]
    assert [r for r in rows if r[2] in since] == want


def test_status_response_v2_layout():
    req = P.request(P.StatusRequest(), 7)
    vals = dict(zip(V2, (0x1111, 0x2222, 0x3333, 0x4444)))
    rsp = P.reply(req, P.StatusResponse(P.Enforcer.KERNEL, impl_version=0x10203,
                                        agent_connected=True, fail_closed_denials=9, **vals))
    raw = P.encode(rsp)
    assert len(raw) == P.HEADER_SIZE + 104
    assert struct.unpack_from("<QQQQQ", raw, 96) == (9, *vals.values())
    back = P.decode(raw)
    assert back.payload == rsp.payload and P.encode(back) == raw


def test_status_response_v1_has_no_v2_counters():
    req = P.request(P.StatusRequest(), 7, version=1)
    raw = P.encode(P.reply(req, P.StatusResponse(P.Enforcer.KERNEL, cache_hits=5)))
    assert len(raw) == P.HEADER_SIZE + 72
    st = P.decode(raw).payload
    assert st.cache_hits == 5 and all(getattr(st, f) == 0 for f in V2)
    with pytest.raises(ProtocolError, match="policy_denials needs protocol version 2"):
        P.encode(P.reply(req, P.StatusResponse(P.Enforcer.KERNEL, policy_denials=1)))


def _old_module_answer(seq: int) -> bytes:
    """What a module built before the v2 counters answers: version 2, 72 bytes."""
    body = struct.pack("<8I5Q", 1, 0x100, 1, 2, 3, 0, 0, 0, 1, 2, 3, 4, 5)
    return struct.pack("<IIIIIIQ", P.MAGIC, 2, int(P.Operation.STATUS_REQUEST) | P.RESPONSE_FLAG,
                       seq, len(body), 0, 0) + body


def test_a_v2_answer_without_the_v2_counters_is_malformed():
    with pytest.raises(ProtocolError, match="fixed part"):
        P.decode(_old_module_answer(3))


def test_pending_fail_ends_one_request():
    async def main():
        pend = P.PendingRequests(timeout=30)
        a = pend.add(P.request(P.StatusRequest(), 1))
        b = pend.add(P.request(P.HealthCheckRequest(), 2))
        assert not pend.fail(1, int(P.Operation.HEALTH_CHECK), P.Status.INVALID, "x")
        assert not pend.fail(3, int(P.Operation.STATUS_REQUEST), P.Status.INVALID, "x")
        assert pend.fail(1, int(P.Operation.STATUS_REQUEST), P.Status.INVALID, "bad answer")
        r = await a
        assert r.status == P.Status.INVALID and r.payload.reason == "bad answer"
        assert not b.done() and len(pend) == 1
        pend.fail_all()
    asyncio.run(main())


def test_genl_malformed_answer_fails_its_request_at_once():
    """A module answering STATUS in the old size: `status` says so at once, not after
    the 5 s timeout."""
    async def main():
        t = genl.GenlTransport(SimpleNamespace(handler=None), timeout=30)
        req = P.request(P.StatusRequest(), 41)
        fut = t.pending.add(req)
        t._dispatch(genl.Frame("msg", 0, 0, genl.CMD_MSG, _old_module_answer(41)))
        r = await asyncio.wait_for(fut, 1)
        assert r.status == P.Status.INVALID and t.errors == 1
        assert r.payload.reason.startswith("malformed response from the kernel: ")
        with pytest.raises(ConnectionError):  # not started: no socket
            await t.status()
    asyncio.run(main())


# what status and metrics show -----------------------------------------------------------

def _counters(**kw) -> dict:
    import msgspec

    st = msgspec.to_builtins(P.StatusResponse(P.Enforcer.KERNEL, **kw))
    st["enforcer"] = "kernel"
    return st


def test_metrics_kernel_series_only_with_an_answer():
    stats = {"kernel": None}
    m = Metrics(lambda: stats)
    text = generate_latest(m.registry).decode()
    assert "takakrypt_kernel_" not in text and "takakrypt_up 1.0" in text
    stats["kernel"] = _counters(policy_denials=3, requests_sent=17, cache_entries=5,
                                cache_capacity=4096, audit_drops=2, agent_connected=True)
    text = generate_latest(m.registry).decode()
    for line in ("takakrypt_kernel_policy_denials_total 3.0",
                 "takakrypt_kernel_requests_sent_total 17.0",
                 "takakrypt_kernel_audit_drops_total 2.0",
                 "takakrypt_kernel_cache_entries 5.0", "takakrypt_kernel_cache_capacity 4096.0",
                 "takakrypt_kernel_agent_connected 1.0",
                 "takakrypt_kernel_integrity_errors_total 0.0"):
        assert line in text.splitlines(), line
    names = {f"takakrypt_kernel_{k}_total" for k, _ in KERNEL_COUNTERS} | \
        {f"takakrypt_kernel_{k}" for k, _ in KERNEL_GAUGES}
    assert names == set(re.findall(r"^# TYPE (takakrypt_kernel_\w+) ", text, re.M))


def test_status_line():
    assert _kernel_line(None) == "takakryptfs not loaded"
    assert _kernel_line({"loaded": False, "status": None, "error": None}) == \
        "takakryptfs not loaded"
    assert _kernel_line({"loaded": True, "status": None, "error": "STATUS_REQUEST: timeout"}) \
        == "takakryptfs loaded; no status: STATUS_REQUEST: timeout"
    line = _kernel_line({"loaded": True, "error": None, "status": _counters(
        impl_version=0x000102, agent_connected=True, guard_point_count=2,
        config_generation=4, requests_sent=10, requests_timed_out=1, cache_hits=7,
        cache_misses=3, cache_entries=3, cache_capacity=512, policy_denials=2,
        fail_closed_denials=1, integrity_errors=5, audit_events=6, audit_drops=0)})
    assert line == ("takakryptfs 0.1.2, agent connected, 2 guard point(s) (generation 4); "
                    "requests 10 sent, 1 timed out, 0 pending; cache 7 hits, 3 misses, 3/512 "
                    "entries; denials 2 by policy, 1 fail-closed; 5 integrity errors; audit 6 "
                    "sent, 0 dropped")


@pytest.mark.skipif(os.path.isdir("/sys/module/takakryptfs"), reason="takakryptfs is loaded here")
def test_agent_without_the_module_says_so(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg) as d:
        st = d.jcli("status")
        assert st["kernel"] == {"loaded": False, "registered": False, "status": None,
                                "error": None}
        assert "kernel:      takakryptfs not loaded" in d.cli("status").stdout.splitlines()
        port = cfg["agent"]["metrics"]["port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) \
            .read().decode()
        assert "takakrypt_up 1.0" in text and "takakrypt_kernel_" not in text
        assert json.loads(d.cli("status", "--json").stdout)["healthy"]
