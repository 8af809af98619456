"""packaging/takakryptd.service under a real systemd as PID 1 (issue 15, item 2).

The Debian kernel is booted under QEMU (TCG: no KVM needed) with virtme-ng's
``--systemd``, over this machine's own root file system, so the guest runs this tree and
this interpreter.  The guest side (tests/systemd_unit_guest.py) starts the unit with
systemctl and looks at the guard point from a process outside the service; this side
asserts on what it saw.  `make test` installs the kernel, QEMU, busybox and virtme-ng
(ci/deps.sh, Makefile); without them the test is skipped, naming what is missing.
"""

from __future__ import annotations

import glob
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parent.parent


def _kernel() -> str | None:
    """The newest /boot/vmlinuz-* (Debian's linux-image-amd64 brings one)."""
    def version(path: str) -> list:
        return [(0, int(x), "") if x.isdigit() else (1, 0, x)
                for x in path.replace("-", ".").split(".")]
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=version)
    return found[-1] if found else None


def _vng() -> str | None:
    for cand in (os.environ.get("TAKAKRYPT_VNG"), str(Path(sys.executable).parent / "vng"),
                 shutil.which("vng")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not _kernel():
        missing.append("a kernel in /boot (Debian: linux-image-amd64)")
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 (Debian: qemu-system-x86)")
    if not shutil.which("busybox"):
        missing.append("busybox (Debian: busybox-static)")
    if not _vng():
        missing.append("vng (PyPI: virtme-ng, next to the interpreter or on PATH)")
    if not os.path.exists("/lib/systemd/systemd"):
        missing.append("systemd")
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason="VM tooling absent: " + ", ".join(_missing()))


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    # shared read-write with the guest (--rwdir): the guest side writes result.json,
    # guest.log, and vng's console output lands in console.log
    return _boot(tmp_path_factory.mktemp("vm"))


def _boot(out: Path) -> dict:
    data = boot_guest(out, TREE / "tests" / "systemd_unit_guest.py")
    assert "error" not in data, data["error"]
    return {v["name"]: v for v in data["variants"]}


def boot_guest(out: Path, script: Path, timeout: float = 480, memory: str = "1G") -> dict:
    """Boot the VM, run ``SCRIPT TREE OUT`` in it; what the script wrote to
    OUT/result.json.  Also used by tests/test_pg_debian.py."""
    env = dict(os.environ, PATH=f"{Path(_vng()).parent}:{os.environ.get('PATH', '')}")
    guest_cmd = f"{sys.executable} {script} {TREE} {out} >{out / 'guest.log'} 2>&1"
    cmd = [_vng(), "--run", _kernel(), "--disable-kvm", "--memory", memory, "--systemd",
           f"--rwdir={out}",
           # The host root carries /.dockerenv: systemd's generators then take the guest
           # for a container and ignore the kernel command line, so no getty is made for
           # ttyS0, which is where vng's --exec runs (its override of serial-getty@).
           # `container=` (empty) tells PID 1 it is in none, and PID 1 itself reads
           # systemd.unit=, which boots straight to that getty: sysinit and basic.target
           # (journald, udevd, /dev/log), nothing of this machine's multi-user.target.
           "--append", "container=",
           "--append", "systemd.unit=serial-getty@ttyS0.service",
           "--exec", guest_cmd]
    with open(out / "console.log", "wb") as log:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                       cwd=out, env=env, timeout=timeout, check=False)
    result = out / "result.json"
    assert result.exists(), ("the guest wrote no result; console tail:\n"
                             + (out / "console.log").read_text(errors="replace")[-4000:]
                             + "\nguest log:\n"
                             + ((out / "guest.log").read_text(errors="replace")
                                if (out / "guest.log").exists() else "<none>"))
    return json.loads(result.read_text())


def _explain(v: dict) -> str:
    return json.dumps({k: v[k] for k in v if k != "status"}, indent=1) + "\n" + v.get("status", "")


def test_shipped_unit_mounts_reach_the_host(guest):
    v = guest["shipped"]
    assert v["pid1_is_systemd"]
    assert v["start_rc"] == 0 and v["active"] == "active", _explain(v)
    # one mount namespace with PID 1, so the guard point is the host's guard point
    assert v["same_mnt_ns"], _explain(v)
    assert v["pid1_sees"] == ["fuse.takakrypt"], _explain(v)
    assert v["self_sees"] == ["fuse.takakrypt"], _explain(v)


def test_shipped_unit_enforces_policy_for_host_processes(guest):
    v = guest["shipped"]
    assert v["permitted_roundtrip"], _explain(v)
    assert v["denied_rc"] != 0 and "Permission denied" in v["denied_err"], _explain(v)
    assert not v["denied_saw_plaintext"]
    # what the permitted process wrote is ciphertext at rest
    assert v["stop_rc"] == 0, _explain(v)
    # stopped, the guard point fails closed: its mount stays dead (ENOTCONN), never bare
    assert not v["mounted_after_stop"] or v["after_stop_errno"] == errno.ENOTCONN, _explain(v)
    assert v["at_rest_magic"] == "TAKA" and v["at_rest_plaintext"] is False, _explain(v)


def test_checks_catch_a_namespaced_unit(guest):
    """Negative control: one mount-namespace option (ProtectSystem=full) added to the
    shipped unit hides the mount from PID 1, and the same checks see it."""
    v = guest["control-protectsystem"]
    assert v["start_rc"] == 0 and v["active"] == "active", _explain(v)
    assert v["service_sees"] == ["fuse.takakrypt"], _explain(v)
    assert not v["same_mnt_ns"] and v["pid1_sees"] == [] and v["self_sees"] == [], _explain(v)
    assert v["at_rest_plaintext"] is True, _explain(v)
