"""Transports that carry TAKA protocol messages to the agent's request handler.

The handler (`agent.handler.RequestHandler.handle(bytes) -> bytes | None`) does not
know where a message came from.  Transports here:

- ``SeqpacketServer``: a Unix ``SOCK_SEQPACKET`` socket (one message per record), for
  enforcement points in other processes.  Created mode 0600, and every connection is
  checked with ``SO_PEERCRED``: only root and the agent's own uid are served; any other
  peer is closed at once, counted (``refused``) and audited (``kind: peer-refused``).
  The handler gets the peer's credentials with each message (key requests need them);
- the in-process request ring (``takakrypt._ring``) used by the FUSE data path, attached
  by ``agent.guards``.

- generic netlink (``agent.genl``): the kernel module ``takakryptfs``, whose peer is
  :data:`KERNEL`; started only when the module is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from typing import Any, NamedTuple

log = logging.getLogger("takakryptd.transport")

from ..protocol import MAX_MSG_SIZE as MAX_MESSAGE


class Peer(NamedTuple):
    """Credentials of the process at the other end of a transport (``SO_PEERCRED``:
    the connecting process, as of ``connect()``)."""

    pid: int
    uid: int
    gid: int


class KernelPeer(Peer):
    """The peer of the generic-netlink transport: the kernel (only it sends from port 0;
    the agent's registration needed CAP_NET_ADMIN).  A type of its own, so that no
    SO_PEERCRED value (pid 0 is what a peer in another pid namespace shows) can pass
    for it."""

    __slots__ = ()


KERNEL = KernelPeer(0, 0, 0)


def peer_of(sock: socket.socket) -> Peer:
    return Peer(*struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i"))))


def in_process() -> Peer:
    """The peer of the in-process ring: the agent itself."""
    return Peer(os.getpid(), os.geteuid(), os.getegid())


def peer_allowed(peer: Peer) -> bool:
    """Root and the agent's own uid (an agent run unprivileged, in tests) may talk to the
    agent; nobody else, whatever the socket file's mode says."""
    return peer.uid in (0, os.geteuid())


class SeqpacketServer:
    name = "seqpacket"

    def __init__(self, path: str, handler: Any, agent: Any) -> None:
        self.path = path
        self.handler = handler
        self.agent = agent
        self.sock: socket.socket | None = None
        self.clients: dict[socket.socket, Peer] = {}
        self.refused = 0
        self.received = 0
        self.dropped = 0
        self._closing = False

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK |
                          socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(64)
        self.sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("accept: %s", e)
                return
            try:
                peer = peer_of(c)
            except OSError as e:
                log.error("SO_PEERCRED: %s", e)
                c.close()
                continue
            if not peer_allowed(peer):
                self._refuse(c, peer)
                continue
            c.setblocking(False)
            self.clients[c] = peer
            loop.add_reader(c.fileno(), self._readable, c)

    def _refuse(self, c: socket.socket, peer: Peer) -> None:
        c.close()  # before reading anything: the peer gets EOF / ECONNRESET
        self.refused += 1
        log.warning("%s: refused a peer with uid %d (pid %d): root only", self.path,
                    peer.uid, peer.pid)
        audit = getattr(self.agent, "audit", None)
        if audit is not None:
            from ..audit import event as ev

            audit.log(ev.system_event(
                ev.PEER_REFUSED, "protocol socket is for root only", path=self.path,
                uid=peer.uid, pid=peer.pid, exe=exe_of(peer.pid)))

    def _readable(self, c: socket.socket) -> None:
        for _ in range(64):  # bounded batch per wake-up, then let others run
            try:
                data = c.recv(MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_client(c)
                return
            self.received += 1
            self.agent.inflight += 1
            # the peer as of now: the connection may be gone by the time it is served
            asyncio.ensure_future(self._serve(c, data, self.clients.get(c)))

    async def _serve(self, c: socket.socket, data: bytes, peer: Peer | None) -> None:
        t0 = time.perf_counter()
        try:
            reply = await self.handler.handle(data, transport=self.name, peer=peer)
            if reply is not None:
                try:
                    c.send(reply)
                except (BlockingIOError, OSError):
                    self.dropped += 1
        finally:
            self.agent.inflight -= 1
            self.handler.observe(self.name, t0)

    def _drop_client(self, c: socket.socket) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(c.fileno())
        self.clients.pop(c, None)
        c.close()

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "path": self.path, "clients": len(self.clients),
                "refused": self.refused, "received": self.received,
                "dropped_replies": self.dropped}

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        # let requests already read be answered before the client sockets go
        for _ in range(500):
            if self.agent.inflight == 0:
                break
            await asyncio.sleep(0.01)
        for c in list(self.clients):
            self._drop_client(c)


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


class RingTransport:
    """The in-process request ring the FUSE data path sends cache misses through."""

    name = "ring"

    def __init__(self, agent: Any, slots: int = 4096) -> None:
        from .. import ringserver
        from .._ring import Ring

        self.ring = Ring(slots=slots)
        self.server = ringserver.attach(asyncio.get_running_loop(), self.ring,
                                        agent.handler.handle_ring)

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, **self.ring.stats()}

    async def close(self) -> None:
        self.server.close()
        self.ring.close()


def start_ring(agent: Any) -> RingTransport:
    """The handler and the data path's ring alone (``takakryptd --upgrade`` needs them
    to take guard points over before the other process lets go of the sockets)."""
    from .handler import RequestHandler

    if getattr(agent, "ring_transport", None) is None:
        agent.handler = RequestHandler(agent)
        agent.ring_transport = RingTransport(agent)
    return agent.ring_transport


async def start_all(agent: Any) -> list[Any]:
    servers: list[Any] = [start_ring(agent)]
    if agent.config.agent.protocol_socket:
        s = SeqpacketServer(agent.config.agent.protocol_socket, agent.handler, agent)
        await s.start()
        servers.append(s)
    from . import genl

    k = await genl.start(agent)  # None: takakryptfs is not loaded
    if k is not None:
        servers.append(k)
    return servers
