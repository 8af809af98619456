"""The FUSE connection behind a mount: served, dead, or waiting for a server?

A stat of the mount is no answer: the kernel serves it from its attribute cache for up
to ``metadata_cache`` seconds whether or not anyone serves the connection (issue 16: a
restart 0.3 s after a SIGKILL saw the dead mount "answer" and stacked a new mount on
it).  :func:`probe` asks the connection itself, from a child process:

* ``getxattr(mount root, "trusted.takakrypt.probe")``.  The kernel caches no extended
  attributes, so this always becomes a FUSE_GETXATTR request (or is refused at once by a
  dead connection); the VFS checks no inode permission for ``trusted.*`` (CAP_SYS_ADMIN
  instead), so no GETATTR goes first; and the engine answers names outside ``user.*``
  with EOPNOTSUPP before any policy check (fuse_ops.c ``op_getxattr``): no decision, no
  audit event, no round trip through the agent's event loop (which may be the caller).
  Without CAP_SYS_ADMIN the kernel answers ENODATA itself; the probe then asks for
  ``security.takakrypt.probe``, which no security module owns and which goes to the
  engine the same way.
* The request goes to the mount it is meant for: the child opens the path with O_PATH
  (no request to that mount), /proc/self/fdinfo and /proc/self/mountinfo show that the
  descriptor is on the mount ``dev`` ("major:minor"), and it asks through
  /proc/self/fd/N.

The kernel refuses every request of a connection that ended (its server's /dev/fuse
descriptor closed, or aborted through fusectl) with ENOTCONN; requests caught in a
teardown end with ECONNABORTED, or ECANCELED when they were queued on io_uring.  The
engine never answers these for a probe.  So:

=========  ================================================================================
state      meaning
=========  ================================================================================
live       the server answered (whatever it answered)
dead       refused: the connection is gone for good, nothing can serve it again
hung       no answer in time, and a process other than a store holds the connection's
           /dev/fuse descriptor (a server that does not answer), or the kernel does not
           say who holds it (no ``fuse_connection`` line in fdinfo: older kernels)
held       no answer in time, and no process but a store (PID 1: systemd's
           file-descriptor store) holds the descriptor, or none (in flight in a Unix
           socket: a handover): it waits for a server; requests queue in the kernel
=========  ================================================================================

Who holds a connection comes from ``/proc/PID/fdinfo`` of every ``/dev/fuse``
descriptor (``fuse_connection: N``, N = the mount's minor number, as in
/sys/fs/fuse/connections/N); it is read only when the probe got no answer.  The number
of an unmounted connection is reused by the next mount, so a descriptor some process
still holds on an old connection counts as a holder of the new one: a held connection
then looks hung (and is aborted like one, as before this distinction existed).  A probe
child stuck on a hung server cannot be killed until the connection is aborted; it is
reaped later (no zombies).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass

LIVE, DEAD, HUNG, HELD = "live", "dead", "hung", "held"
#: how the kernel refuses a request of a connection that is gone
REFUSED = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
PROBE_NAMES = ("trusted.takakrypt.probe", "security.takakrypt.probe")
_NOT_THAT_MOUNT = 254  # a probe child's exit status: the path is not on that mount
_FAILED = 255  # one that failed otherwise
_probes: set[int] = set()  # probe children killed while stuck, not reaped yet


@dataclass(frozen=True)
class State:
    """What :func:`probe` found.  ``error``: the errno of the probe's answer (0: none or
    success); ``holders``: pids holding the connection's /dev/fuse descriptor (only
    looked up when there was no answer; None: unknown)."""

    state: str
    error: int = 0
    holders: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.state == DEAD:
            return f"dead connection ({errno.errorcode.get(self.error, self.error)})"
        if self.state == HELD:
            return "connection held without a server (systemd's fd store or a handover)"
        if self.state == HUNG:
            return "the server does not answer" + (
                f" (held by pid {', '.join(map(str, self.holders))})" if self.holders else "")
        return self.state


def probe(path: str, dev: str, timeout: float,
          stores: Collection[int] = (1,)) -> State | None:
    """The state of the connection of the mount ``dev`` ("major:minor") at ``path``;
    None if the topmost mount at ``path`` is not (any more) that one.  ``stores``: pids
    that keep connections without serving them (systemd, PID 1; a test's stand-in)."""
    rc = _in_child(path, dev, timeout)
    if rc == _NOT_THAT_MOUNT:
        return None
    if rc in REFUSED:
        return State(DEAD, rc)
    if rc is not None:
        return State(LIVE, rc)
    who = holders(int(dev.split(":")[1]))
    if who is not None and all(pid in stores for pid in who):
        return State(HELD, holders=who)
    return State(HUNG, holders=who)


def holders(conn: int) -> tuple[int, ...] | None:
    """Pids holding a /dev/fuse descriptor of connection ``conn``; None when that
    cannot be told: /dev/fuse descriptors are held, and the kernel names the
    connection of none of them (``fuse_connection:`` in fdinfo, recent kernels)."""
    found, named, unnamed = set(), False, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/fuse":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    conns = [int(line.split(":", 1)[1]) for line in f
                             if line.startswith("fuse_connection:")]
            except (OSError, ValueError):
                continue  # closed meanwhile, or the process went
            named |= bool(conns)
            unnamed |= not conns  # or not attached to a connection yet
            if conn in conns:
                found.add(int(pid))
    if unnamed and not named:
        return None
    return tuple(sorted(found))


def _in_child(path: str, dev: str, timeout: float) -> int | None:
    """Probe in a child process: its exit status (0 or the errno of the request,
    _NOT_THAT_MOUNT), None if no answer in time.  A child, not a thread: a request stuck
    on a hung server is uninterruptible, and a thread of ours stuck so would keep this
    process from ever exiting; and the process serving the mount never walks into it
    itself (a guard point nested in another one is reached through the outer mount).
    The child makes system calls only (a forked child of a threaded process must not
    take locks another thread may have held)."""
    for old in list(_probes):  # reap earlier probes that were stuck (no zombies)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(old, os.WNOHANG)[0] == 0:
                continue
        _probes.discard(old)
    want = dev.encode()
    maxfd = os.sysconf("SC_OPEN_MAX")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        rc = _FAILED
        try:
            # none of the caller's descriptors: a child stuck on a hung connection
            # would otherwise keep the caller's own /dev/fuse descriptors (and sockets,
            # locks) open, and count as a holder of its connections
            os.closerange(3, maxfd)
            rc = _ask(path, want)
        finally:
            os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return 0 if rc == _FAILED else rc  # it ran, no request was refused
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # dies once the connection answers or is aborted
            _probes.add(pid)
            return None
        time.sleep(0.005)


def _ask(path: str, dev: bytes) -> int:  # pragma: no cover - runs in the child
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)  # sends no request to that mount
    except OSError:
        return _NOT_THAT_MOUNT
    if _mount_of(fd) != dev:
        return _NOT_THAT_MOUNT
    target = f"/proc/self/fd/{fd}"
    for name in PROBE_NAMES:
        try:
            os.getxattr(target, name)
            return 0
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # no CAP_SYS_ADMIN: the kernel answered, not the server
            return min(e.errno or _FAILED, _FAILED - 1)
    return errno.ENODATA


def _read(path: str) -> bytes:  # pragma: no cover - runs in the child
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _mount_of(fd: int) -> bytes | None:  # pragma: no cover - runs in the child
    """b"major:minor" of the mount the descriptor ``fd`` is on."""
    mnt_id = None
    for line in _read(f"/proc/self/fdinfo/{fd}").splitlines():
        if line.startswith(b"mnt_id:"):
            mnt_id = line.split()[1]
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split(b" ", 3)
        if fields[0] == mnt_id:
            return fields[2]
    return None
