"""takakryptd's health of a guard point is a real request through its mount (issue 16
item 4): a dead connection or a mount stacked on the guard point is unhealthy, however
long the kernel keeps answering a stat of the root from its cache."""

import json
import os
import subprocess
import shutil
import signal

import pytest

from agent_helpers import Daemon, base_config, running
from fuse_helpers import raw_mount
from takakrypt.guard import (FUSECTL, _takakrypt_mounts, abort_connection, cleanup_stale,
                             mount_device)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")


def _cfg(tmp_path):
    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir(exist_ok=True)
    cfg["policies"] = {"p": {"rules": [{"user_set": "root", "actions": ["all_ops"],
                                        "effects": ["permit", "apply_key"]}]}}
    # the kernel may answer a stat of the root from its cache for a minute
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1",
                            "metadata_cache": 60}]
    return cfg, str(gp)


def _stacked(path):
    return sum(1 for m in _takakrypt_mounts() if m[0] == path)


def test_a_restart_right_after_sigkill_serves_and_is_healthy(tmp_path):
    # issue 16: the restart saw the dead mount's cached root, mounted on top of it, and
    # every access failed with ENOTCONN while `status` said healthy
    cfg, gp = _cfg(tmp_path)
    d = Daemon(tmp_path, cfg)
    try:
        d.wait_for("READY=1")
        with open(os.path.join(gp, "f"), "w") as f:
            f.write("survives")
        os.stat(gp)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
    finally:
        d.stop()
    try:
        _restart_serves(tmp_path, cfg, gp)
    finally:
        cleanup_stale(gp)
    assert _stacked(gp) == 0


def _restart_serves(tmp_path, cfg, gp):
    with running(tmp_path, cfg) as d2:
        assert _stacked(gp) == 1
        with open(os.path.join(gp, "f")) as f:
            assert f.read() == "survives"
        rc, st = _status(d2)
        assert rc == 0 and st["state"] == "healthy", st


def _status(d):
    r = d.cli("status", "--json", check=False)
    return r.returncode, json.loads(r.stdout)


def test_a_dead_guard_point_is_unhealthy(tmp_path):
    cfg, gp = _cfg(tmp_path)
    try:
        _dead_guard_point_is_unhealthy(tmp_path, cfg, gp)
    finally:
        cleanup_stale(gp)  # the agent leaves a dead mount behind (fail closed)
    assert _stacked(gp) == 0


def _dead_guard_point_is_unhealthy(tmp_path, cfg, gp):
    with running(tmp_path, cfg) as d:
        rc, st = _status(d)
        assert rc == 0 and st["state"] == "healthy", st
        os.stat(gp)  # cached for 60 s from here
        # fusectl not mounted, as in containers and on minimal systems: the abort mounts
        # it (systemd mounts it at boot elsewhere)
        if os.path.ismount(FUSECTL):
            subprocess.run(["umount", FUSECTL], check=False)
        assert abort_connection(mount_device(gp))  # the connection ends; the mount stays
        assert os.path.ismount(FUSECTL)
        assert os.stat(gp)  # the cache still answers
        rc, st = _status(d)
        assert rc == 1 and st["state"] == "unhealthy" and not st["health"][f"guard:{gp}"], st
        assert "not mounted" in st["problems"][f"guard:{gp}"], st


def test_a_mount_stacked_on_a_guard_point_is_unhealthy(tmp_path):
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        fd = raw_mount(gp)  # a second takakrypt mount on top, answering nothing
        try:
            rc, st = _status(d)
            assert rc == 1 and st["state"] == "unhealthy", st
            assert "2 takakrypt mounts stacked" in st["problems"][f"guard:{gp}"], st
        finally:
            os.close(fd)  # the top connection ends: it is cleaned up as a dead one
            cleanup_stale(gp)
        assert _stacked(gp) == 1
        rc, st = _status(d)
        assert rc == 0 and st["state"] == "healthy", st
