"""The agent's generic-netlink transport (agent.genl) on the host, without the kernel
module: frame layout against a hand-made encoding, what the agent does when the family
is absent, and who gets keys when the peer is the kernel.  With the module loaded, in a
VM: tests/kernel/guest/test_agent_genl.py."""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent / "kernel"))

import genl_raw as R  # noqa: E402
from agent_helpers import base_config, running, write_config  # noqa: E402
from takakrypt import protocol as P  # noqa: E402
from takakrypt.agent import genl  # noqa: E402
from takakrypt.agent.transports import KERNEL, Peer  # noqa: E402


def _taka(seq: int = 9) -> bytes:
    return P.encode(P.request(P.KeyRequest(key_id="k1", guard_point_id=1), seq, timestamp=seq))


@pytest.mark.parametrize("cmd,taka", [(genl.CMD_MSG, _taka()), (genl.CMD_MSG, _taka() + b"x"),
                                      (genl.CMD_REGISTER, None)])
def test_frames_match_a_hand_made_encoding(cmd, taka):
    attrs = R.nlattr(R.ATTR_MSG, taka) if taka is not None else b""
    want = R.frame(0x1c, cmd, attrs, seq=77, port=4242, flags=R.NLM_F_REQUEST | R.NLM_F_ACK)
    got = genl.build(0x1c, cmd, taka, seq=77, port=4242, flags=R.NLM_F_REQUEST | R.NLM_F_ACK)
    assert got == want
    f = genl.parse(got, 0x1c)
    assert (f.kind, f.seq, f.port, f.cmd, f.taka) == ("msg", 77, 4242, cmd, taka)


def test_parse_reads_an_error_ack_and_several_messages_per_datagram():
    req = R.frame(0x1c, genl.CMD_MSG, R.nlattr(1, _taka()), seq=5)
    ack = struct.pack("=IHHII", 16 + 4 + 16, R.NLMSG_ERROR, 0, 5, 0) + \
        struct.pack("=i", -22) + req[:16]
    answer = _taka(3)
    reply = genl.build(0x1c, genl.CMD_MSG, answer, seq=5)
    parts = genl.split(reply + ack)
    assert parts == [reply, ack]
    f = genl.parse(ack, 0x1c)
    assert (f.kind, f.seq, f.error) == ("error", 5, -22)
    assert genl.parse(parts[0], 0x1c).taka == answer
    assert genl.parse(R.frame(0x10, 3), 0x1c).kind == "other"
    assert genl.split(b"\x00" * 7) == []
    assert genl.split(struct.pack("=IHHII", 400, 0x1c, 0, 0, 0)) == []  # runs past the end


def _absent() -> bool:
    with R.Genl() as g:
        return g.family() is None


@pytest.mark.skipif(not _absent(), reason="the takakrypt family is registered on this host")
def test_family_absent_transport_not_started(caplog):
    agent = SimpleNamespace(handler=None, inflight=0)

    async def go():
        return await genl.start(agent)

    with caplog.at_level("INFO", logger="takakryptd.genl"):
        assert asyncio.run(go()) is None
    assert "absent" in caplog.text and "not started" in caplog.text


@pytest.mark.skipif(not _absent(), reason="the takakrypt family is registered on this host")
def test_agent_runs_without_the_module(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg) as d:
        names = [t["transport"] for t in d.jcli("status")["transports"]]
        assert "genl" not in names and "seqpacket" in names
        assert "kernel transport not started" in d.logtext()


# --- who gets keys: the kernel peer --------------------------------------------------------
def _agent(tmp_path, **agent_opts):
    from takakrypt.agent.handler import RequestHandler
    from takakrypt.agent.keymanager import KeyManager, load_config, open_backend

    cfg = base_config(tmp_path)
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    cfg["guard_points"] = [{"path": str(tmp_path / "a"), "policy": "p", "key": "k1"},
                           {"path": str(tmp_path / "b"), "policy": "p", "key": "k1",
                            "enabled": False}]
    cfg["agent"].update(agent_opts)
    write_config(tmp_path / "c.yaml", cfg)
    config = load_config(str(tmp_path / "c.yaml"))
    events: list = []
    agent = SimpleNamespace(config=config, keys=KeyManager(open_backend(config.keys)),
                            audit=SimpleNamespace(log=events.append), metrics=None, cache=None,
                            requests=0, inflight=0, started=0.0)
    return RequestHandler(agent), events


def _ask(handler, peer, key="k1", gp=0):
    msg = P.request(P.KeyRequest(key_id=key, guard_point_id=gp), 3)
    return P.decode(asyncio.run(handler.handle(P.encode(msg), transport="genl", peer=peer)))


def test_kernel_peer_gets_guard_point_keys_without_key_requests(tmp_path):
    handler, events = _agent(tmp_path)   # agent.key_requests: false (the default)
    r = _ask(handler, KERNEL, gp=1)
    assert r.status == P.Status.SUCCESS and len(r.payload.key) == 32
    ev = events[-1]
    assert (ev.kind, ev.decision, ev.exe, ev.uid, ev.pid, ev.key) == \
        ("key-request", "permit", "kernel", 0, 0, "k1")
    assert r.payload.key.hex() not in repr(ev) and repr(r.payload.key) not in repr(ev)
    # rule 3 still holds for the kernel: a disabled guard point, a key no guard point uses
    for key, gp in (("k1", 2), ("k1", 7), ("other", 0)):
        r = _ask(handler, KERNEL, key, gp)
        assert r.status == P.Status.DENIED, (key, gp)
        assert events[-1].decision == "deny" and events[-1].exe == "kernel"


def test_a_pid_0_root_peer_is_not_the_kernel(tmp_path):
    """SO_PEERCRED of a process in another pid namespace reads pid 0: still rule 1."""
    handler, events = _agent(tmp_path)
    r = _ask(handler, Peer(0, 0, 0), gp=1)
    assert r.status == P.Status.DENIED and "key_requests" in r.payload.reason
    assert events[-1].decision == "deny" and events[-1].exe != "kernel"


def test_requests_from_a_process_are_not_served():
    """Only the kernel sends from port 0; a root process unicasting a KEY_REQUEST to
    the agent's port is dropped and counted, never handed to the handler."""
    served = []

    async def handle(data, **kw):
        served.append(kw)
        return None

    agent = SimpleNamespace(handler=SimpleNamespace(handle=handle, observe=lambda *a: None),
                            inflight=0)

    async def go():
        t = genl.GenlTransport(agent)
        t.sock, t.family_id = genl.open_socket(), 0x20
        t.sock.setblocking(False)
        t.port = t.sock.getsockname()[0]
        asyncio.get_running_loop().add_reader(t.sock.fileno(), t._readable)
        with R.Genl() as other:
            other.sock.sendto(genl.build(0x20, genl.CMD_MSG, _taka()), (t.port, 0))
            for _ in range(100):
                if t.errors:
                    break
                await asyncio.sleep(0.01)
        await t.close(wipe=False)
        return t

    t = asyncio.run(go())
    assert t.errors == 1 and t.requests == 0 and served == []


def test_pyroute2_package_init_deferred_until_asked():
    """agent.genl loads pyroute2.netlink without the package's __init__ (which imports
    all of pyroute2: most of takakryptd's start); a program asking pyroute2 for more
    afterwards still gets the whole package, the same netlink module in it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from takakrypt.agent import genl\n"
        "heavy = [m for m in ('pyroute2.iproute', 'pyroute2.ndb.main', 'pyroute2.ipdb')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from pyroute2 import IPRoute, GenericNetlinkSocket\n"
        "import pyroute2\n"
        "assert pyroute2.netlink is sys.modules['pyroute2.netlink']\n"
        "assert genl.genlmsg is pyroute2.netlink.genlmsg\n"
        "assert 'pyroute2.ndb.main' in sys.modules and pyroute2.__version__\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
