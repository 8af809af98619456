"""The audit front: a bounded queue and one writer thread that feeds every sink.

Contract of :class:`AuditLogger`:

* :meth:`~AuditLogger.log` MUST NOT block: it is called on the decision path, from any
  thread and from the asyncio event loop.  It takes one short lock and never waits for
  a sink.  It never raises.
* The queue holds at most ``queue_size`` events.  When it is full the event is dropped
  and counted.  The first event accepted after drops is preceded, in every sink, by a
  system event ``kind="dropped"``, ``reason="dropped N events"``, ``detail={"count": N}``
  (the writer also emits it on its own once the queue has drained, so it is not held
  back until the next decision).  Dropped events are never silently lost: their count
  always reaches the sinks, exactly once.
* Each event is handed to every sink exactly once, in queue order.  A sink that raises
  is counted (``sinks[name]["errors"]``) and the others still get the event.
* :meth:`~AuditLogger.close` drains the queue (bounded by ``timeout``), writes the
  summaries of every open coalescing window, closes the sinks and is idempotent.  Events
  logged after ``close`` are counted as dropped.
* With a :class:`~takakrypt.audit.coalesce.Coalescer`, repeated events and a caller's
  flood are counted instead of queued (that module's docstring); the writer thread
  queues their summary records when the windows close, whether or not more events
  arrive.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterable

from .coalesce import Coalescer
from .event import Event, dropped_event, hostname
from .sinks import Sink

__all__ = ["AuditLogger"]

log = logging.getLogger(__name__)

_STOP = object()


class _Report:
    """A drop report queued by the writer itself (not counted as a log() call)."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

# how often an idle writer checks for drops to report
_IDLE_POLL = 0.5


class AuditLogger:
    """Non-blocking audit logging to a list of sinks.

    >>> logger = AuditLogger([FileSink("/var/log/takakrypt/audit.json")])
    >>> logger.log(access_event(...))   # returns at once
    >>> logger.stats()["dropped"]
    0
    >>> logger.close(timeout=5)
    """

    def __init__(
        self,
        sinks: Iterable[Sink],
        *,
        queue_size: int = 8192,
        host: str | None = None,
        coalescer: Coalescer | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.sinks: list[Sink] = list(sinks)
        self.queue_size = queue_size
        self.host = host or hostname()
        self._q: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        # guards the counters below and the ordering of the "dropped" marker
        self._lock = threading.Lock()
        self._enqueued = 0
        self._dropped = 0
        self._pending_drops = 0  # dropped but not yet reported to the sinks
        self._closed = False
        self._done = threading.Condition()
        self._processed = 0  # queue items fully handed to every sink
        self._coalescer = coalescer if coalescer is not None and coalescer.enabled else None
        self._tick_every = (min(_IDLE_POLL, coalescer.window / 4) if coalescer is not None
                            and coalescer.window > 0 else _IDLE_POLL)
        self._next_tick = 0.0
        self._thread = threading.Thread(target=self._run, name="takakrypt-audit", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producers

    def log(self, event: Event) -> bool:
        """Queue ``event`` for every sink.  Never blocks; True if queued or held back
        for a summary record, False if dropped (queue full or logger closed)."""
        with self._lock:
            if self._closed:
                self._dropped += 1
                return False
            if self._coalescer is not None and not self._coalescer.admit(event):
                return True
            item: object = event
            if self._pending_drops:
                # the marker rides in the same slot, so it cannot be separated from
                # (or overtaken by) the event that follows the gap
                item = (dropped_event(self._pending_drops, host=self.host), event)
            try:
                self._q.put_nowait(item)
            except queue.Full:
                self._dropped += 1
                self._pending_drops += 1
                return False
            self._pending_drops = 0
            self._enqueued += 1
            return True

    __call__ = log

    # -------------------------------------------------------------------- writer

    def _dispatch(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.write(event)
            except Exception:
                sink.count_error()
                log.exception("audit sink %s failed", sink.name)

    def _report_drops_if_idle(self) -> None:
        with self._lock:
            if not self._pending_drops or not self._q.empty():
                return
            # the queue is empty and we hold the producers' lock, so this cannot fail
            # and no later event can get ahead of the marker
            self._q.put_nowait(_Report(dropped_event(self._pending_drops, host=self.host)))
            self._pending_drops = 0

    def _summaries_due(self) -> None:
        """Queue the summary records of the coalescing windows that have closed (as many
        as there is room for; the others stay open and keep counting)."""
        if self._coalescer is None:
            return
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self._tick_every
        with self._lock:
            # only this thread takes from the queue: the room cannot shrink meanwhile
            for ev in self._coalescer.expire(limit=self.queue_size - self._q.qsize()):
                self._q.put_nowait(_Report(ev))

    def _run(self) -> None:
        while True:
            self._summaries_due()
            try:
                item = self._q.get(timeout=self._tick_every)
            except queue.Empty:
                self._report_drops_if_idle()
                continue
            if item is _STOP:
                break
            if isinstance(item, _Report):
                self._dispatch(item.event)
                continue
            if isinstance(item, tuple):
                for ev in item:
                    self._dispatch(ev)
            else:
                self._dispatch(item)  # type: ignore[arg-type]
            with self._done:
                self._processed += 1
                self._done.notify_all()
            if self._q.empty():
                self._report_drops_if_idle()
        # after close(): report drops that never saw room again, close every window
        with self._lock:
            n, self._pending_drops = self._pending_drops, 0
            last = self._coalescer.expire(everything=True) if self._coalescer else []
        if n:
            self._dispatch(dropped_event(n, host=self.host))
        for ev in last:
            self._dispatch(ev)

    # ------------------------------------------------------------------ control

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before the call reached every sink, then flush
        the sinks.  True if all of it got out within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._enqueued
        with self._done:
            ok = self._done.wait_for(lambda: self._processed >= target, timeout)
        for sink in self.sinks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ok = sink.flush(left) and ok
            except Exception:
                sink.count_error()
                log.exception("audit sink %s flush failed", sink.name)
                ok = False
        return ok

    def close(self, timeout: float | None = 10.0) -> bool:
        """Drain the queue, stop the writer and close the sinks.  Idempotent.

        Returns False if the writer did not finish within ``timeout`` (a sink is stuck);
        the sinks are closed anyway.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return not self._thread.is_alive()
            self._closed = True
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(left)
        ok = not self._thread.is_alive()
        for sink in self.sinks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                sink.close(left)
            except Exception:
                sink.count_error()
                log.exception("audit sink %s close failed", sink.name)
        return ok

    def __enter__(self) -> "AuditLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, object]:
        """Counters for ``takakrypt audit stats`` and the Prometheus exporter.

        ``enqueued``/``dropped`` count calls to :meth:`log`; ``processed`` counts queue
        items handed to every sink; ``sinks`` maps each sink name to its own counters
        (``written``, ``errors``, ``dropped``, ...); ``sink_errors`` is their sum.
        """
        with self._lock:
            enqueued, dropped, pending = self._enqueued, self._dropped, self._pending_drops
            flood = (self._coalescer.stats() if self._coalescer is not None else
                     {"coalesced": 0, "rate_limited": 0, "summaries": 0, "open_windows": 0,
                      "limited_callers": 0})
        with self._done:
            processed = self._processed
        sinks = {s.name: s.stats() for s in self.sinks}
        return {
            "enqueued": enqueued,
            "processed": processed,
            "dropped": dropped,
            "dropped_unreported": pending,
            "queue_depth": self._q.qsize(),
            "queue_size": self.queue_size,
            "sink_errors": sum(int(s.get("errors", 0)) for s in sinks.values()),
            **flood,
            "sinks": sinks,
        }
