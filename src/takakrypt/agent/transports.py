"""Transports that carry TAKA protocol messages to the agent's request handler.

The handler (`agent.handler.RequestHandler.handle(bytes) -> bytes | None`) does not
know where a message came from.  Transports here:

- ``SeqpacketServer``: a Unix ``SOCK_SEQPACKET`` socket (one message per record), for
  enforcement points in other processes;
- the in-process request ring (``takakrypt._ring``) used by the FUSE data path, attached
  by ``agent.guards``.

Generic netlink (the kernel module) joins later with the same handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("takakryptd.transport")

from ..protocol import MAX_MSG_SIZE as MAX_MESSAGE


class SeqpacketServer:
    name = "seqpacket"

    def __init__(self, path: str, handler: Any, agent: Any) -> None:
        self.path = path
        self.handler = handler
        self.agent = agent
        self.sock: socket.socket | None = None
        self.clients: set[socket.socket] = set()
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
            c.setblocking(False)
            self.clients.add(c)
            loop.add_reader(c.fileno(), self._readable, c)

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
            asyncio.ensure_future(self._serve(c, data))

    async def _serve(self, c: socket.socket, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            reply = await self.handler.handle(data, transport=self.name)
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
        self.clients.discard(c)
        c.close()

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "path": self.path, "clients": len(self.clients),
                "received": self.received, "dropped_replies": self.dropped}

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


async def start_all(agent: Any) -> list[Any]:
    from .handler import RequestHandler

    agent.handler = RequestHandler(agent)
    servers: list[Any] = []
    agent.ring_transport = RingTransport(agent)
    servers.append(agent.ring_transport)
    if agent.config.agent.protocol_socket:
        s = SeqpacketServer(agent.config.agent.protocol_socket, agent.handler, agent)
        await s.start()
        servers.append(s)
    return servers
