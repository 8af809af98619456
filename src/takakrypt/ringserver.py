"""Serve a request ring (``takakrypt._ring.Ring``) from an asyncio event loop.

Native producer threads submit requests into the ring; :func:`attach` registers the
ring's eventfd with ``loop.add_reader``, drains requests in batches, calls ``handler``
and posts each answer back::

    ring = Ring()
    server = attach(loop, ring, handle_taka_message)   # handler(bytes) -> bytes
    ...
    server.close()                                      # stops serving, ring stays open

Contract:

- ``handler(payload)`` returns ``bytes`` (any bytes-like object) or an awaitable of it;
  it runs on the loop thread.  Awaitables run as tasks, so slow requests do not hold up
  the next ones; their answers are posted when they finish, in any order.
- Fail closed: if the handler raises, returns something that is not bytes-like, returns
  more than ``MAX_MSG`` bytes, or its task is cancelled, the producer receives the errno
  ``EIO`` (logged on ``takakrypt.ring``); no request is left unanswered.
- At most ``batch`` requests are handled per loop iteration; when more are pending the
  rest are handled on the next iteration (``call_soon``), so other callbacks keep
  running under sustained load and no eventfd syscall is made while the ring is busy.
- Works with the default asyncio loop and with uvloop (any loop with ``add_reader``).
  Not thread-safe: call ``attach``/``close`` on the loop's thread.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Union

from takakrypt._ring import MAX_MSG, Ring

__all__ = ["Handler", "Server", "attach"]

log = logging.getLogger("takakrypt.ring")

Handler = Callable[[bytes], Union[bytes, Awaitable[bytes]]]


class Server:
    """A ring served on an event loop; made by :func:`attach`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ring: Ring, handler: Handler,
                 batch: int) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._loop = loop
        self._ring = ring
        self._handler = handler
        self._batch = batch
        self._fd = ring.fileno()
        self._scheduled: asyncio.Handle | None = None
        self._tasks: set[asyncio.Future[bytes]] = set()
        self._closed = False
        self.handled = 0  #: requests handed to the handler
        self.failed = 0   #: requests answered with EIO
        loop.add_reader(self._fd, self._on_readable)
        # A previous consumer may have left requests pending without arming the ring
        # (its last drain returned `batch` items): look once instead of waiting for an
        # eventfd write that will not come.
        self._scheduled = loop.call_soon(self._drain)

    @property
    def ring(self) -> Ring:
        return self._ring

    def close(self) -> None:
        """Stop serving (idempotent).  The ring stays open; running handler tasks still
        post their answers when they finish."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    async def wait_idle(self) -> None:
        """Wait until no handler task is running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- internals ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        self._ring.ack()
        if self._scheduled is None:
            self._drain()

    def _drain(self) -> None:
        self._scheduled = None
        if self._closed:
            return
        ring = self._ring
        handler = self._handler
        try:
            items = ring.drain(self._batch)
        except MemoryError:
            # The request that could not be copied was answered ENOMEM; keep going.
            log.error("ring drain: out of memory")
            self._scheduled = self._loop.call_soon(self._drain)
            return
        self.handled += len(items)
        for ticket, payload in items:
            try:
                res = handler(payload)
                if type(res) is bytes:
                    ring.reply(ticket, res)
                elif inspect.isawaitable(res):
                    task = asyncio.ensure_future(res, loop=self._loop)
                    self._tasks.add(task)
                    task.add_done_callback(lambda t, ticket=ticket: self._finish(ticket, t))
                else:
                    ring.reply(ticket, res)  # any other bytes-like object
            except Exception:
                self._fail(ticket, "handler failed")
        if len(items) == self._batch:
            # Not armed: more may be pending.  Continue after other ready callbacks.
            self._scheduled = self._loop.call_soon(self._drain)

    def _finish(self, ticket: int, task: asyncio.Future[bytes]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._fail(ticket, "handler task cancelled", exc_info=False)
            return
        exc = task.exception()
        if exc is not None:
            self._fail(ticket, "handler failed", exc=exc)
            return
        try:
            self._ring.reply(ticket, task.result())
        except Exception:
            self._fail(ticket, "handler returned an invalid answer")

    def _fail(self, ticket: int, what: str, *, exc: BaseException | None = None,
              exc_info: bool = True) -> None:
        self.failed += 1
        log.error("ring request %#x: %s; answering EIO (max answer %d bytes)",
                  ticket, what, MAX_MSG, exc_info=exc if exc is not None else exc_info)
        self._ring.reply_error(ticket, errno.EIO)


def attach(loop: asyncio.AbstractEventLoop, ring: Ring, handler: Handler, *,
           batch: int = 256) -> Server:
    """Serve ``ring`` on ``loop`` with ``handler``; see the module docstring."""
    return Server(loop, ring, handler, batch)
