"""Who may talk to takakryptd's protocol socket, and who gets keys from it.

A real agent: a peer that is not root is refused (SO_PEERCRED) even when the socket
file's mode would let it in; KEY_REQUEST is off unless configured, root only, limited
to the keys of enabled guard points, and every request is audited without key bytes.
"""

import base64
import json
import os
import socket

from agent_helpers import base_config, running
from takakrypt import protocol as P
from takakrypt.agent.client import AgentClient
from takakrypt.keys import open_keystore

NOBODY = 65534


def _cfg(tmp_path, **agent):
    cfg = base_config(tmp_path)
    (tmp_path / "gp").mkdir()
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1"}]
    cfg["agent"].update(agent)
    return cfg


def _events(tmp_path, kind):
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


def _as_nobody(sock_path: str) -> str:
    """Connect from a forked child that dropped to nobody; what it saw."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        out = "child failed"
        try:
            # the tmp_path ancestors are 0700: walk in as root, then drop privileges
            os.chdir(os.path.dirname(sock_path))
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(os.path.basename(sock_path))
            try:
                s.send(P.encode(P.request(P.HealthCheckRequest(), 5)))
                data = s.recv(9000)
                out = "answered" if data else "closed"
            except (ConnectionError, BrokenPipeError):
                out = "closed"
            except socket.timeout:
                out = "timeout"
        except BaseException as e:  # noqa: BLE001 - report whatever happened
            out = f"error {type(e).__name__}: {e}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return got.decode()


def test_non_root_peer_is_refused_even_if_the_socket_mode_lets_it_in(tmp_path):
    cfg = _cfg(tmp_path)
    sock = cfg["agent"]["protocol_socket"]
    with running(tmp_path, cfg) as d:
        os.chmod(sock, 0o666)  # an operator's mistake: file mode alone must not decide
        assert _as_nobody(sock) == "closed"
        with AgentClient(sock) as c:  # root is still served
            assert c.call(P.HealthCheckRequest()).ok
        assert d.proc.poll() is None
        st = json.loads(d.cli("status", "--json", check=False).stdout)
        (sp,) = [t for t in st["transports"] if t["transport"] == "seqpacket"]
        assert sp["refused"] == 1
    refused = _events(tmp_path, "peer-refused")
    assert refused and refused[0]["uid"] == NOBODY and refused[0]["pid"] > 0
    assert refused[0]["path"] == sock


def _request(c, **kw):
    return c.call(P.KeyRequest(**kw))


def test_key_requests_off_by_default_and_audited(tmp_path):
    cfg = _cfg(tmp_path)
    with running(tmp_path, cfg):
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            r = _request(c, key_id="k1")
            assert r.header.status == P.Status.DENIED and not r.ok
            assert "agent.key_requests" in r.payload.reason
    (ev,) = _events(tmp_path, "key-request")
    assert ev["decision"] == "deny" and ev["key"] == "k1" and ev["uid"] == 0
    assert ev["pid"] == os.getpid()


def test_key_request_served_to_root_for_guard_point_keys_only(tmp_path):
    cfg = _cfg(tmp_path, key_requests=True)
    with open_keystore(cfg["keys"]["local"]["path"],
                       master_key_file=cfg["keys"]["local"]["master_key_file"]) as ks:
        ks.create("k2")  # in the keystore, used by no guard point
    with running(tmp_path, cfg):
        with AgentClient(cfg["agent"]["protocol_socket"]) as c:
            k = _request(c, key_id="k1")
            assert k.ok and len(k.payload.key) == 32 and k.payload.key_version == 1
            key = bytes(k.payload.key)
            assert _request(c, key_id="k1", guard_point_id=1).ok
            other = _request(c, key_id="k2")
            assert other.header.status == P.Status.DENIED
            wrong_gp = _request(c, key_id="k1", guard_point_id=2)
            assert wrong_gp.header.status == P.Status.DENIED
            # the fallback crypto operations are a key oracle: same rule
            enc = c.call(P.EncryptRequest(algorithm=1, key_id="k2", metadata=b"", data=b"x"))
            assert enc.header.status == P.Status.DENIED
    raw = (tmp_path / "audit.jsonl").read_bytes()
    for form in (key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
                 base64.b64encode(key).rstrip(b"=")):
        assert form not in raw
    evs = _events(tmp_path, "key-request")
    served = [e for e in evs if e["decision"] == "permit"]
    assert len(served) == 2
    assert all(e["key"] == "k1" and e["key_version"] == 1 and e["uid"] == 0
               and e["pid"] == os.getpid() and e["exe"] for e in served)
    denied = [e for e in evs if e["decision"] == "deny"]
    assert {e["key"] for e in denied} == {"k1", "k2"} and len(denied) == 3
