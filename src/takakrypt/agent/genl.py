"""The generic-netlink transport: takakryptd <-> the kernel module ``takakryptfs``.

Family ``takakrypt`` (version 1), two commands, both ``CAP_NET_ADMIN`` only::

    CMD_MSG = 1        one whole TAKA message in ATTR_MSG (1, NLA_BINARY, 32..8192 bytes)
    CMD_REGISTER = 2   no attributes: "send your requests to this port"

A frame on the socket::

    | off | size | field                                                    |
    |----:|-----:|----------------------------------------------------------|
    |   0 |   16 | nlmsghdr: len u32, type u16 (family id), flags u16,      |
    |     |      |           seq u32, pid u32                               |
    |  16 |    4 | genlmsghdr: cmd u8, version u8 (1), reserved u16         |
    |  20 |    4 | nlattr: len u16 (4 + TAKA length), type u16 (ATTR_MSG)   |
    |  24 |    n | the TAKA message (docs/protocol.md), padded to 4 bytes   |

At start the transport resolves the family (absent: the module is not loaded, the
transport does not start, nothing else changes), registers its port with
``CMD_REGISTER`` (acknowledged), then pushes the guard points with CONFIG_UPDATE (ids:
1-based index in ``guard_points``; generation: the policy generation) and again after
each reload.  One receive loop serves both directions, told apart by the TAKA RESPONSE
bit: requests from the kernel (KEY_REQUEST; later POLICY_CHECK, AUDIT_EVENT) go to the
agent's ``RequestHandler`` with the peer :data:`transports.KERNEL`, and the answer goes
back as ``CMD_MSG`` to port 0; responses to the agent's own requests (CONFIG_UPDATE,
STATUS_REQUEST, HEALTH_CHECK) resolve :class:`PendingRequests` by sequence (5 s timeout).

At stop, unless the guard points are being handed to another takakryptd (upgrade or
systemd's fd store), the transport sends a CONFIG_UPDATE with no guard point: the kernel
wipes every key it holds, as a stopped agent's FUSE guard points go away.  Closing the
socket makes the kernel forget the registration and fail its pending requests.

The frames are built and parsed with pyroute2's message classes (``genlmsg``,
``ctrlmsg``); the socket itself is a plain non-blocking ``AF_NETLINK`` socket watched
with ``loop.add_reader``: pyroute2 0.9's asyncio socket needs a datagram endpoint, which
uvloop refuses for ``AF_NETLINK`` ("cannot open a UDP handle, invalid family 16").
Only ``pyroute2.netlink`` is loaded, not the package's ``__init__`` (see
:func:`_pyroute2_netlink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import socket
import struct
import sys
from types import ModuleType
from typing import Any


def _pyroute2_netlink() -> ModuleType:
    """``pyroute2.netlink`` without running ``pyroute2/__init__.py`` yet: it imports
    every module of the library (IPRoute, NDB, IPDB, WireGuard, nftables ...) to export
    their names, 0.19 s of takakryptd's 0.4 s start on this machine and about 10 s of its
    start under TCG emulation, paid again in every restart's stall.  The package is
    registered unexecuted, and runs its ``__init__`` the first time anything asks it for
    a name it lacks (``from pyroute2 import IPRoute`` elsewhere in the process works as
    ever); a package imported before is used as it is."""
    if "pyroute2" in sys.modules:
        return importlib.import_module("pyroute2.netlink")
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return importlib.import_module("pyroute2.netlink")  # raises the usual error
    pkg = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def rest_of_package(name: str) -> Any:
        del pkg.__dict__["__getattr__"]
        loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__dict__["__getattr__"] = rest_of_package
    sys.modules["pyroute2"] = pkg
    try:
        return importlib.import_module("pyroute2.netlink")
    except BaseException:
        del sys.modules["pyroute2"]
        raise


_nl = _pyroute2_netlink()
CTRL_CMD_GETFAMILY, GENL_ID_CTRL = _nl.CTRL_CMD_GETFAMILY, _nl.GENL_ID_CTRL
NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR = _nl.NLM_F_ACK, _nl.NLM_F_REQUEST, _nl.NLMSG_ERROR
ctrlmsg, genlmsg = _nl.ctrlmsg, _nl.genlmsg

from .. import protocol as P  # noqa: E402
from ..errors import ProtocolError  # noqa: E402

log = logging.getLogger("takakryptd.genl")

FAMILY = P.GENL_NAME
VERSION = P.GENL_VERSION
CMD_MSG = 1
CMD_REGISTER = 2
ATTR_MSG = 1
NETLINK_GENERIC = 16
_NLMSGHDR = struct.Struct("=IHHII")
_RECV = 65536


class takamsg(genlmsg):
    """A ``takakrypt`` family message: genlmsghdr + at most one ATTR_MSG."""

    nla_map = (("TAKAKRYPT_ATTR_UNSPEC", "none"),
               ("TAKAKRYPT_ATTR_MSG", "cdata"))


def build(family_id: int, cmd: int, taka: bytes | None = None, *, seq: int = 0,
          flags: int = NLM_F_REQUEST, port: int = 0) -> bytes:
    """One netlink frame of the family (``taka``: the TAKA message for CMD_MSG)."""
    m = takamsg()
    m["cmd"] = cmd
    m["version"] = VERSION
    if taka is not None:
        m["attrs"].append(["TAKAKRYPT_ATTR_MSG", bytes(taka)])
    m["header"]["type"] = family_id
    m["header"]["flags"] = flags
    m["header"]["sequence_number"] = seq
    m["header"]["pid"] = port
    m.encode()
    return bytes(m.data)


def split(data: bytes) -> list[bytes]:
    """The netlink messages of one datagram (a datagram may carry several)."""
    out, off = [], 0
    while off + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        out.append(data[off:off + length])
        off += (length + 3) & ~3
    return out


class Frame:
    """A parsed netlink message: ``kind`` is "error" (an ack: ``error`` 0 or a negative
    errno, ``seq`` the acked request's), "msg" (CMD_MSG: ``taka``) or "other"."""

    __slots__ = ("kind", "seq", "port", "cmd", "taka", "error")

    def __init__(self, kind: str, seq: int, port: int, cmd: int = 0,
                 taka: bytes | None = None, error: int = 0) -> None:
        self.kind, self.seq, self.port, self.cmd, self.taka, self.error = \
            kind, seq, port, cmd, taka, error


def parse(raw: bytes, family_id: int) -> Frame:
    _len, mtype, _flags, seq, port = _NLMSGHDR.unpack_from(raw, 0)
    if mtype == NLMSG_ERROR:
        code = struct.unpack_from("=i", raw, _NLMSGHDR.size)[0]
        # the acked request's own header follows the code: its seq is the one to match
        acked = _NLMSGHDR.unpack_from(raw, _NLMSGHDR.size + 4)[3] \
            if len(raw) >= 2 * _NLMSGHDR.size + 4 else seq
        return Frame("error", acked, port, error=code)
    if mtype != family_id:
        return Frame("other", seq, port)
    m = takamsg(raw)
    m.decode()
    taka = m.get_attr("TAKAKRYPT_ATTR_MSG")
    return Frame("msg", seq, port, m["cmd"], bytes(taka) if taka is not None else None)


def resolve_family(sock: socket.socket, name: str = FAMILY) -> int | None:
    """The family id, or None when no such family is registered (module not loaded).
    ``sock`` must be a blocking NETLINK_GENERIC socket with a timeout."""
    m = ctrlmsg()
    m["cmd"] = CTRL_CMD_GETFAMILY
    m["version"] = 1
    m["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])
    m["header"]["type"] = GENL_ID_CTRL
    m["header"]["flags"] = NLM_F_REQUEST
    m["header"]["sequence_number"] = 1
    m.encode()
    sock.send(bytes(m.data))
    while True:
        for raw in split(sock.recv(_RECV)):
            mtype = _NLMSGHDR.unpack_from(raw, 0)[1]
            if mtype == NLMSG_ERROR:
                code = struct.unpack_from("=i", raw, _NLMSGHDR.size)[0]
                if code == -errno.ENOENT:
                    return None
                raise OSError(-code, f"resolving generic netlink family {name!r}: "
                                     f"{os.strerror(-code)}")
            if mtype == GENL_ID_CTRL:
                r = ctrlmsg(raw)
                r.decode()
                return int(r.get_attr("CTRL_ATTR_FAMILY_ID"))


def open_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, 0))  # the kernel picks the port id
    return s


class GenlTransport:
    name = "genl"

    def __init__(self, agent: Any, *, timeout: float = P.DEFAULT_TIMEOUT) -> None:
        from .transports import KERNEL

        self.agent = agent
        self.handler = agent.handler
        self.peer = KERNEL
        self.sock: socket.socket | None = None
        self.family_id = 0
        self.port = 0
        self.registered = False
        self.pending = P.PendingRequests(timeout)
        self.sequencer = P.Sequencer()
        self._nl_seq = 0
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._sent: dict[int, P.Message] = {}  # netlink seq -> our TAKA request in flight
        self._tasks: set[asyncio.Future[Any]] = set()
        self.requests = 0       # TAKA requests from the kernel
        self.responses = 0      # TAKA responses sent back to the kernel
        self.errors = 0         # malformed frames, refused sends, error acks
        self.config_sent = 0
        self.last_config: dict[str, Any] | None = None
        self._entries_in_force: tuple[P.GuardPointEntry, ...] | None = None
        self._keys_lock: asyncio.Lock | None = None

    # start / stop -----------------------------------------------------------------------
    async def start(self) -> bool:
        """Resolve, register, push the configuration.  False (and no socket) when the
        family is absent: the kernel module is not loaded."""
        s = open_socket()
        try:
            s.settimeout(2)
            family = resolve_family(s)
            if family is None:
                log.info("generic netlink family %r absent (takakryptfs not loaded): "
                         "kernel transport not started", FAMILY)
                s.close()
                return False
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.sock, self.family_id, self.port = s, family, s.getsockname()[0]
        asyncio.get_running_loop().add_reader(s.fileno(), self._readable)
        code = await self._send_acked(build(family, CMD_REGISTER, flags=NLM_F_REQUEST | NLM_F_ACK,
                                            seq=self._next_nl_seq(), port=self.port))
        if code:
            await self.close(wipe=False)
            raise OSError(-code, f"takakrypt CMD_REGISTER refused: {os.strerror(-code)}")
        self.registered = True
        log.info("generic netlink: registered port %d with family %r (id %d)",
                 self.port, FAMILY, family)
        await self.push_config()
        return True

    async def close(self, *, wipe: bool | None = None) -> None:
        """Stop.  ``wipe`` (default: unless the guard points are being handed over)
        first sends an empty CONFIG_UPDATE so the kernel drops every key."""
        if self.sock is None:
            return
        if wipe is None:
            wipe = self.registered and not (getattr(self.agent, "handing_over", False)
                                            or getattr(self.agent, "handed_over", False)
                                            or getattr(self.agent, "fd_store", False))
        if wipe:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.push_config(entries=()), 2)
        for t in list(self._tasks):
            t.cancel()
        self.pending.fail_all(P.Status.NETWORK, "generic netlink transport closed")
        for f in self._acks.values():
            if not f.done():
                f.set_result(-errno.ECONNABORTED)
        self._acks.clear()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        self.registered = False

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "family": FAMILY, "family_id": self.family_id,
                "port": self.port, "registered": self.registered, "requests": self.requests,
                "responses": self.responses, "errors": self.errors,
                "pending": len(self.pending), "config_updates": self.config_sent,
                "last_config": self.last_config}

    # agent -> kernel --------------------------------------------------------------------
    def entries(self, withdraw: frozenset[str] = frozenset()) -> tuple[P.GuardPointEntry, ...]:
        """The guard points as CONFIG_UPDATE carries them: a guard point that is closed
        (no key of it can be had: keys_agent), or in ``withdraw``, is GP_CLOSED, which
        makes the module wipe the keys it holds for it and ask for none."""
        closed = set(getattr(self.agent, "closed", {})) | withdraw

        def state(gp: Any) -> int:
            if not gp.enabled:
                return P.GP_DISABLED
            return P.GP_CLOSED if os.path.normpath(gp.path) in closed else P.GP_ENABLED

        return tuple(P.GuardPointEntry(enabled=state(gp), name=gp.path, path=gp.path,
                                       policy=gp.policy, id=i)
                     for i, gp in enumerate(self.agent.config.guard_points, 1))

    async def sync_keys(self, wipe: frozenset[str] = frozenset()) -> None:
        """After the key cache changed (keys_agent): the guard points in ``wipe`` (their
        key was dropped) lose the keys the module holds (a CONFIG_UPDATE with them
        closed), and the module gets the guard points' current states (closed, or open
        again) if they are not what it holds.  One at a time, in order."""
        if not self.registered:
            return
        if self._keys_lock is None:
            self._keys_lock = asyncio.Lock()
        async with self._keys_lock:
            if wipe:
                await self.push_config(self.entries(wipe))
            if wipe or self.entries() != self._entries_in_force:
                await self.push_config()

    def generation(self) -> int:
        cache = getattr(self.agent, "cache", None)
        if cache is not None:
            return int(cache.generation)
        return int(getattr(self.agent, "reloads", {}).get("ok", 0))

    async def request(self, payload: P.Payload, timeout: float | None = None) -> P.Message:
        """Send a request to the kernel; its response (any status other than SUCCESS,
        TIMEOUT and NETWORK included, means it was not done)."""
        msg = P.request(payload, self.sequencer.next())
        nl_seq = self._next_nl_seq()
        self._sent[nl_seq] = msg  # a netlink error for this frame fails it at once
        try:
            return await self.pending.call(
                msg, lambda taka: self._send(build(self.family_id, CMD_MSG, taka, seq=nl_seq,
                                                   port=self.port)), timeout)
        finally:
            self._sent.pop(nl_seq, None)

    async def push_config(self, entries: tuple[P.GuardPointEntry, ...] | None = None) -> P.Message:
        """CONFIG_UPDATE with the guard points (``entries=()``: none, which wipes every
        key in the kernel)."""
        ents = self.entries() if entries is None else entries
        gen = self.generation()
        r = await self.request(P.ConfigUpdateRequest(ents, generation=gen))
        self.config_sent += 1
        self.last_config = {"entries": len(ents), "generation": gen,
                            "status": P.Status(r.status).name.lower(),
                            "configured": getattr(r.payload, "configured_count", None)}
        self._entries_in_force = ents if r.status == P.Status.SUCCESS else None
        if r.status != P.Status.SUCCESS:
            self.errors += 1
            log.error("generic netlink: CONFIG_UPDATE (%d guard points, generation %d) "
                      "failed: %s %s", len(ents), gen, P.Status(r.status).name,
                      getattr(r.payload, "reason", ""))
        else:
            log.info("generic netlink: CONFIG_UPDATE: %d guard points in force "
                     "(generation %d)", r.payload.configured_count, gen)
        return r

    def config_changed(self) -> None:
        """After a reload: push the new guard points (in a task of its own)."""
        if self.registered:
            self._spawn(self.push_config())

    async def reconfigure(self) -> P.Message | None:
        """After a reload: push the new guard points and wait for the module's answer
        (kernel guard points are mounted only once it enabled them); None when not
        registered."""
        return await self.push_config() if self.registered else None

    def config_in_force(self) -> str:
        """Why the module does not hold the current guard points ("" if it does): the
        last CONFIG_UPDATE was not acknowledged, or was for another generation."""
        if not self.registered:
            return "not registered with the module"
        last = self.last_config
        if last is None:
            return "no CONFIG_UPDATE sent yet"
        if last["status"] != "success":
            return f"the module refused the CONFIG_UPDATE ({last['status']})"
        if last["generation"] != self.generation():
            return (f"the module holds generation {last['generation']}, not "
                    f"{self.generation()}")
        return ""

    async def status(self, timeout: float = 2.0) -> P.StatusResponse:
        """The module's STATUS_REQUEST answer; ProtocolError with the reason if there
        is none (timeout, error status, malformed answer)."""
        r = await self.request(P.StatusRequest(), timeout)
        if r.status != P.Status.SUCCESS or not isinstance(r.payload, P.StatusResponse):
            raise ProtocolError(f"STATUS_REQUEST: {P.Status(r.status).name.lower()}"
                                + (f": {r.payload.reason}" if getattr(r.payload, "reason", "")
                                   else ""))
        return r.payload

    # socket -----------------------------------------------------------------------------
    def _next_nl_seq(self) -> int:
        self._nl_seq = (self._nl_seq + 1) & 0xFFFFFFFF or 1
        return self._nl_seq

    async def _send_acked(self, frame: bytes) -> int:
        seq = _NLMSGHDR.unpack_from(frame, 0)[3]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[seq] = fut
        try:
            self._send(frame)
            return await asyncio.wait_for(fut, P.DEFAULT_TIMEOUT)
        finally:
            self._acks.pop(seq, None)

    def _send(self, frame: bytes) -> None:
        if self.sock is None:
            raise ConnectionError("generic netlink transport closed")
        self.sock.sendto(frame, (0, 0))

    def _send_msg(self, taka: bytes) -> None:
        self._send(build(self.family_id, CMD_MSG, taka, seq=self._next_nl_seq(),
                         port=self.port))

    def _readable(self) -> None:
        for _ in range(64):  # bounded batch per wake-up
            if self.sock is None:
                return
            try:
                data, (src, _groups) = self.sock.recvfrom(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ENOBUFS: the kernel dropped messages; go on
                self.errors += 1
                log.warning("generic netlink receive: %s", e)
                return
            if src != 0:
                # only the kernel sends from port 0 (root could unicast to this port from
                # another socket: never served).  NB: nlmsg_pid in the frame says nothing
                # about the sender (a genlmsg_reply carries the receiver's own port).
                self.errors += 1
                continue
            for raw in split(data):
                try:
                    self._dispatch(parse(raw, self.family_id))
                except Exception as e:  # noqa: BLE001 - a bad frame never stops the loop
                    self.errors += 1
                    log.warning("generic netlink: dropped a frame (%d bytes): %s", len(raw), e)

    def _dispatch(self, f: Frame) -> None:
        if f.kind == "error":
            fut = self._acks.get(f.seq)
            if fut is not None and not fut.done():
                fut.set_result(f.error)
            elif f.error:
                self.errors += 1
                req = self._sent.pop(f.seq, None)
                if req is not None and req.sequence in self.pending:
                    self.pending.resolve(P.error_reply(
                        req, P.Status.INVALID, f"refused by the kernel: {os.strerror(-f.error)}"))
                    return
                log.warning("generic netlink: the kernel refused message %d: %s", f.seq,
                            os.strerror(-f.error))
            return
        if f.kind != "msg":
            return
        if f.cmd != CMD_MSG or f.taka is None or len(f.taka) < P.HEADER_SIZE:
            self.errors += 1
            return
        op = struct.unpack_from("<I", f.taka, 8)[0]
        if op & P.RESPONSE_FLAG:
            try:
                msg = P.decode(f.taka)
                if not self.pending.resolve(msg):
                    log.info("generic netlink: late response %d dropped", msg.sequence)
            except ProtocolError as e:
                self.errors += 1
                log.warning("generic netlink: bad response from the kernel: %s", e)
                # its request ends now (not after the timeout), with the reason
                seq = struct.unpack_from("<I", f.taka, 12)[0]
                self.pending.fail(seq, op & ~P.RESPONSE_FLAG, P.Status.INVALID,
                                  f"malformed response from the kernel: {e}")
            return
        self.requests += 1
        self.agent.inflight += 1
        self._spawn(self._serve(f.taka))

    async def _serve(self, taka: bytes) -> None:
        import time

        t0 = time.perf_counter()
        try:
            reply = await self.handler.handle(taka, transport=self.name, peer=self.peer)
            if reply is not None and self.sock is not None:
                try:
                    self._send_msg(reply)
                    self.responses += 1
                except OSError as e:
                    self.errors += 1
                    log.warning("generic netlink: could not answer the kernel: %s", e)
        finally:
            self.agent.inflight -= 1
            self.handler.observe(self.name, t0)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


async def start(agent: Any) -> GenlTransport | None:
    """The transport, started; None when the kernel module is not loaded."""
    t = GenlTransport(agent)
    return t if await t.start() else None
