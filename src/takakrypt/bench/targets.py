"""Where the workloads run.

* ``native``: a plain directory on the user's file system, the reference;
* ``fuse``: a FUSE guard point under the policy a deployment would write (each workload
  program permitted by executable path *and* SHA-256 with the key applied, everything
  else denied) -- the figure users see first;
* ``fuse-allow-all``: the same engine with an allow-all policy (every process gets
  plaintext, decisions per uid only), the engine's cost without per-process identity;
* ``kernel``: the kernel engine, when its file system type is registered (not built yet:
  reported as not loaded).

Guard points are served by a child process (:mod:`.serve`) with a throwaway random key
in a 0600 file under a private directory; :class:`Guard` always unmounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BenchError

#: seconds to wait for a guard point server to say it serves
MOUNT_TIMEOUT = 60.0


@dataclass
class Target:
    name: str                 # native | fuse | fuse-allow-all
    label: str                # for tables and plots
    path: Path                # where the workloads run
    backing: Path             # where untimed set-up may create directories directly
    engine: str = "native"    # native | fuse | kernel
    policy: str = "none"      # none | realistic | allow-all
    guard: Guard | None = field(default=None, repr=False)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "label": self.label, "engine": self.engine,
                "policy": self.policy, "status": "ok"}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def realistic_policy(programs: dict[str, str]) -> str:
    """The configuration (YAML) of policy ``bench``: one process set per workload
    program, named by its real path and the SHA-256 of its content, permitted with the
    key applied; no rule for anything else (the default: deny)."""
    lines = ["process_sets:"]
    for name, exe in sorted(programs.items()):
        real = os.path.realpath(exe)
        lines += [f"  {name}:", f"    executables: [{json.dumps(real)}]",
                  f"    sha256: [{sha256_file(real)}]"]
    lines += ["policies:", "  bench:",
              "    description: workload programs by path and hash get plaintext; "
              "everything else is denied", "    rules:"]
    for name in sorted(programs):
        lines.append(f"      - {{process_set: {name}, actions: [all_ops], "
                     f"effects: [permit, apply_key]}}")
    lines.append("      - {actions: [all_ops], effects: [deny]}")
    return "\n".join(lines) + "\n"


def kernel_engine() -> tuple[bool, str]:
    """(loaded, explanation) for the kernel engine (issue 18): its file system type in
    /proc/filesystems or its module in /sys/module."""
    try:
        with open("/proc/filesystems") as f:
            types = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        types = set()
    found = sorted(t for t in types if t.startswith("takakrypt"))
    mods = [m for m in ("takakryptfs", "takakrypt") if os.path.isdir(f"/sys/module/{m}")]
    if found or mods:
        return True, ("loaded (" + ", ".join(found + mods) + "); this runner cannot "
                      "mount it yet")
    return False, "not loaded (no takakrypt file system type in /proc/filesystems)"


class KeyFile:
    """A random 32-byte key in a 0600 file under a private 0700 directory; ``wipe()``
    overwrites and removes it."""

    def __init__(self, private: Path) -> None:
        self.dir = private / "key"
        self.dir.mkdir(mode=0o700)
        self.path = self.dir / "bench.key"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(32))
        finally:
            os.close(fd)

    def wipe(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.write(fd, b"\0" * 32)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _mounted(path: Path) -> bool:
    from ..guard import fuse_mounts

    return str(path) in fuse_mounts(str(path))


class Guard:
    """A guard point served by ``python -m takakrypt.bench.serve`` in its own session."""

    def __init__(self, mountpoint: Path, backing: Path, key: KeyFile, private: Path,
                 policy_yaml: str | None, threads: int = 4) -> None:
        self.mountpoint, self.backing = mountpoint, backing
        self.log = private / f"serve-{mountpoint.name}.log"
        spec = private / f"serve-{mountpoint.name}.json"
        spec.write_text(json.dumps({"mountpoint": str(mountpoint), "backing": str(backing),
                                    "key_file": str(key.path), "threads": threads,
                                    "policy_yaml": policy_yaml}))
        self.proc: subprocess.Popen[bytes] | None = None
        self._spec = spec

    def start(self) -> None:
        src = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "takakrypt.bench.serve", str(self._spec)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                start_new_session=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], MOUNT_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            self.stop()
            why = self.log.read_text(errors="replace").strip().splitlines()
            raise BenchError(f"cannot mount a guard point at {self.mountpoint}: "
                                  f"{why[-1] if why else 'no answer from its server'}")

    def stop(self) -> None:
        """Stop the server (it unmounts), then make sure nothing is left mounted."""
        from ..guard import GuardError, force_unmount

        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None and p.stdout is not None:
            p.stdout.close()
        for _ in range(3):
            if not _mounted(self.mountpoint):
                break
            try:
                force_unmount(str(self.mountpoint))
            except GuardError:
                time.sleep(0.2)
        self.proc = None
