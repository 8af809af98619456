"""Who is asking: process identity from /proc.

A request names a thread id (FUSE and the kernel report the calling *thread*).  This
module identifies that thread: its executable, command line, credentials and tracer are
read from /proc/<tid> (they belong to the thread's address space and task, and they
survive the exit of the process's main thread, when /proc/<tgid>/exe is gone), its
process (thread group) from "Tgid:".  The process's start time (clock ticks since boot,
/proc/PID/stat field 22) goes with the pid into every cache key, so a recycled pid can
never inherit a decision.

Executable hashes are cached by (device, inode, size, mtime, ctime).  The first four are
under the file owner's control (``touch -d``/``utime`` restores an mtime); the ctime is
not: every write, chmod, chown or utime sets it to the current time, which only the
clock's owner (CAP_SYS_TIME) can choose.  A hash is not cached while the ctime is
younger than :data:`RACY_CTIME` (a change within the same timestamp tick could keep
it), and the file's identity is compared before and after reading it.  The kernel's
change counter (i_version, STATX_CHANGE_COOKIE) is not offered to user space.
"""

from __future__ import annotations

import hashlib
import os
import stat as statmod
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

#: seconds: a hash read while the executable's ctime is younger is not cached
RACY_CTIME = 2.0

DATABASE_SIGNATURES: dict[str, tuple[str, ...]] = {
    # database type: basenames of the server executable
    "postgres": ("postgres", "postmaster"),
    "mysql": ("mysqld", "mariadbd", "mysqld-debug"),
    "mongodb": ("mongod", "mongos"),
    "oracle": ("oracle", "tnslsnr"),
    "redis": ("redis-server",),
    "mssql": ("sqlservr",),
    "db2": ("db2sysc",),
    "sqlite": ("sqlite3",),
}


def detect_database(exe: str) -> str | None:
    """Database type of a process from its executable (the /proc/PID/exe path), or None.

    Never from argv[0] or comm: those are chosen by the caller (``exec -a postgres``).
    The executable's basename still is chosen by whoever names the file, so a database
    type is a hint, not an identity (docs/policy.md, "Process identity")."""
    base = os.path.basename(exe)
    for db, sigs in DATABASE_SIGNATURES.items():
        if base in sigs:
            return db
    return None


#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of an executable
ExeId = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class Process:
    """A snapshot of one calling thread and its process.  ``exe_id`` identifies the
    binary (:data:`ExeId`); ``exe_owner`` is its (uid, gid, mode); ``tracer`` the pid of
    a process tracing it (ptrace, any thread of the process), 0 if none."""

    pid: int
    start_time: int
    exe: str
    comm: str
    cmdline: tuple[str, ...] = ()
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    exe_id: ExeId | None = None
    database: str | None = field(default=None)
    tid: int = 0
    exe_owner: tuple[int, int, int] | None = None
    tracer: int = 0

    @property
    def name(self) -> str:
        return self.comm


class ProcessGone(Exception):
    """The process exited before it could be inspected (callers deny)."""


def _read(path: str, dir_fd: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
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


def _start_time(stat: bytes) -> int:
    # comm may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[19])  # field 22 overall; fields 3.. are rest[0..]


def start_time_of(pid: int) -> int:
    try:
        return _start_time(_read(f"/proc/{pid}/stat"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None


def exe_identity(st: os.stat_result) -> ExeId:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def exe_ino_key(exe_id: ExeId) -> int:
    """The executable's inode number with its ctime folded in, as the FUSE engine sends
    it in ``exe_ino`` (src/_native/fuse_impl.c ``exe_ino_key``): cache keys built on it
    change when the binary is rewritten in place."""
    return (exe_id[1] ^ (exe_id[4] * 0x9E3779B97F4A7C15)) & 0xFFFF_FFFF_FFFF_FFFF


def _tracer_of_any_thread(pid: int, own: int) -> int:
    """TracerPid of the first traced thread of ``pid`` (``own``: the calling thread's,
    already read), 0 if none: a tracer of any thread reads the whole address space."""
    if own:
        return own
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    for t in tasks:
        try:
            for line in _read(f"/proc/{pid}/task/{t}/status").splitlines():
                if line.startswith(b"TracerPid:"):
                    if int(line.split()[1]):
                        return int(line.split()[1])
                    break
        except (FileNotFoundError, ProcessLookupError):
            continue  # that thread exited meanwhile
    return 0


def inspect(tid: int) -> Process:
    """Inspect thread ``tid`` and the process it belongs to (raises ProcessGone).

    Everything about the caller is read through one directory fd on /proc/<tid>, which
    pins that task: once it is gone, reads under the fd fail, whatever reuses the
    number.  The executable is the thread's (its address space's), which stays readable
    after the process's main thread has exited (pthread_exit from main)."""
    try:
        dfd = os.open(f"/proc/{tid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(tid) from None
    try:
        return _inspect(tid, dfd)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(tid) from None
    finally:
        os.close(dfd)


def _inspect(tid: int, dfd: int) -> Process:
    tstart = _start_time(_read("stat", dfd))
    status = _read("status", dfd)
    pid = uid = gid = -1
    tracer = 0
    comm = ""
    groups: tuple[int, ...] = ()
    for line in status.splitlines():
        key, _, val = line.partition(b":")
        if key == b"Name":
            comm = val.strip().decode("utf-8", "replace")
        elif key == b"Tgid":
            pid = int(val)
        elif key == b"TracerPid":
            tracer = int(val)
        elif key == b"Uid":
            uid = int(val.split()[3])  # filesystem uid
        elif key == b"Gid":
            gid = int(val.split()[3])
        elif key == b"Groups":
            groups = tuple(int(g) for g in val.split())
            break  # Groups follows Tgid, TracerPid, Uid and Gid in /proc/PID/status
    if pid < 0:
        raise ProcessGone(tid)
    if pid != tid:  # a thread's Name is its own; the process name is the leader's
        comm = _read(f"/proc/{pid}/comm").decode("utf-8", "replace").rstrip("\n")
    start = start_time_of(pid)
    try:
        exe = os.readlink("exe", dir_fd=dfd)
        st = os.stat("exe", dir_fd=dfd)
        exe_id: ExeId | None = exe_identity(st)
        owner: tuple[int, int, int] | None = (st.st_uid, st.st_gid, st.st_mode)
    except (PermissionError, FileNotFoundError):
        exe, exe_id, owner = "", None, None  # kernel threads and zombies have no exe
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    raw = _read("cmdline", dfd)
    cmdline = tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)
    tracer = _tracer_of_any_thread(pid, tracer)
    # the task may have died (and its number been reused) while we read
    if _start_time(_read("stat", dfd)) != tstart or start_time_of(pid) != start:
        raise ProcessGone(tid)
    return Process(pid=pid, start_time=start, exe=exe, comm=comm, cmdline=cmdline, uid=uid,
                   gid=gid, groups=groups, exe_id=exe_id, database=detect_database(exe),
                   tid=tid, exe_owner=owner, tracer=tracer)


def caller_can_modify(proc: Process, uid: int, gid: int, groups: tuple[int, ...]) -> bool:
    """Whether a caller with these credentials can change the content of ``proc``'s
    executable in place: it owns the file (and may chmod it), or the mode or an access
    ACL lets it write.  Root is not considered: it can change any file and run any code
    in any process anyway (docs/security.md).  Unknown owner: True (fail closed)."""
    where = f"/proc/{proc.tid or proc.pid}/exe" if (proc.tid or proc.pid) > 0 else proc.exe
    owner = proc.exe_owner
    if owner is None and proc.pid <= 0 and proc.exe:  # a process described, not running
        try:
            st = os.stat(where)
            owner = (st.st_uid, st.st_gid, st.st_mode)
        except OSError:
            pass
    if owner is None:
        return True
    ouid, ogid, mode = owner
    if uid == 0:
        return False
    if uid == ouid or mode & statmod.S_IWOTH:
        return True
    if not mode & statmod.S_IWGRP:
        return False
    if ogid == gid or ogid in groups:
        return True
    # with an access ACL the group bits are its mask: a named entry may let the caller
    # write; it is not evaluated, the file counts as writable
    try:
        os.getxattr(where, "system.posix_acl_access")
    except OSError:
        return False
    return True


class ExeHasher:
    """SHA-256 of executables, cached by :data:`ExeId`; thread-safe."""

    def __init__(self, max_entries: int = 4096, *, racy_ctime: float = RACY_CTIME) -> None:
        self._cache: OrderedDict[ExeId, str] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self._racy_ns = int(racy_ctime * 1e9)
        self.hashes = 0  # files actually read (for tests and metrics)

    def sha256(self, proc: Process) -> str | None:
        """Hash of the binary ``proc`` runs, read through /proc/TID/exe so a renamed or
        replaced path cannot substitute another file.  None if it cannot be read or
        changed while it was read."""
        if proc.exe_id is None:
            return None
        with self._lock:
            hit = self._cache.get(proc.exe_id)
            if hit is not None:
                self._cache.move_to_end(proc.exe_id)
                return hit
        pid = proc.tid or proc.pid
        path = f"/proc/{pid}/exe" if pid > 0 else proc.exe
        try:
            digest = self._hash_file(path, proc.exe_id)
        except OSError:
            return None
        if digest is None:
            return None
        if time.time_ns() - proc.exe_id[4] >= self._racy_ns:
            with self._lock:
                self._cache[proc.exe_id] = digest
                if len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return digest

    def _hash_file(self, path: str, exe_id: ExeId) -> str | None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if exe_identity(os.fstat(f.fileno())) != exe_id:
                return None  # not the file the caller runs (any more)
            while chunk := f.read(1 << 20):
                h.update(chunk)
            if exe_identity(os.fstat(f.fileno())) != exe_id:
                return None  # changed while we read it
        self.hashes += 1
        return h.hexdigest()


def file_identity(path: str) -> ExeId:
    return exe_identity(os.stat(path))
