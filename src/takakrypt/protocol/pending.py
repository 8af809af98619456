"""Sequence numbers and request/response matching, independent of any transport.

A requester numbers its requests with a :class:`Sequencer`, registers each in a
:class:`PendingRequests` before sending it, and feeds every response it receives to
:meth:`PendingRequests.resolve`.  Every registered request ends exactly once: with its
response, with a synthesised TIMEOUT response after the timeout (5 s by default), or with
a NETWORK response when the transport goes away.  Callers therefore always get a
:class:`~takakrypt.protocol.messages.Message` back and MUST treat any status other than
SUCCESS as deny (fail closed).

The two sides of a connection number their requests independently: a response is
matched against the receiver's own requests only, by sequence and operation.

Not thread-safe: use one PendingRequests per event loop (Sequencer is thread-safe).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from .constants import DEFAULT_TIMEOUT, Status
from .messages import Message, encode, error_reply


class Sequencer:
    """32-bit wrapping sequence numbers; 0 is never issued (it marks "unset")."""

    def __init__(self, start: int = 1) -> None:
        if not 0 <= start <= 0xFFFFFFFF:
            raise ValueError("start must be a u32")
        self._next = start or 1
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            n = self._next
            self._next = n + 1 if n < 0xFFFFFFFF else 1
            return n

    __next__ = next

    def __iter__(self) -> Sequencer:
        return self


class _Entry:
    __slots__ = ("request", "future", "timer")

    def __init__(self, request: Message, future: asyncio.Future[Message],
                 timer: asyncio.TimerHandle) -> None:
        self.request = request
        self.future = future
        self.timer = timer


class PendingRequests:
    """Outstanding requests of one requester, keyed by sequence number."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, *,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.timeout = timeout
        self._loop = loop
        self._pending: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, sequence: object) -> bool:
        return sequence in self._pending

    def add(self, request: Message, timeout: float | None = None) -> asyncio.Future[Message]:
        """Register ``request``; the future resolves to its response (or TIMEOUT)."""
        if request.is_response:
            raise ProtocolError("only requests can be pending")
        seq = request.sequence
        if seq in self._pending:
            raise ProtocolError(f"sequence {seq} is already pending")
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        delay = self.timeout if timeout is None else timeout
        timer = loop.call_later(delay, self._expire, seq, fut, delay)
        self._pending[seq] = _Entry(request, fut, timer)
        fut.add_done_callback(lambda f: self._forget(seq, f))
        return fut

    def resolve(self, response: Message) -> bool:
        """Hand a received response to its request.

        Returns False when no request with this sequence is pending (a late answer to a
        request that already timed out: drop it).  Raises ProtocolError when the
        sequence is pending under another operation; that request stays pending.
        """
        if not response.is_response:
            raise ProtocolError("resolve() takes responses, got a request")
        entry = self._pending.get(response.sequence)
        if entry is None:
            return False
        if entry.request.operation != response.operation:
            raise ProtocolError(
                f"response {response.sequence} is {response.operation.name}, request was "
                f"{entry.request.operation.name}")
        self._finish(response.sequence, entry, response)
        return True

    def fail(self, sequence: int, operation: int, status: Status, reason: str) -> bool:
        """End the request ``sequence`` of ``operation`` with ``status`` at once (e.g. its
        response arrived but does not decode); False if no such request is pending."""
        entry = self._pending.get(sequence)
        if entry is None or int(entry.request.operation) != operation:
            return False
        self._finish(sequence, entry, error_reply(entry.request, status, reason))
        return True

    def fail_all(self, status: Status = Status.NETWORK, reason: str = "transport closed") -> int:
        """Resolve every pending request with ``status`` (e.g. the socket went away)."""
        n = 0
        for seq, entry in list(self._pending.items()):
            self._finish(seq, entry, error_reply(entry.request, status, reason))
            n += 1
        return n

    async def call(self, request: Message, send: Callable[[bytes], Any],
                   timeout: float | None = None) -> Message:
        """Register, send ``encode(request)`` with ``send`` (sync or async), await."""
        fut = self.add(request, timeout)
        try:
            r = send(encode(request))
            if inspect.isawaitable(r):
                await r
        except BaseException:
            fut.cancel()
            raise
        return await fut

    def _finish(self, seq: int, entry: _Entry, response: Message) -> None:
        entry.timer.cancel()
        self._pending.pop(seq, None)
        if not entry.future.done():
            entry.future.set_result(response)

    def _expire(self, seq: int, fut: asyncio.Future[Message], delay: float) -> None:
        entry = self._pending.get(seq)
        if entry is not None and entry.future is fut:
            self._finish(seq, entry, error_reply(entry.request, Status.TIMEOUT,
                                                 f"no response within {delay:g} s"))

    def _forget(self, seq: int, fut: asyncio.Future[Message]) -> None:
        # a caller cancelled the future (e.g. wait_for): drop the entry and its timer
        entry = self._pending.get(seq)
        if entry is not None and entry.future is fut:
            entry.timer.cancel()
            del self._pending[seq]
