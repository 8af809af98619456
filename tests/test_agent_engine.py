"""takakryptd with ``engine: kernel`` guard points on a host without takakryptfs: the
guard point fails to start naming `modprobe takakryptfs`, nothing is mounted in its
place (no FUSE fallback), the others serve; a reload that turns a FUSE guard point to
the kernel engine keeps FUSE serving (never a bare directory) and says why; `guard
list` and `status` show the engine.  With the module, in the VM:
tests/kernel/guest/test_agent_engine.py."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import yaml

from agent_helpers import Daemon, base_config, until

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                       or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3"),
    pytest.mark.skipif(os.path.isdir("/sys/module/takakryptfs"),
                       reason="takakryptfs is loaded here (the VM suite covers it)"),
]


def _fstypes(path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split(" ")[4] == str(path):
                out.append(right.split(" ")[0])
    return out


_until = until


def _status(d) -> dict:
    return json.loads(d.cli("status", "--json", check=False).stdout)


def test_kernel_guard_point_without_the_module(tmp_path):
    cfg = base_config(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg["guard_points"] = [{"path": str(a), "policy": "p", "key": "k1", "engine": "kernel"},
                           {"path": str(b), "policy": "p", "key": "k1"}]
    d = Daemon(tmp_path, cfg)
    try:
        def listed():
            try:
                gl = {g["path"]: g for g in d.jcli("guard", "list")}
            except AssertionError:  # the control socket is not there yet
                return None
            return gl if gl[str(a)]["error"] and gl[str(b)]["mounted"] else None

        gl = _until(listed)
        assert gl, d.logtext()
        err = gl[str(a)]["error"]
        assert err.startswith("the takakryptfs kernel module is not loaded (generic netlink "
                              "family 'takakrypt' absent): load it with `modprobe "
                              "takakryptfs`"), err
        assert err.endswith("engine kernel never falls back to FUSE or to an unprotected "
                            "directory")
        assert (gl[str(a)]["engine"], gl[str(a)]["mounted"], gl[str(a)]["mount"]) == \
            ("kernel", False, None)
        assert (gl[str(b)]["engine"], gl[str(b)]["mounted"]) == ("fuse", True)
        assert _fstypes(a) == [] and _fstypes(b) == ["fuse.takakrypt"]
        text = d.cli("guard", "list").stdout
        assert any(x.startswith(f"unmounted {a} ") and "engine kernel" in x
                   for x in text.splitlines()), text
        st = _status(d)
        assert not st["healthy"] and st["problems"][f"guard:{a}"] == err
        # no READY=1: the notify STATUS says which guard point keeps the start from it
        msg = d.wait_for("STATUS=" + f"not ready: guard point {a}: {err}"[:200], timeout=10)
        assert "READY=1" not in msg.split("\n")

        # a reload turning the FUSE guard point to the kernel: FUSE goes on serving
        cfg["guard_points"][1]["engine"] = "kernel"
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.cli("reload")
        gl = {g["path"]: g for g in d.jcli("guard", "list")}
        assert gl[str(b)]["mounted"] and _fstypes(b) == ["fuse.takakrypt"]
        assert gl[str(b)]["engine"] == "kernel"
        assert gl[str(b)]["error"].startswith("engine kernel not applied, still served by "
                                              "FUSE: the takakryptfs kernel module is not "
                                              "loaded"), gl[str(b)]
        assert not _status(d)["healthy"]
        # ... and back to fuse: the error goes; the kernel one turned fuse mounts
        cfg["guard_points"][1]["engine"] = "fuse"
        cfg["guard_points"][0]["engine"] = "fuse"
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.cli("reload")
        assert _status(d)["healthy"]  # (status checks health now: guard list shows it)
        gl = {g["path"]: g for g in d.jcli("guard", "list")}
        assert gl[str(b)]["error"] is None and gl[str(a)]["error"] is None, gl
        assert _fstypes(a) == ["fuse.takakrypt"] and _fstypes(b) == ["fuse.takakrypt"]
        assert d.wait_for("READY=1", timeout=30)
    finally:
        d.stop(sig=signal.SIGTERM)
    assert _fstypes(a) == [] and _fstypes(b) == []
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "guard-point" and e["path"] == str(a)
               and "modprobe takakryptfs" in e["reason"] for e in audit)
