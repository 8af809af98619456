"""tests/vmharness.py without a VM: the kernel-log scan on a clean and a dirty log,
and choosing the kernel."""

from fnmatch import fnmatch

import vmharness as vm

CLEAN = """\
[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1
[    0.000000] Command line: virtme_hostname=virtme-ng console=ttyS0 panic=-1
[    0.412345] Spectre V2 : Mitigation: Retpolines
[    1.982001] 9pnet_virtio: no channels available for device root
[    3.101010] takakryptfs: loading out-of-tree module taints kernel.
[    3.101011] takakryptfs: module verification failed: signature and/or required key missing - tainting kernel
[    3.200000] takakryptfs: agent registered (netlink port 1234)
[    9.000000] takakryptfs: bad tag in block 3 of inode 1523 (EIO)
[    9.500000] takakryptfs: agent left (netlink port 1234)
<6>[   10.000000] warning-free line about oopsie-free debugging
"""

DIRTY = """\
[    3.200000] takakryptfs: agent registered (netlink port 1234)
[    4.000000] ------------[ cut here ]------------
[    4.000001] WARNING: CPU: 1 PID: 812 at fs/takakryptfs/aops.c:120 tkfs_writepages+0x3c/0x90 [takakryptfs]
[    4.000002] Call Trace:
[    4.000003]  <TASK>
[    5.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    5.000001] Oops: 0000 [#1] PREEMPT SMP NOPTI
[    5.100000] general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#2]
[    6.000000] ======================================================
[    6.000001] WARNING: possible circular locking dependency detected
[    6.500000] INFO: task umount:901 blocked for more than 120 seconds.
[    7.000000] BUG kmalloc-64 (Tainted: G           OE     ): Objects remaining in kmalloc-64 on __kmem_cache_shutdown()
[    7.100000] kmem_cache_destroy tkfs_inode: Slab cache still has objects when called from tkfs_exit+0x20/0x40 [takakryptfs]
[    7.200000] VFS: Busy inodes after unmount of takakryptfs (takakryptfs)
[    8.000000] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)
[    8.100000] UBSAN: shift-out-of-bounds in fs/takakryptfs/header.c:42:9
[    8.200000] BUG: KASAN: slab-out-of-bounds in tkfs_read_folio+0x1a/0x50
[    9.000000] Kernel panic - not syncing: Fatal exception
"""


def test_clean_log_has_no_problems():
    assert vm.kernel_log_problems(CLEAN) == []
    assert vm.kernel_log_problems("") == []


def test_dirty_log_reports_every_kind():
    found = vm.kernel_log_problems(DIRTY)
    lines = [x for x in DIRTY.splitlines() if x.strip()]
    expected = [x for x in lines if "cut here" not in x and "<TASK>" not in x
                and "agent registered" not in x and "=====" not in x]
    assert found == expected
    for word in ("WARNING:", "Call Trace", "NULL pointer", "Oops", "general protection",
                 "circular locking", "INFO: task", "Objects remaining", "still has objects",
                 "Busy inodes",
                 "kmemleak", "UBSAN", "KASAN", "Kernel panic"):
        assert any(word in x for x in found), word


def test_newest_kernel_is_chosen(tmp_path, monkeypatch):
    names = ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-57-amd64", "vmlinuz-6.1.0-10-amd64",
             "vmlinuz-6.12.1-amd64"]
    monkeypatch.setattr(vm.glob, "glob", lambda pat: [f"/boot/{n}" for n in names
                                                      if fnmatch(f"/boot/{n}", pat)])
    assert vm.kernel("6.1.") == "/boot/vmlinuz-6.1.0-57-amd64"
    assert vm.kernel() == "/boot/vmlinuz-6.12.1-amd64"
    assert vm.kernel_release("/boot/vmlinuz-6.1.0-57-amd64") == "6.1.0-57-amd64"


def test_every_vm_test_is_marked_vm():
    """``-m "not vm"`` leaves out every test that boots a VM (a quick run of the host
    tests): a test file that boots one without the mark would still boot it."""
    import re
    from pathlib import Path
    here = Path(__file__).resolve().parent
    booting = [p for p in sorted(here.glob("test_*.py"))
               if re.search(r"\brun_guest\(|\bsystemd_guest\b", p.read_text())]
    assert booting, "no test file boots a VM: the scan is wrong"
    unmarked = [p.name for p in booting if "mark.vm" not in p.read_text()]
    assert unmarked == []


def test_forked_cli_matches_the_command(monkeypatch, tmp_path):
    """agent_helpers.run_takakrypt's fork (the guest's way to spare a Python start per
    command) gives what `python -m takakrypt` gives: exit code, stdout, stderr, the
    environment passed, bytes or text; the test process carries on untouched."""
    import os

    from agent_helpers import run_takakrypt

    sock = tmp_path / "none.sock"
    cases = [(["--version"], None), (["status"], {"TAKAKRYPT_CONTROL_SOCKET": str(sock)}),
             (["inspect", str(tmp_path / "missing")], None)]
    got = {}
    for fork in ("0", "1"):
        monkeypatch.setenv("TAKAKRYPT_TEST_FORK_CLI", fork)
        got[fork] = [run_takakrypt(a, env=None if e is None else dict(os.environ, **e),
                                   timeout=60) for a, e in cases]
    for a, b in zip(got["0"], got["1"]):
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert got["1"][0].returncode == 0 and got["1"][0].stdout.startswith("takakrypt ")
    assert got["1"][1].returncode == 12 and str(sock) in got["1"][1].stderr
    assert got["1"][2].returncode != 0 and "missing" in got["1"][2].stderr
    raw = run_takakrypt(["--version"], text=False)
    assert isinstance(raw.stdout, bytes) and raw.stdout.startswith(b"takakrypt ")


def test_vm_job_runs_once_and_reports_its_error():
    """A VM job (tests/conftest.py) runs its function once, whether started early or
    asked for first; its exception reaches every test that waits for it."""
    import pytest
    from conftest import VmJob
    calls = []
    job = VmJob(lambda: calls.append(1) or 7)
    job.start()
    job.start()
    assert job.result() == 7 and job.result() == 7 and calls == [1]
    bad = VmJob(lambda: 1 / 0)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            bad.result()


def test_running_vms_are_killed_at_the_end(tmp_path):
    """A session that ends early kills the VMs still running (their process group)."""
    import subprocess
    proc = vm._start_vm(["sh", "-c", "sleep 60 & sleep 60"], cwd=tmp_path,
                        stdout=subprocess.DEVNULL)
    assert proc.poll() is None
    vm.kill_running_vms()
    assert proc.poll() is not None and proc not in vm._RUNNING
