"""takakryptd's generic-netlink transport against the real module: registration,
CONFIG_UPDATE at start, after a reload and at stop, and (once the file system is in the
module) keys served to a takakryptfs mount, whose files `takakrypt decrypt` reads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import genl_raw as R
import agent_helpers
from agent_helpers import base_config, until
from conftest import mount, umount
from taka_kernel import family, status


def _cfg(tmp: Path, n_enabled: int = 1) -> dict:
    cfg = base_config(tmp)
    gps = []
    for i in range(3):
        d = tmp / f"gp{i}"
        d.mkdir(exist_ok=True)
        gps.append({"path": str(d), "policy": "p", "key": "k1", "enabled": i < n_enabled})
    cfg["guard_points"] = gps
    return cfg


@contextlib.contextmanager
def running(tmp: Path, cfg: dict):
    """agent_helpers.running with a start-up allowance for TCG (Python imports over 9p
    take tens of seconds in the guest)."""
    d = agent_helpers.Daemon(tmp, cfg)
    d.notify.settimeout(240)
    try:
        d.wait_for("READY=1", timeout=240)
        yield d
    finally:
        d.stop()


def _genl(d) -> dict:
    ts = [t for t in d.jcli("status")["transports"] if t["transport"] == "genl"]
    assert len(ts) == 1, d.jcli("status")["transports"]
    return ts[0]


def _until(pred, timeout=20.0):
    return until(pred, timeout)


def _dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout


def test_agent_registers_and_pushes_guard_points(scratch):
    with R.Genl() as g:
        fid = family(g)
        with running(scratch, _cfg(scratch, 2)) as d:
            t = _genl(d)
            assert t["registered"] and t["family_id"] == fid and t["port"] > 0, t
            assert f"agent registered (netlink port {t['port']})" in _dmesg()
            st = status(g, fid)
            assert st.agent_connected == 1
            assert _until(lambda: _genl(d)["config_updates"] >= 1)
            t = _genl(d)
            assert t["last_config"]["status"] == "success" and t["last_config"]["entries"] == 3, t
            assert status(g, fid).guard_point_count == 3

            # a reload pushes the new set
            cfg = _cfg(scratch, 1)
            cfg["guard_points"] = cfg["guard_points"][:2]
            d.config_path.write_text(yaml.safe_dump(cfg))
            d.proc.send_signal(signal.SIGHUP)
            assert _until(lambda: _genl(d)["config_updates"] >= 2), _genl(d)
            assert _until(lambda: status(g, fid).guard_point_count == 2)
            assert _genl(d)["errors"] == 0
        # stopped: the empty CONFIG_UPDATE wiped the keys, the socket closed
        st = status(g, fid)
        assert st.agent_connected == 0 and st.guard_point_count == 0
        assert "agent left" in _dmesg()


def test_agent_without_the_module_then_with_it(scratch):
    """Not loaded at start: no transport, no error (the host test covers the log line);
    this checks the daemon is healthy and serves once loaded again at its next start."""
    from conftest import delete_module, insmod, loaded
    assert loaded()
    assert delete_module() == 0
    try:
        with running(scratch, _cfg(scratch)) as d:
            names = [t["transport"] for t in d.jcli("status")["transports"]]
            assert "genl" not in names
            assert "kernel transport not started" in d.logtext()
    finally:
        insmod()


def _decrypt(tmp: Path, src: Path) -> bytes:
    out = tmp / "plain.out"
    out.unlink(missing_ok=True)
    r = agent_helpers.run_takakrypt(["decrypt", "-q", "--keystore", tmp / "keystore.json",
                                     "--master-key-file", tmp / "master.key", src, out])
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


@pytest.mark.usefixtures("needs_fs")
def test_write_through_mount_decrypts_with_cli(scratch):
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()
    rng = __import__("random").Random(3)
    sizes = [0, 1, 4095, 4096, 4097, (1 << 20) + 3]
    with running(scratch, _cfg(scratch)) as d:
        assert _until(lambda: _genl(d)["config_updates"] >= 1)
        mount(lower, mnt, "key=k1,gp=1,decide=none")
        try:
            data = {n: rng.randbytes(n) for n in sizes}
            for n, b in data.items():
                (mnt / f"f{n}").write_bytes(b)
            for n, b in data.items():
                assert (mnt / f"f{n}").read_bytes() == b, n
                assert os.stat(mnt / f"f{n}").st_size == n
            os.sync()
        finally:
            umount(mnt)
        assert _genl(d)["responses"] >= 1   # the kernel asked for k1 and got it
        for n, b in data.items():
            raw = (lower / f"f{n}").read_bytes()
            if raw == b"" and n == 0:
                continue   # an empty file may have no header yet
            assert raw[:4] == b"TAKA", n
            assert _decrypt(scratch, lower / f"f{n}") == b, n
        audit = (scratch / "audit.jsonl").read_text()
        assert '"exe":"kernel"' in audit.replace(" ", "") and "key-request" in audit
