"""A kernel guard point for the data-path tests, inside the VM: an ext4 file system on
a RAM disk holds the lower directory; takakryptd (local keystore, key k1) serves the
module's KEY_REQUESTs over generic netlink, and the same lower directory is also a FUSE
guard point (separate mount point) for the interop checks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from agent_helpers import Daemon, base_config, run_takakrypt

FSTYPE = "takakryptfs"
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{cmd}: exit {r.returncode}: {r.stderr}")
    return r


def kmount(lower: Path, mnt: Path, opts: str = "key=k1,gp=1,decide=none") -> None:
    mnt.mkdir(exist_ok=True)
    rc = _libc.mount(str(lower).encode(), str(mnt).encode(), FSTYPE.encode(), 0, opts.encode())
    if rc:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {FSTYPE} -o {opts} {lower} {mnt}: {os.strerror(e)}")


def kumount(mnt: Path) -> None:
    if _libc.umount2(str(mnt).encode(), 0):
        e = ctypes.get_errno()
        raise OSError(e, f"umount {mnt}: {os.strerror(e)}")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Env:
    def __init__(self, base: Path):
        self.base = base
        self.ext = base / "ext"
        self.lower = self.ext / "lower"
        self.kmnt = base / "kmnt"
        self.fmnt = base / "fmnt"
        self.agent = None

    def remount(self) -> None:
        """Unmount and mount again: every inode and page of the mount is gone."""
        kumount(self.kmnt)
        kmount(self.lower, self.kmnt)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = run_takakrypt([*args, "--keystore", self.base / "keystore.json",
                           "--master-key-file", self.base / "master.key"], text=False)
        if check and r.returncode:
            raise AssertionError(f"takakrypt {args}: exit {r.returncode}: {r.stderr!r}")
        return r

    def decrypt(self, stored: Path, cli: bool = False) -> bytes:
        """What `takakrypt decrypt` makes of a stored file: the command itself with cli,
        else its code (takakrypt.stream.decrypt_file) in this process -- a Python start
        per file costs many seconds under TCG."""
        out = self.base / "decrypt.out"
        out.unlink(missing_ok=True)
        if cli:
            self.cli("decrypt", "-q", str(stored), str(out))
        else:
            from takakrypt.keys import open_keystore
            from takakrypt.stream import decrypt_file
            with open_keystore(str(self.base / "keystore.json"),
                               master_key_file=str(self.base / "master.key")) as ks:
                decrypt_file(str(stored), str(out), ks.get)
        data = out.read_bytes()
        out.unlink()
        return data


@contextlib.contextmanager
def kernel_env():
    base = Path(tempfile.mkdtemp(prefix="tkfs-", dir="/tmp"))
    base.chmod(0o755)   # other users (the permission tests) may walk to the mount
    env = Env(base)
    # ext4 on a RAM disk (virtme-ng's guest has no loop devices): brd, 384 MiB
    if not os.path.exists("/dev/ram0"):
        sh("modprobe", "brd", "rd_nr=1", f"rd_size={384 * 1024}")
    sh("mkfs.ext4", "-q", "-F", "/dev/ram0")
    env.ext.mkdir()
    sh("mount", "/dev/ram0", str(env.ext))
    env.lower.mkdir()
    env.fmnt.mkdir()
    cfg = base_config(base)
    cfg["policies"] = {"p": {"rules": [
        {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    # the FUSE guard point over the same lower directory (gp 1): the interop peer, and
    # the enabled guard point whose key the module may ask for (KEY_REQUEST rule 3)
    cfg["guard_points"] = [{"path": str(env.fmnt), "backing": str(env.lower),
                            "policy": "p", "key": "k1"}]
    try:
        # Python under TCG starts slowly (a minute when the host is busy): no 30 s limit
        agent = Daemon(base, cfg)
        try:
            agent.wait_for("READY=1", timeout=600)
            env.agent = agent
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "agent registered" not in sh("dmesg").stdout:
                time.sleep(0.2)
            kmount(env.lower, env.kmnt)
            try:
                yield env
            finally:
                with contextlib.suppress(OSError):
                    kumount(env.kmnt)
        finally:
            agent.stop()
    finally:
        sh("umount", str(env.ext), check=False)
        shutil.rmtree(base, ignore_errors=True)
