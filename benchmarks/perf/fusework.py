"""Work per operation on the FUSE data path, counted rather than timed.

A guard point (``python -m takakrypt.guard --allow-all``, the tree under test on
PYTHONPATH) over a fresh backing directory; a fixed tree made here from a seed (tar
entries, sizes and contents are the same on every machine); four phases:

    untar      tar -xf of the tree, then sync
    lsR_cold   ls -lR on a fresh mount of the same backing store (kernel caches empty)
    lsR_warm   ls -lR again
    rmrf       rm -rf of the tree

For each phase: the FUSE requests the kernel sent to this mount (tracepoint
``fuse:fuse_request_send`` in a tracefs instance of our own, filtered on this mount's
connection, so other mounts and other tracers are not counted), per tree entry; and
the engine's system calls (``strace -f`` on the serving process: every thread but the
Python main loop's) per request.  Needs root, /dev/fuse, tracefs with the fuse events, strace.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
PHASES = ("untar", "lsR_cold", "lsR_warm", "rmrf")

# 12 directories of 24 files (sizes cycling over edge cases of the 4 KiB block and a
# few larger files), one symlink and one empty subdirectory per directory
SIZES = (0, 1, 100, 4095, 4096, 4097, 12000, 65536, 70000, 1000, 2048, 200000)


class FuseWorkError(Exception):
    """The FUSE counts cannot be taken on this machine (message says why)."""


def make_tree(path: Path) -> int:
    """Write the fixed tree as a tar at ``path``; return its number of entries."""
    rnd = random.Random(17)
    entries = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", link: str = "") -> None:
            nonlocal entries
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.uid, ti.gid = kind, 1_700_000_000, 0, 0
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            ti.linkname, ti.size = link, len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)
            entries += 1
        add("tree", tarfile.DIRTYPE)
        for d in range(12):
            add(f"tree/d{d:02d}", tarfile.DIRTYPE)
            add(f"tree/d{d:02d}/empty", tarfile.DIRTYPE)
            for f in range(24):
                n = SIZES[(d + f) % len(SIZES)]
                add(f"tree/d{d:02d}/f{f:02d}.dat", tarfile.REGTYPE, rnd.randbytes(n))
            add(f"tree/d{d:02d}/link", tarfile.SYMTYPE, link="f00.dat")
    return entries


def check_machine() -> None:
    """Raise FuseWorkError unless every tool the counts need is here."""
    if os.geteuid() != 0:
        raise FuseWorkError("needs root (tracefs, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        raise FuseWorkError("no /dev/fuse")
    for tool in ("strace", "tar", "fusermount3"):
        if shutil.which(tool) is None:
            raise FuseWorkError(f"needs {tool}")
    if not (TRACEFS / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False,
                       capture_output=True)
    if not (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir():
        raise FuseWorkError("no fuse:fuse_request_send tracepoint in this kernel")


class Tracer:
    """fuse_request_send events of one connection, in a tracefs instance of our own."""

    def __init__(self) -> None:
        self.dir = TRACEFS / "instances" / f"takakrypt-perf-{os.getpid()}"
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text("16384")
        self.event = self.dir / "events" / "fuse" / "fuse_request_send"

    def start(self, connection: int) -> None:
        (self.event / "filter").write_text(f"connection == {connection}")
        (self.dir / "trace").write_text("")
        (self.event / "enable").write_text("1")

    def stop(self) -> dict[str, int]:
        (self.event / "enable").write_text("0")
        lost = sum(int(m.group(1)) for m in re.finditer(
            r"^overrun: (\d+)", "".join(p.read_text() for p in
                                        (self.dir / "per_cpu").glob("cpu*/stats")), re.M))
        if lost:
            raise FuseWorkError(f"tracefs lost {lost} events")
        kinds: dict[str, int] = {}
        for m in re.finditer(r"\(FUSE_([A-Z_0-9]+)\)", (self.dir / "trace").read_text()):
            kinds[m.group(1)] = kinds.get(m.group(1), 0) + 1
        return kinds

    def close(self) -> None:
        try:
            (self.event / "enable").write_text("0")
        finally:
            self.dir.rmdir()


def _connection(mnt: Path) -> int:
    st = os.stat(mnt)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev)  # the kernel's dev_t


class Strace:
    """``strace -f`` attached to every thread of the engine; counts system calls by name.

    The process's main thread is left out: it runs the Python loop of
    ``python -m takakrypt.guard`` (signals, a mount check every 0.2 s), whose calls
    depend on how long a phase takes, not on the requests served."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.err = out.with_suffix(".err")
        with open(self.err, "wb") as e:
            self.proc = subprocess.Popen(["strace", "-f", "-p", str(pid), "-o", str(out)],
                                         stdout=subprocess.DEVNULL, stderr=e)
        for _ in range(2000):  # a wait for the attach, not a timed assertion
            if " attached" in self.err.read_text():  # "Process N attached with M threads"
                break
            time.sleep(0.01)
        else:
            self.proc.kill()
            raise FuseWorkError("strace did not attach to the engine's threads")

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        calls: dict[str, int] = {}
        call = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")
        with open(self.out, errors="replace") as f:
            for line in f:
                m = call.match(line)  # "<... x resumed>", "+++ exited", "--- SIG" do not match
                if m and int(m.group(1)) != self.pid:
                    calls[m.group(2)] = calls.get(m.group(2), 0) + 1
        return calls


class Guard:
    """A guard point served by ``python -m takakrypt.guard`` from ``src``."""

    def __init__(self, python: str, src: Path, back: Path, mnt: Path, key: Path,
                 log: Path) -> None:
        self.mnt = mnt
        env = dict(os.environ, PYTHONPATH=str(src))
        with open(log, "ab") as lf:
            self.proc = subprocess.Popen(
                [python, "-m", "takakrypt.guard", "--backing", str(back), "--mountpoint",
                 str(mnt), "--key-file", str(key), "--allow-all", "--threads", "4"],
                env=env, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                start_new_session=True)
        for _ in range(3000):  # a wait for the mount (slow on a loaded machine)
            if os.path.ismount(mnt):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.close()
        raise FuseWorkError(f"guard point did not mount; log:\n{log.read_text()}")

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _phase(guard: Guard, tracer: Tracer, work: Path, name: str, argv: list[str]
           ) -> dict[str, object]:
    st = Strace(guard.proc.pid, work / f"strace.{name}")
    try:
        tracer.start(_connection(guard.mnt))
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if name == "untar":
            os.sync()
        kinds = tracer.stop()
    finally:
        calls = st.stop()
    return {"requests": kinds, "syscalls": calls}


def collect(python: str, src: Path, *, keep: Path | None = None) -> dict[str, object]:
    """Run the four phases once; return ``{"entries": N, "phases": {phase: {"requests":
    {KIND: n}, "syscalls": {NAME: n}}}}``."""
    check_machine()
    work = Path(tempfile.mkdtemp(prefix="takakrypt-perf-fuse."))
    tracer = Tracer()
    guard: Guard | None = None
    try:
        tar = work / "tree.tar"
        entries = make_tree(tar)
        back, mnt, key = work / "back", work / "mnt", work / "key"
        back.mkdir()
        mnt.mkdir()
        key.write_bytes(bytes(range(32)))
        key.chmod(0o600)
        log = work / "guard.log"
        phases: dict[str, object] = {}
        guard = Guard(python, src, back, mnt, key, log)
        phases["untar"] = _phase(guard, tracer, work, "untar",
                                 ["tar", "-C", str(mnt), "-xf", str(tar)])
        guard.close()
        guard = Guard(python, src, back, mnt, key, log)  # cold kernel caches
        lsr = ["ls", "-lR", str(mnt)]
        phases["lsR_cold"] = _phase(guard, tracer, work, "lsR_cold", lsr)
        phases["lsR_warm"] = _phase(guard, tracer, work, "lsR_warm", lsr)
        phases["rmrf"] = _phase(guard, tracer, work, "rmrf", ["rm", "-rf", str(mnt / "tree")])
        return {"entries": entries, "phases": phases}
    finally:
        if guard is not None:
            guard.close()
        tracer.close()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
