"""The agent's key cache and offline operation through a real takakryptd serving a real
FUSE guard point, with the real local keystore made unavailable (moved away, or
damaged) as the failing backend (docs/keys.md, "Key cache and offline operation"):

* mid-run: held keys are served until ``cache_ttl``, then dropped (the data path's
  copies too) and every access fails, the guard point reported closed and audited;
  the keystore back, it opens by itself;
* at start, without an offline cache: takakryptd starts and mounts, closed; with one:
  it serves from the offline cache; both open by themselves when the keystore is back;
* what the configuration must fix still stops the start (exit 3).

Timings are never asserted tightly: waits poll with generous limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from agent_helpers import HOLD_READER as HOLD
from agent_helpers import Daemon, base_config, running, until, write_config

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
WRITE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
READ = "import sys; print(open(sys.argv[1]).read(), end='')"




def _py(code, *args):
    # a hang is a failure: every access must answer (EIO/EACCES), never wait
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=30)


def _cfg(tmp_path, **keys):
    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir(exist_ok=True)
    cfg["policies"] = {"p": {"rules": [{"user_set": "root", "actions": ["all_ops"],
                                        "effects": ["permit", "apply_key"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1"}]
    cfg["agent"]["cache"] = {"ttl_seconds": 0.001}  # decisions expire: accesses ask
    cfg["keys"].update(keys)
    return cfg, gp


def _key_file(tmp_path):
    p = tmp_path / "offline.key"
    p.write_bytes(os.urandom(32))
    os.chmod(p, 0o600)
    return str(p)


def _status(d):
    return json.loads(d.cli("status", "--json", check=False).stdout)


def _events(tmp_path):
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]


def _reasons(tmp_path, kind):
    return [e["reason"] for e in _events(tmp_path) if e["kind"] == kind]


def _denied(r):
    return r.returncode != 0 and ("Input/output error" in r.stderr
                                  or "Permission denied" in r.stderr)


def test_mid_run_keys_served_until_ttl_then_denied_then_back(tmp_path):
    cfg, gp = _cfg(tmp_path, cache_ttl=2, cache_revalidate=0.5)
    ks = tmp_path / "keystore.json"
    with running(tmp_path, cfg) as d:
        assert _py(WRITE, str(gp / "a.txt"), "held").returncode == 0
        assert _py(READ, str(gp / "a.txt")).stdout == "held"
        holder = subprocess.Popen([PY, "-c", HOLD, str(gp / "a.txt")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "open"
        os.rename(ks, tmp_path / "keystore.away")
        try:
            # served from memory while within the TTL (held keys, breaker opening)
            r = _py(READ, str(gp / "a.txt"))
            assert r.returncode == 0 and r.stdout == "held", r.stderr
            # after the TTL: dropped everywhere, every access fails (and never hangs)
            assert until(lambda: _denied(_py(READ, str(gp / "a.txt"))), timeout=20)
            assert _denied(_py(WRITE, str(gp / "b.txt"), "new"))
            # the data path drops its copies in the upkeep round that sees the expiry
            # (a request that meets the expired key first is denied at once): that
            # round closes the guard point too (docs/keys.md, "Expired")
            assert until(lambda: _status(d)["guard_points"][0]["closed"], timeout=20)
            out, _ = holder.communicate("\n", timeout=30)
            assert out.strip() == "errno 5", out  # EIO: the data path's copy is gone
            st = _status(d)
            assert st["state"] == "unhealthy" and not st["healthy"], st
            assert "closed" in st["keys"]["closed"][str(gp)], st["keys"]
            assert st["guard_points"][0]["closed"], st["guard_points"]
            assert st["keys"]["cache"]["keys"] == 0 and not st["keys"]["available"]
            assert st["key_backend"]["state"] == "open", st["key_backend"]
            assert "CLOSED" in d.cli("status", check=False).stdout
        finally:
            os.rename(tmp_path / "keystore.away", ks)
        # the backend answers again: the next health check probes it, the breaker
        # closes and the guard point opens by itself (a status within PROBE_RETRY of a
        # slow failed probe answers from it: poll)
        st = until(lambda: (s := _status(d))["key_backend"]["state"] == "closed" and s,
                   timeout=60) or _status(d)
        assert st["key_backend"]["state"] == "closed" and st["keys"]["available"], st
        assert not st["keys"]["closed"] and st["state"] == "healthy", st
        assert _py(READ, str(gp / "a.txt")).stdout == "held"
        assert _py(WRITE, str(gp / "b.txt"), "new").returncode == 0
        m = _metrics(d)
        assert "takakrypt_key_cache_expired_total 1.0" in m, m
        assert "takakrypt_key_backend_available 1.0" in m
    cache = " ".join(_reasons(tmp_path, "key-cache"))
    assert "dropped and wiped" in cache, cache
    backend = " ".join(_reasons(tmp_path, "key-backend"))
    assert "unavailable" in backend and "keys back" in backend, backend
    guard = _reasons(tmp_path, "guard-point")
    assert any("closed" in r for r in guard) and any("open again" in r for r in guard), guard
    log = (tmp_path / "takakryptd.log").read_text()
    assert "dropped and wiped" in log


def _metrics(d):
    import urllib.request

    m = d.cfg["agent"]["metrics"]
    with urllib.request.urlopen(f"http://{m['address']}:{m['port']}/metrics", timeout=10) as r:
        return r.read().decode()


def _write_then_damage(tmp_path, cfg, gp):
    """A first run writes a file (and fills the offline cache if configured); then the
    keystore is damaged (its good bytes returned, to restore it)."""
    with running(tmp_path, cfg):
        assert _py(WRITE, str(gp / "a.txt"), "before").returncode == 0
        assert _py(READ, str(gp / "a.txt")).stdout == "before"
    ks = tmp_path / "keystore.json"
    good = ks.read_bytes()
    ks.write_bytes(b"{ damaged")
    return good


def test_down_at_start_without_offline_cache_starts_closed_and_opens_when_back(tmp_path):
    cfg, gp = _cfg(tmp_path)
    good = _write_then_damage(tmp_path, cfg, gp)
    ks = tmp_path / "keystore.json"
    with running(tmp_path, cfg) as d:  # READY=1: started and mounted, though closed
        r = _py(READ, str(gp / "a.txt"))
        assert _denied(r), (r.returncode, r.stderr)
        assert _denied(_py(WRITE, str(gp / "b.txt"), "x"))
        st = _status(d)
        assert st["guard_points"][0]["mounted"] and st["guard_points"][0]["closed"], st
        assert "not valid JSON" in st["keys"]["closed"][str(gp)], st["keys"]
        assert not st["keys"]["opened"] and st["state"] == "unhealthy"
        ks.write_bytes(good)
        # the next probe opens the keystore: open by itself
        st = until(lambda: not (s := _status(d))["keys"]["closed"] and s,
                   timeout=60) or _status(d)
        assert st["keys"]["opened"] and not st["keys"]["closed"], st["keys"]
        assert _py(READ, str(gp / "a.txt")).stdout == "before"
    guard = _reasons(tmp_path, "guard-point")
    assert any("closed" in r for r in guard) and any("open again" in r for r in guard), guard


def test_down_at_start_with_offline_cache_serves_then_back(tmp_path):
    cfg, gp = _cfg(tmp_path, offline_cache={"path": str(tmp_path / "offline" / "cache.json"),
                                            "key_file": _key_file(tmp_path)})
    good = _write_then_damage(tmp_path, cfg, gp)
    off = tmp_path / "offline" / "cache.json"
    assert (os.stat(off).st_mode & 0o777) == 0o600
    assert (os.stat(off.parent).st_mode & 0o777) == 0o700
    with running(tmp_path, cfg) as d:
        assert _py(READ, str(gp / "a.txt")).stdout == "before"
        assert _py(WRITE, str(gp / "b.txt"), "offline").returncode == 0  # current version
        st = _status(d)
        assert not st["keys"]["closed"] and st["keys"]["offline_cache"]["in_use"], st["keys"]
        assert st["keys"]["served_from"]["k1"] == "offline"
        assert st["state"] == "degraded", st
        assert "SERVING k1" in d.cli("status", check=False).stdout
        (tmp_path / "keystore.json").write_bytes(good)
        st = _status(d)
        assert st["keys"]["available"] and not st["keys"]["offline_cache"]["in_use"], st
        assert st["state"] == "healthy", st
        assert _py(READ, str(gp / "b.txt")).stdout == "offline"
    backend = " ".join(_reasons(tmp_path, "key-backend"))
    assert "served from the offline key cache" in backend and "keys back" in backend, backend
    # the offline cache holds sealed keys only
    from takakrypt.keys import open_keystore

    with open_keystore(str(tmp_path / "keystore.json"),
                       master_key_file=str(tmp_path / "master.key")) as k:
        key = k.get("k1")
    assert bytes(key).hex() not in off.read_text() and bytes(key) not in off.read_bytes()


def _start_fails(tmp_path, cfg):
    path = tmp_path / "start.yaml"
    write_config(path, cfg)
    return subprocess.run([sys.executable, "-m", "takakrypt.agent.daemon", "--config", str(path),
                           "--foreground"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})


def test_configuration_errors_still_stop_the_start(tmp_path):
    from takakrypt.keys.offline import OfflineCache

    cfg, _gp = _cfg(tmp_path)
    kf = _key_file(tmp_path)
    os.chmod(kf, 0o644)
    cfg["keys"]["offline_cache"] = {"path": str(tmp_path / "off.json"), "key_file": kf}
    r = _start_fails(tmp_path, cfg)
    assert r.returncode == 3 and "$.keys.offline_cache.key_file" in r.stderr, r.stderr
    assert "root-only" in r.stderr and "Traceback" not in r.stderr
    # a passphrase the existing offline cache was not sealed with
    pw = tmp_path / "offline.pass"
    pw.write_text("not the passphrase\n")
    os.chmod(pw, 0o600)
    OfflineCache(str(tmp_path / "off.json"), passphrase=b"the right passphrase",
                 kdf_params={"memory_kib": 8, "iterations": 1, "lanes": 1}).store(
        "k1", 1, os.urandom(32), 1)
    cfg["keys"]["offline_cache"] = {"path": str(tmp_path / "off.json"),
                                    "passphrase_file": str(pw)}
    r = _start_fails(tmp_path, cfg)
    assert r.returncode == 3 and "wrong passphrase" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # a missing keystore is a bad path, not an outage
    cfg["keys"].pop("offline_cache")
    cfg["keys"]["local"]["path"] = str(tmp_path / "nowhere.json")
    r = _start_fails(tmp_path, cfg)
    assert r.returncode == 3 and "no keystore at" in r.stderr, r.stderr


def test_a_damaged_offline_cache_is_refused_and_reported(tmp_path):
    cfg, gp = _cfg(tmp_path, offline_cache={"path": str(tmp_path / "off.json"),
                                            "key_file": _key_file(tmp_path)})
    (tmp_path / "off.json").write_text('{"format": "takakrypt-offline-cache", "version": 1}')
    d = Daemon(tmp_path, cfg)
    try:
        d.wait_for("READY=1")
        assert _py(WRITE, str(gp / "a.txt"), "x").returncode == 0  # the backend serves
        st = _status(d)
        off = st["keys"]["offline_cache"]
        assert off["configured"] and not off["usable"] and "malformed" in off["problem"], off
        assert "NOT USED" in d.cli("status", check=False).stdout
    finally:
        d.stop()
    assert "takakrypt-offline-cache" in (tmp_path / "off.json").read_text()  # not overwritten
