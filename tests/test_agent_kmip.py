"""takakryptd on a real PyKMIP server (mutual TLS, started by the test) serving a real
FUSE guard point (docs/keys.md, "The KMIP backend" and "Key cache and offline
operation"):

* the guard point's key is created on the server with ``takakrypt keys create --config``;
  files written through the guard point name it and read back;
* the server is killed mid-run: the circuit opens, the keys held keep serving until
  ``cache_ttl``, then they are dropped and every access is denied (never a hang), the
  guard point reported closed;
* the server is back: the circuit closes and the guard point opens by itself;
* takakryptd started while the server is down: with an offline cache it serves the keys
  sealed there; without one its guard point is closed until the server answers;
* `keys rotate --config` on the server: new files use the new version at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent_helpers import base_config, running, until

try:
    from kmip_server import KmipServer, kmip_server  # noqa: F401
except ImportError:  # tests/ is a package
    from tests.kmip_server import KmipServer, kmip_server  # noqa: F401

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
WRITE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
READ = "import sys; print(open(sys.argv[1]).read(), end='')"


def _py(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=60)


def _denied(r: subprocess.CompletedProcess) -> bool:
    return r.returncode != 0 and ("Input/output error" in r.stderr
                                  or "Permission denied" in r.stderr)


def _cfg(tmp: Path, server: KmipServer, ident, **keys) -> tuple[dict, Path]:
    cfg = base_config(tmp)
    args = server.backend_args(ident, timeout=2.0, retries=0)
    cfg["keys"] = {"backend": "kmip", "kmip": args, **keys}
    gp = tmp / "guarded"
    gp.mkdir(exist_ok=True)
    cfg["policies"] = {"p": {"rules": [{"user_set": "root", "actions": ["all_ops"],
                                        "effects": ["permit", "apply_key"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "fleet"}]
    cfg["agent"]["cache"] = {"ttl_seconds": 0.001}
    return cfg, gp


def _keys(tmp: Path, cfg: dict, *args: str) -> subprocess.CompletedProcess:
    from agent_helpers import write_config

    p = tmp / "keys.yaml"
    write_config(p, {"keys": cfg["keys"]})
    env = dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"])
    return subprocess.run([sys.executable, "-m", "takakrypt", "keys", *args, "--config", str(p),
                           "--json"], capture_output=True, text=True, timeout=120, env=env)


def _status(d) -> dict:
    return json.loads(d.cli("status", "--json", check=False).stdout)


def _header_version(path: Path) -> int:
    from takakrypt import format as fmt

    return fmt.parse_header(path.read_bytes()[:fmt.HEADER_SIZE]).key_version


@pytest.fixture
def ident(kmip_server: KmipServer):
    i = kmip_server.new_identity()
    yield i
    if kmip_server.proc is None:
        kmip_server.restart()
    kmip_server.destroy_all(i)


def test_kmip_server_killed_mid_run_then_back(tmp_path, kmip_server, ident):
    cfg, gp = _cfg(tmp_path, kmip_server, ident, cache_ttl=3, cache_revalidate=0.5)
    assert _keys(tmp_path, cfg, "create", "fleet").returncode == 0
    with running(tmp_path, cfg) as d:
        assert _py(WRITE, str(gp / "a.txt"), "fleet data").returncode == 0
        assert _py(READ, str(gp / "a.txt")).stdout == "fleet data"
        st = _status(d)
        assert st["key_backend"]["type"] == "kmip" and st["key_backend"]["state"] == "closed"
        kmip_server.kill()
        try:
            # within the TTL the held key serves reads and new files
            r = _py(READ, str(gp / "a.txt"))
            assert r.returncode == 0 and r.stdout == "fleet data", r.stderr
            # the circuit opens, then the TTL ends: dropped, every access denied
            assert until(lambda: _status(d)["key_backend"]["state"] != "closed", 60)
            assert until(lambda: _denied(_py(READ, str(gp / "a.txt"))), 60)
            assert _denied(_py(WRITE, str(gp / "b.txt"), "x"))
            st = _status(d)
            assert st["guard_points"][0]["closed"] and not st["keys"]["available"], st["keys"]
        finally:
            kmip_server.restart()
        # the server is back: the breaker closes (after its probe), the guard opens
        assert until(lambda: (s := _status(d))["key_backend"]["state"] == "closed"
                     and not s["guard_points"][0]["closed"], 90)
        assert _py(READ, str(gp / "a.txt")).stdout == "fleet data"
        assert _py(WRITE, str(gp / "b.txt"), "after").returncode == 0
        # rotation on the server: new files use version 2 at once
        r = _keys(tmp_path, cfg, "rotate", "fleet")
        assert r.returncode == 0 and json.loads(r.stdout)["current_version"] == 2, r.stderr
        assert _py(WRITE, str(gp / "c.txt"), "v2").returncode == 0
        assert _py(READ, str(gp / "c.txt")).stdout == "v2"
    # at rest (unmounted): the files name the versions they were written with
    assert _header_version(gp / "a.txt") == 1
    assert _header_version(gp / "c.txt") == 2
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    text = " ".join(e["reason"] for e in events if e["kind"] in ("key-backend", "guard-point"))
    assert "unavailable" in text and "keys back" in text, text


def test_kmip_down_at_start_offline_cache_or_closed(tmp_path, kmip_server, ident):
    key_file = tmp_path / "offline.key"
    key_file.write_bytes(os.urandom(32))
    os.chmod(key_file, 0o600)
    offline = {"path": str(tmp_path / "offline.json"), "key_file": str(key_file)}
    cfg, gp = _cfg(tmp_path, kmip_server, ident, offline_cache=offline)
    assert _keys(tmp_path, cfg, "create", "fleet").returncode == 0
    with running(tmp_path, cfg):
        assert _py(WRITE, str(gp / "a.txt"), "sealed").returncode == 0
    assert (tmp_path / "offline.json").exists()
    kmip_server.kill()
    try:
        # with the offline cache: served from it
        with running(tmp_path, cfg) as d:
            r = _py(READ, str(gp / "a.txt"))
            assert r.returncode == 0 and r.stdout == "sealed", r.stderr
            st = _status(d)
            assert st["keys"]["offline_cache"], st["keys"]
        # without it: closed, started all the same
        cfg2 = json.loads(json.dumps(cfg))
        del cfg2["keys"]["offline_cache"]
        with running(tmp_path, cfg2) as d:
            assert _denied(_py(READ, str(gp / "a.txt")))
            st = _status(d)
            assert st["guard_points"][0]["mounted"] and st["guard_points"][0]["closed"], st
            kmip_server.restart()
            assert until(lambda: not _status(d)["guard_points"][0]["closed"], 90)
            assert _py(READ, str(gp / "a.txt")).stdout == "sealed"
    finally:
        if kmip_server.proc is None:
            kmip_server.restart()


class _HungServer:
    """A KMIP address that takes TCP connections and never answers (a server that hangs,
    or a firewall that lets the SYN through): every request times out.  Counts the
    connections it took."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.held: list = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        for c in self.held:
            c.close()


def test_kmip_hung_at_start_is_tried_once_then_opens_when_back(tmp_path, kmip_server, ident):
    """A KMS that hangs (takes the connection, never answers) at takakryptd's start: the
    start tries it once -- not timeout x (retries + 1) for each of the configuration
    check, the key lookups and the first health probe, which kept READY=1 waiting two
    minutes with the defaults, past systemd's start timeout -- mounts the guard point
    closed, answers `status` from what it knows, and opens the guard point by itself
    once the server answers."""
    cfg, gp = _cfg(tmp_path, kmip_server, ident)
    cfg["keys"]["kmip"].update(timeout=2.0, retries=3)
    assert _keys(tmp_path, cfg, "create", "fleet").returncode == 0
    with running(tmp_path, cfg):
        assert _py(WRITE, str(gp / "a.txt"), "kept").returncode == 0
    kmip_server.kill()
    hung = _HungServer(kmip_server.host, kmip_server.port)
    try:
        with running(tmp_path, cfg) as d:
            # one try at start (the configuration check); the agent asks nothing more
            # before the next health probe, PROBE_RETRY later
            assert len(hung.held) <= 2, len(hung.held)  # 12 before: 3 x (1 + 3 retries)
            st = _status(d)
            assert st["guard_points"][0]["mounted"] and st["guard_points"][0]["closed"], st
            assert "timed out" in (st["keys"].get("last_error") or ""), st["keys"]
            assert _denied(_py(READ, str(gp / "a.txt")))
            hung.close()
            kmip_server.restart()
            assert until(lambda: not _status(d)["guard_points"][0]["closed"], 90)
            assert _py(READ, str(gp / "a.txt")).stdout == "kept"
    finally:
        hung.close()
        if kmip_server.proc is None:
            kmip_server.restart()
