"""The kernel suite's guest side: runs only inside the VM that tests/test_kernel_vm.py
boots (it sets TAKAKRYPT_IN_VM=1 and TAKAKRYPT_KO; virtme-ng's init is on the kernel
command line).  Anywhere else nothing here is collected: these tests load a kernel
module and mount file systems as root."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]


def in_vm() -> bool:
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return False
    return os.environ.get("TAKAKRYPT_IN_VM") == "1" and "virtme" in cmdline


if not in_vm():
    collect_ignore_glob = ["test_*.py"]
else:
    for p in (TESTS, TESTS / "kernel"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))

MODULE = "takakryptfs"
FSTYPE = "takakryptfs"
_libc = ctypes.CDLL(None, use_errno=True)
SYS_delete_module = 176  # x86_64


def loaded() -> bool:
    return os.path.exists(f"/sys/module/{MODULE}")


def insmod() -> None:
    r = subprocess.run(["insmod", os.environ["TAKAKRYPT_KO"]], capture_output=True, text=True)
    assert r.returncode == 0, f"insmod {os.environ['TAKAKRYPT_KO']}: {r.stderr}"


def delete_module() -> int:
    """rmmod as the syscall: 0 or the errno (EBUSY while in use)."""
    rc = _libc.syscall(SYS_delete_module, MODULE.encode(), os.O_NONBLOCK)
    return 0 if rc == 0 else ctypes.get_errno()


def our_mounts() -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[2] == FSTYPE]


def has_fs() -> bool:
    return any(line.split()[-1] == FSTYPE for line in
               Path("/proc/filesystems").read_text().splitlines())


@pytest.fixture(scope="session", autouse=True)
def module():
    """insmod once; at the end every mount must be gone and rmmod must work."""
    if not loaded():
        insmod()
    yield
    left = our_mounts()
    assert not left, f"takakryptfs mounts left at the end: {left}"
    if loaded():
        err = delete_module()
        assert err == 0, f"rmmod after the last unmount: {os.strerror(err)}"


@pytest.fixture
def needs_fs():
    if not has_fs():
        pytest.skip("this build of takakryptfs registers no file system yet")


@pytest.fixture
def scratch():
    """A directory in the guest's own /tmp, removed afterwards (mounts under it first)."""
    d = Path(tempfile.mkdtemp(prefix="tkvm-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for m in sorted((m for m in our_mounts() if m.startswith(str(d))), key=len, reverse=True):
        subprocess.run(["umount", m], check=False)
    subprocess.run(["rm", "-rf", str(d)], check=False)


def mount(lower: Path, mnt: Path, opts: str) -> None:
    """mount(2) itself (tkfs_env.kmount): a mount(8) process costs about a second of
    emulated CPU under TCG, and test_module's slab check makes over a hundred mounts."""
    from tkfs_env import kmount
    kmount(lower, mnt, opts)


def umount(mnt: Path) -> None:
    from tkfs_env import kumount
    kumount(mnt)


@pytest.fixture(scope="session")
def kenv():
    """One kernel guard point environment (ext4 lower, takakryptd, FUSE peer, the
    takakryptfs mount) for the data-path and model tests: takakryptd takes minutes to
    start under TCG, so it starts once."""
    from tkfs_env import kernel_env
    with kernel_env() as e:
        yield e
