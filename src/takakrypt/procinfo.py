"""Who is asking: process identity from /proc.

A request names a thread id (FUSE and the kernel report the calling *thread*).  This
module turns it into the process (thread group), its executable, start time, names,
command line and groups.  The start time (clock ticks since boot, /proc/PID/stat field
22) goes with the pid into every cache key, so a recycled pid can never inherit a
decision.  Executable hashes are cached by (device, inode, size, mtime) so a binary is
hashed once until it changes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

DATABASE_SIGNATURES: dict[str, tuple[str, ...]] = {
    # database type: executable basenames (or comm prefixes for oracle)
    "postgres": ("postgres", "postmaster"),
    "mysql": ("mysqld", "mariadbd", "mysqld-debug"),
    "mongodb": ("mongod", "mongos"),
    "oracle": ("oracle", "tnslsnr"),
    "redis": ("redis-server",),
    "mssql": ("sqlservr",),
    "db2": ("db2sysc",),
    "sqlite": ("sqlite3",),
}


def detect_database(exe: str, comm: str, cmdline: tuple[str, ...]) -> str | None:
    """Database type of a process from its executable and command line, or None."""
    names = {os.path.basename(exe), comm}
    if cmdline:
        names.add(os.path.basename(cmdline[0]))
    for db, sigs in DATABASE_SIGNATURES.items():
        if names & set(sigs):
            return db
    # Oracle background processes rename themselves ora_pmon_SID, ora_dbw0_SID, ...
    if comm.startswith("ora_") or any(n.startswith("ora_") for n in names):
        return "oracle"
    # PostgreSQL backends rewrite argv: "postgres: 15/main: checkpointer"
    if cmdline and cmdline[0].startswith("postgres:"):
        return "postgres"
    return None


@dataclass(frozen=True, slots=True)
class Process:
    """A snapshot of one process.  ``exe_id`` = (dev, ino, size, mtime_ns) of the binary."""

    pid: int
    start_time: int
    exe: str
    comm: str
    cmdline: tuple[str, ...] = ()
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    exe_id: tuple[int, int, int, int] | None = None
    database: str | None = field(default=None)

    @property
    def name(self) -> str:
        return self.comm


class ProcessGone(Exception):
    """The process exited before it could be inspected (callers deny)."""


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.read(fd, 65536)
        if len(out) == 65536:  # long command lines
            while chunk := os.read(fd, 65536):
                out += chunk
        return out
    finally:
        os.close(fd)


def tgid_of(tid: int) -> int:
    try:
        for line in _read(f"/proc/{tid}/status").splitlines():
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(tid) from None
    raise ProcessGone(tid)


def start_time_of(pid: int) -> int:
    try:
        stat = _read(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[19])  # field 22 overall; fields 3.. are rest[0..]


def inspect(tid: int) -> Process:
    """Inspect the process that thread ``tid`` belongs to (raises ProcessGone)."""
    try:
        status = _read(f"/proc/{tid}/status")
        pid = uid = gid = -1
        comm = ""
        groups: tuple[int, ...] = ()
        for line in status.splitlines():
            key, _, val = line.partition(b":")
            if key == b"Name":
                comm = val.strip().decode("utf-8", "replace")
            elif key == b"Tgid":
                pid = int(val)
            elif key == b"Uid":
                uid = int(val.split()[3])  # filesystem uid
            elif key == b"Gid":
                gid = int(val.split()[3])
            elif key == b"Groups":
                groups = tuple(int(g) for g in val.split())
                break  # Groups follows Tgid, Uid and Gid in /proc/PID/status
        if pid < 0:
            raise ProcessGone(tid)
        if pid != tid:  # a thread's Name is its own; the process name is the leader's
            comm = _read(f"/proc/{pid}/comm").decode("utf-8", "replace").rstrip("\n")
        start = start_time_of(pid)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            st = os.stat(f"/proc/{pid}/exe")
            exe_id: tuple[int, int, int, int] | None = (st.st_dev, st.st_ino, st.st_size,
                                                         st.st_mtime_ns)
        except (PermissionError, FileNotFoundError):
            exe, exe_id = "", None  # kernel threads have no exe
        if exe.endswith(" (deleted)"):
            exe = exe[: -len(" (deleted)")]
        raw = _read(f"/proc/{pid}/cmdline")
        cmdline = tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)
        # the pid may have been reused while we read: the start time must not change
        if start_time_of(pid) != start:
            raise ProcessGone(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(tid) from None
    return Process(pid=pid, start_time=start, exe=exe, comm=comm, cmdline=cmdline, uid=uid,
                   gid=gid, groups=groups, exe_id=exe_id,
                   database=detect_database(exe, comm, cmdline))


class ExeHasher:
    """SHA-256 of executables, cached by (dev, ino, size, mtime_ns); thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._cache: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self.hashes = 0  # files actually read (for tests and metrics)

    def sha256(self, proc: Process) -> str | None:
        """Hash of the binary ``proc`` runs, read through /proc/PID/exe so a renamed or
        replaced path cannot substitute another file.  None if it cannot be read."""
        if proc.exe_id is None:
            return None
        with self._lock:
            hit = self._cache.get(proc.exe_id)
            if hit is not None:
                self._cache.move_to_end(proc.exe_id)
                return hit
        path = f"/proc/{proc.pid}/exe" if proc.pid > 0 else proc.exe
        try:
            digest = self._hash_file(path, proc.exe_id)
        except OSError:
            return None
        if digest is None:
            return None
        with self._lock:
            self._cache[proc.exe_id] = digest
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return digest

    def _hash_file(self, path: str, exe_id: tuple[int, int, int, int]) -> str | None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != exe_id:
                return None  # changed under us: do not cache a hash for the wrong identity
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.hashes += 1
        return h.hexdigest()


def file_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
