"""Handing a guard point's FUSE connection to the next takakryptd (issue 16).

A guard point's connection travels as a *bundle*: the engine's descriptors
(``GuardPoint.handover_begin()``: ``fds[0]`` is the ``/dev/fuse`` fd) plus a sealed
memfd holding the engine's state blob behind a one-line JSON header:

    +---------------------------------------------+---------------------------+
    | {"v": 1, "path": P, "nfds": N, "len": L}\\n  | L bytes: the engine state |
    +---------------------------------------------+---------------------------+

Two carriers, one bundle format:

* systemd's file-descriptor store (``FileDescriptorStoreMax=``): each descriptor is
  sent alone with ``FDSTORE=1`` and ``FDNAME=tkgp-H-I`` (H: 16 hex digits of the
  SHA-256 of the guard point's path, I: 0 for the state memfd, 1.. the engine's fds in
  order; systemd does not keep the order of a message's fds, names do).  The next start
  gets them back as ``LISTEN_FDS``/``LISTEN_FDNAMES`` (sd_listen_fds(3): from fd 3).
* ``takakryptd --upgrade``: a ``SOCK_SEQPACKET`` socket between the two processes; one
  record per guard point, ``{"path": P}`` with ``[state memfd, *fds]`` as SCM_RIGHTS,
  then ``{"end": COUNT}``; the receiver answers ``{"ok": true}`` or
  ``{"ok": false, "error": WHY}``.

Everything received is checked (names, counts, header) before it is used: a bundle
that does not add up is refused, never guessed at.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import AgentError, AgentUnavailable, error_from_kind

FDNAME_PREFIX = "tkgp-"
MAX_STATE = 64 << 20  # the engine's tables; far more than any guard point needs
MAX_FDS = 64
MAX_RECORD = 1 << 16
SD_LISTEN_FDS_START = 3
#: sends one sd_notify datagram with these fields and fds; False if it could not
Notify = Callable[[tuple[str, ...], list[int]], bool]


class HandoverError(AgentError):
    """A bundle could not be sent, received or read."""


@dataclass
class Bundle:
    """One guard point's connection: engine fds (owned by whoever holds the bundle)
    and the engine's state."""

    path: str
    fds: list[int]
    state: bytes
    names: list[str] = field(default_factory=list)  # fd-store names it came under

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


# ------------------------------------------------------------------------------------------
# the state memfd


def state_fd(path: str, nfds: int, state: bytes) -> int:
    """A sealed memfd (no write, grow or shrink) holding ``state`` behind its header."""
    if len(state) > MAX_STATE:
        raise HandoverError(f"{path}: engine state of {len(state)} bytes is too large")
    fd = os.memfd_create("takakrypt-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        head = json.dumps({"v": 1, "path": path, "nfds": nfds, "len": len(state)}).encode()
        data = head + b"\n" + state
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_fd(fd: int) -> tuple[dict, bytes]:
    """(header, state) of a state memfd; HandoverError if it is not one of ours."""
    want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        size = os.fstat(fd).st_size
    except OSError as e:
        raise HandoverError(f"state descriptor unusable: {e.strerror}") from None
    if seals & want != want:
        raise HandoverError("state descriptor is not sealed")
    if size > MAX_STATE + 4096:
        raise HandoverError(f"state descriptor of {size} bytes is too large")
    data = os.pread(fd, size, 0)
    head, nl, state = data.partition(b"\n")
    try:
        h = json.loads(head) if nl else None
    except ValueError:
        h = None
    if not (isinstance(h, dict) and h.get("v") == 1 and isinstance(h.get("path"), str)
            and isinstance(h.get("nfds"), int) and 0 < h["nfds"] <= MAX_FDS
            and h.get("len") == len(state)):
        raise HandoverError("state descriptor has no valid header")
    return h, state


def fdname(path: str, index: int) -> str:
    """The fd-store name of a guard point's descriptor (systemd allows at most 255
    printable characters and no ':'; the path itself may have anything)."""
    return f"{FDNAME_PREFIX}{hashlib.sha256(path.encode()).hexdigest()[:16]}-{index}"


# ------------------------------------------------------------------------------------------
# systemd's fd store


def store(notify: Notify, path: str, fds: list[int], state: bytes) -> list[str]:
    """Put one guard point's connection into the fd store.  Returns the names used.
    ``notify(fields, fds) -> bool`` sends one sd_notify datagram."""
    names = []
    sfd = state_fd(path, len(fds), state)
    try:
        for i, fd in enumerate([sfd, *fds]):
            name = fdname(path, i)
            if not notify(("FDSTORE=1", f"FDNAME={name}"), [fd]):
                raise HandoverError(f"{path}: the service manager did not take descriptor "
                                    f"{name}")
            names.append(name)
    finally:
        os.close(sfd)  # systemd holds its own copy
    return names


def remove(notify: Notify, names: list[str]) -> None:
    for name in names:
        notify(("FDSTOREREMOVE=1", f"FDNAME={name}"), [])


def listen_fds(env: dict[str, str] | None = None, *, unset: bool = True) -> dict[int, str]:
    """sd_listen_fds_with_names(3): {fd: name} passed to this process, or {}.  The fds
    get FD_CLOEXEC; the variables are removed (children must not take them)."""
    env = os.environ if env is None else env
    try:
        pid, n = int(env.get("LISTEN_PID", "")), int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
    if pid != os.getpid() or not 0 < n <= 4096:
        return {}
    out = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
            out[fd] = names[i] if i < len(names) else "unknown"
    return out


def bundles_from_store(passed: dict[int, str]) -> tuple[dict[str, Bundle], list[str]]:
    """Group the descriptors passed back by the fd store into bundles by guard point
    path.  Returns (bundles, problems); descriptors of a bundle that does not add up are
    closed (the caller removes their names from the store) and named in ``problems``."""
    groups: dict[str, dict[int, int]] = {}
    problems = []
    for fd, name in passed.items():
        head, _, index = name.rpartition("-")
        if not head.startswith(FDNAME_PREFIX) or not index.isdigit():
            problems.append(f"descriptor {fd} named {name!r} is not a guard point's")
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        groups.setdefault(head, {})[int(index)] = fd
    out: dict[str, Bundle] = {}
    for head, by_index in groups.items():
        names = [f"{head}-{i}" for i in sorted(by_index)]
        try:
            if 0 not in by_index:
                raise HandoverError("no state descriptor")
            h, state = read_state_fd(by_index[0])
            if fdname(h["path"], 0) != f"{head}-0":
                raise HandoverError("state names another guard point")
            if sorted(by_index) != list(range(h["nfds"] + 1)):
                raise HandoverError(f"{len(by_index) - 1} of {h['nfds']} descriptors")
        except HandoverError as e:
            problems.append(f"fd store entries {head}: {e}")
            for fd in by_index.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            out[f"?{head}"] = Bundle(path="", fds=[], state=b"", names=names)
            continue
        os.close(by_index.pop(0))
        out[h["path"]] = Bundle(h["path"], [by_index[i] for i in sorted(by_index)], state,
                                names)
    return out, problems


# ------------------------------------------------------------------------------------------
# the upgrade socket


def send_record(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []
    sock.sendmsg([json.dumps(obj).encode()], anc)


def recv_record(sock: socket.socket) -> tuple[dict, list[int]]:
    """One record and the fds that came with it (FD_CLOEXEC); HandoverError on a
    closed socket or a malformed record (the fds of which are closed)."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_RECORD, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    try:
        if not data:
            raise HandoverError("the other takakryptd closed the handover socket")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoverError("handover record truncated")
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except (ValueError, HandoverError) as e:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise HandoverError(f"bad handover record: {e}") from None
    return obj, list(fds)


def send_bundles(sock: socket.socket, items: list[tuple[str, list[int], bytes]]) -> None:
    """Old side: every guard point's (path, fds, state), then the end record."""
    for path, fds, state in items:
        sfd = state_fd(path, len(fds), state)
        try:
            send_record(sock, {"path": path}, [sfd, *fds])
        finally:
            os.close(sfd)
    send_record(sock, {"end": len(items)})


def recv_bundles(sock: socket.socket) -> dict[str, Bundle]:
    """New side: read records up to the end record; HandoverError (with every fd
    received closed) if anything does not add up."""
    out: dict[str, Bundle] = {}
    try:
        while True:
            obj, fds = recv_record(sock)
            if "end" in obj:
                for fd in fds:
                    os.close(fd)
                if obj["end"] != len(out):
                    raise HandoverError(f"{len(out)} of {obj['end']} guard points arrived")
                return out
            try:
                if not fds:
                    raise HandoverError("guard point record without descriptors")
                h, state = read_state_fd(fds[0])
                if h["path"] != obj.get("path") or h["nfds"] != len(fds) - 1:
                    raise HandoverError(f"record for {obj.get('path')!r} does not match its "
                                        "state")
                if h["path"] in out:
                    raise HandoverError(f"{h['path']} sent twice")
            except HandoverError:
                for fd in fds:
                    os.close(fd)
                raise
            os.close(fds[0])
            out[h["path"]] = Bundle(h["path"], fds[1:], state)
    except BaseException:
        for b in out.values():
            b.close()
        raise


def hand_to(sock_path: str, items: list[tuple[str, list[int], bytes]],
            timeout: float = 60.0) -> None:
    """Old side of an upgrade: connect to the new process's socket, send the bundles,
    wait for its verdict; HandoverError unless it took every guard point over."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_path)
        except OSError as e:
            raise HandoverError(f"cannot reach the new takakryptd at {sock_path}: "
                                f"{e.strerror}") from None
        from .transports import peer_allowed, peer_of

        if not peer_allowed(peer_of(s)):
            raise HandoverError(f"{sock_path} is not served by root or the agent's user")
        try:
            send_bundles(s, items)
            answer, fds = recv_record(s)
        except (OSError, socket.timeout) as e:
            raise HandoverError(f"handover to the new takakryptd broke off: {e}") from None
        for fd in fds:
            os.close(fd)
        if answer.get("ok") is not True:
            raise HandoverError(f"the new takakryptd did not take over: "
                                f"{answer.get('error') or 'no reason given'}")
    finally:
        s.close()


class Upgrade:
    """The new takakryptd's side of ``--upgrade``: ask the running one (control
    command ``handover``) to send its guard points to a socket only we listen on,
    receive them, and after resuming them say whether we took over."""

    def __init__(self, control_socket: str, timeout: float = 60.0) -> None:
        self.control_socket = control_socket
        self.timeout = timeout
        self.dir = ""
        self.listener: socket.socket | None = None
        self.ctl: socket.socket | None = None
        self.conn: socket.socket | None = None

    def receive(self) -> dict[str, Bundle]:
        self.dir = tempfile.mkdtemp(prefix=".upgrade-",
                                    dir=os.path.dirname(self.control_socket) or ".")
        path = os.path.join(self.dir, "handover.sock")  # the directory is 0700: ours alone
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET
                                      | socket.SOCK_CLOEXEC)
        self.listener.bind(path)
        self.listener.listen(1)
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.ctl.settimeout(self.timeout)
        try:
            self.ctl.connect(self.control_socket)
        except OSError as e:
            raise AgentUnavailable(f"--upgrade: no running takakryptd to take over from "
                                   f"(control socket {self.control_socket}: "
                                   f"{e.strerror})") from None
        self.ctl.sendall(json.dumps({"cmd": "handover", "socket": path}).encode() + b"\n")
        ready, _, _ = select.select([self.listener, self.ctl], [], [], self.timeout)
        if self.listener not in ready:
            if self.ctl in ready:
                self.answer()  # an error: raises it
            raise HandoverError(f"--upgrade: the running takakryptd did not start the "
                                f"handover within {self.timeout:.0f} s")
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(self.timeout)
        from .transports import peer_allowed, peer_of

        if not peer_allowed(peer_of(self.conn)):
            raise HandoverError("--upgrade: the handover came from a process that is not "
                                "root or the agent's user")
        return recv_bundles(self.conn)

    def confirm(self, ok: bool, error: str = "") -> object:
        """Tell the old process; returns its answer to ``handover`` (raises its error)."""
        assert self.conn is not None
        send_record(self.conn, {"ok": ok, "error": error})
        return self.answer()

    def answer(self) -> object:
        assert self.ctl is not None
        buf = b""
        deadline = time.monotonic() + self.timeout
        while not buf.endswith(b"\n"):
            self.ctl.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = self.ctl.recv(65536)
            except OSError as e:
                raise HandoverError(f"--upgrade: no answer from the running takakryptd: "
                                    f"{e}") from None
            if not chunk:
                raise HandoverError("--upgrade: the running takakryptd closed the control "
                                    "connection")
            buf += chunk
        resp = json.loads(buf)
        if not resp.get("ok"):
            raise error_from_kind(resp.get("error", "error"), resp.get("message", "failed"))
        return resp.get("result")

    def close(self) -> None:
        for s in (self.conn, self.ctl, self.listener):
            if s is not None:
                s.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
