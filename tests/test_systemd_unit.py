"""packaging/takakryptd.service under a real systemd as PID 1 (issue 15, item 2).

The Debian kernel is booted under QEMU (TCG: no KVM needed) with virtme-ng's
``--systemd``, over this machine's own root file system, so the guest runs this tree and
this interpreter.  The guest side (tests/systemd_unit_guest.py) starts the unit with
systemctl and looks at the guard point from a process outside the service; this side
asserts on what it saw.  `make test` installs the kernel, QEMU, busybox and virtme-ng
(ci/deps.sh, Makefile); without them the test is skipped, naming what is missing.
The boot itself is tests/vmharness.py's, shared with the other VM tests.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from vmharness import TREE, build_module, headers_for, kernel, missing, result_of


def _missing() -> list[str]:
    return missing(systemd=True)


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(bool(_missing()), reason="VM tooling absent: " + ", ".join(_missing())),
]


SYSTEMD_GUEST = ("systemd_unit_guest.py", 480, "1G")


@pytest.fixture(scope="module")
def guest(systemd_guest):
    data = result_of(systemd_guest[__name__])
    assert "error" not in data, data["error"]
    found = {v["name"]: v for v in data["variants"]}
    found["insmod"] = data.get("insmod")
    return found


def prepare_guest(out: Path) -> None:
    _build_module(out)


def _build_module(out: Path) -> None:
    """takakryptfs.ko for the booted kernel (as tests/test_kernel_vm.py builds it), for
    the guest's kernel-engine variant; a build failure fails that test, not the others."""
    kbuild = headers_for(kernel())
    if kbuild is None:
        return
    b = build_module(TREE / "kernel", kbuild)
    (out / "module-build.log").write_text(b.stdout + b.stderr)
    if b.returncode == 0:
        shutil.copy(TREE / "kernel" / "takakryptfs.ko", out / "takakryptfs.ko")


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


def test_shipped_unit_serves_a_kernel_guard_point(guest):
    """engine: kernel under the shipped unit: takakryptd (CAP_NET_ADMIN, AF_NETLINK)
    registers with the module and mounts takakryptfs where PID 1 sees it; `systemctl
    restart` keeps the same mount and serves it again; after stop the directory is
    denied (keys wiped), never bare, and TAKA at rest."""
    assert guest["insmod"] and guest["insmod"][0] == 0, guest["insmod"]
    v = guest.get("kernel")
    assert v is not None, "the kernel variant did not run (module not built?)"
    assert v["start_rc"] == 0 and v["active"] == "active", _explain(v)
    assert v["same_mnt_ns"] and v["pid1_sees"] == ["takakryptfs"], _explain(v)
    assert v["permitted_roundtrip"], _explain(v)
    assert v["denied_rc"] != 0 and "Permission denied" in v["denied_err"], _explain(v)
    assert not v["denied_saw_plaintext"]
    assert v["restart_rc"] == 0, _explain(v)
    assert v["mount_ids_after_restart"] == v["mount_ids_before_restart"] != [], _explain(v)
    assert v["read_after_restart"], _explain(v)
    assert v["stop_rc"] == 0, _explain(v)
    assert not v["mounted_after_stop"] or v["after_stop_errno"] == errno.EACCES, _explain(v)
    assert v["at_rest_magic"] == "TAKA" and v["at_rest_plaintext"] is False, _explain(v)
