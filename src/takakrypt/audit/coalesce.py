"""Flood control in front of the audit queue: coalescing and a per-caller rate limit.

A denied program that retries in a loop must not be able to rotate the audit trail
away.  Every event that names a caller (access events, and system events with a
``uid`` such as ``peer-refused``) passes :meth:`Coalescer.admit`:

1. **Coalescing.**  Events with the same (kind, uid, pid, exe, path, operation,
   decision, policy, rule, key, key version) within ``window`` seconds of the first one
   are counted, not written.  The first is written at once; when the window closes, one
   ``kind: "coalesced"`` record with the first event's fields and
   ``detail = {"of": kind, "count": N, "first": T1, "last": T2}`` stands for the N
   events that were held back (times of the first and last of them).  No record if
   nothing was held back.
2. **Rate limit per caller.**  An event that would open a new window (or be written
   on its own) takes a token from its uid's bucket (``rate`` per second, at most
   ``burst``).  Without a token it is counted; every ``window`` seconds (10 s with
   coalescing off) one ``kind: "rate-limited"`` record per uid carries the first
   held-back event's fields and ``detail = {"count": N, "first": T1, "last": T2}``.
   A uid seen for the first time has a full bucket, so **the first event of a new
   caller is always written**, whatever another caller is doing.  Callers are uids,
   not pids: only root makes new uids, anyone can make new pids.

Every event is accounted for exactly once: written, or counted in exactly one summary
record.  System events without a caller (reloads, drops, mounts) and ``key-request``
events (one record per key request, always: they come from root peers only, and
KEY_REQUEST is off unless configured) are never held back.

Contract: not thread-safe; the :class:`~takakrypt.audit.logger.AuditLogger` calls it
under its producer lock.  :meth:`admit` is O(1); :meth:`expire` is O(windows closed +
callers).
"""

from __future__ import annotations

import time
from typing import Callable

import msgspec

from .event import COALESCED, DROPPED, KEY_REQUEST, RATE_LIMITED, Event, now_rfc3339

__all__ = ["Coalescer"]

_NEVER_HELD = frozenset({DROPPED, COALESCED, RATE_LIMITED, KEY_REQUEST})
#: how often rate-limit reports go out when coalescing is off
_REPORT_INTERVAL = 10.0


class _Held:
    """Events held back behind a first one: their count and first/last times."""

    __slots__ = ("event", "opened", "count", "first", "last")

    def __init__(self, event: Event | None, opened: float) -> None:
        self.event, self.opened = event, opened
        self.count, self.first, self.last = 0, "", ""

    def add(self, event: Event) -> None:
        if not self.count:
            self.first = event.time
            if self.event is None:
                self.event = event
        self.count += 1
        self.last = event.time


class Coalescer:
    """See the module docstring.  ``window`` 0 turns coalescing off, ``rate`` 0 the
    rate limit."""

    def __init__(self, *, window: float = 10.0, max_open: int = 4096, rate: float = 5.0,
                 burst: int = 200, clock: Callable[[], float] = time.monotonic) -> None:
        if window < 0 or max_open < 0 or rate < 0 or burst < 1:
            raise ValueError("window, max_open, rate must be >= 0 and burst >= 1")
        self.window, self.max_open, self.rate, self.burst = window, max_open, rate, burst
        self.clock = clock
        self._open: dict[tuple, _Held] = {}           # in opening order
        self._buckets: dict[int, list[float]] = {}    # uid -> [tokens, last refill]
        self._limited: dict[int, _Held] = {}          # uid -> held back by the rate limit
        self.coalesced = 0
        self.rate_limited = 0
        self.summaries = 0

    @property
    def enabled(self) -> bool:
        return self.window > 0 or self.rate > 0

    def admit(self, event: Event) -> bool:
        """True: write ``event`` now.  False: it is counted in a later summary."""
        if event.uid < 0 or event.kind in _NEVER_HELD:
            return True
        now = self.clock()
        key = (event.kind, event.uid, event.pid, event.exe, event.path, event.operation,
               event.decision, event.policy, event.rule, event.key, event.key_version)
        held = self._open.get(key)
        if held is not None:
            held.add(event)
            self.coalesced += 1
            return False
        if not self._take(event.uid, now):
            lim = self._limited.get(event.uid)
            if lim is None:
                lim = self._limited[event.uid] = _Held(None, now)
            lim.add(event)
            self.rate_limited += 1
            return False
        if self.window > 0 and len(self._open) < self.max_open:
            self._open[key] = _Held(event, now)
        return True

    def _take(self, uid: int, now: float) -> bool:
        if self.rate <= 0:
            return True
        b = self._buckets.get(uid)
        if b is None:
            b = self._buckets[uid] = [float(self.burst), now]
        else:
            b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False

    def expire(self, *, everything: bool = False, limit: int | None = None) -> list[Event]:
        """Summary records of the windows (and rate-limit periods) that have closed, at
        most ``limit`` of them (the rest stay open and keep counting); ``everything``
        closes all of them (shutdown)."""
        now = self.clock()
        out: list[Event] = []
        room = limit if limit is not None else len(self._open) + len(self._limited)
        stamp = now_rfc3339()
        for key, held in list(self._open.items()):
            if not everything and now - held.opened < self.window:
                break  # opening order: the rest are younger
            if held.count and len(out) >= room:
                break
            del self._open[key]
            if held.count:
                out.append(self._summary(held, COALESCED, stamp,
                                         f"{held.count} more identical events"))
        period = self.window if self.window > 0 else _REPORT_INTERVAL
        for uid, held in list(self._limited.items()):
            if len(out) >= room:
                break
            if everything or now - held.opened >= period:
                del self._limited[uid]
                out.append(self._summary(held, RATE_LIMITED, stamp,
                                         f"rate limit: {held.count} events of uid {uid} not "
                                         "written one by one (fields: the first of them)"))
        # a full bucket is what a new caller gets anyway: forget it
        for uid in [u for u, b in self._buckets.items()
                    if b[0] + (now - b[1]) * self.rate >= self.burst]:
            del self._buckets[uid]
        self.summaries += len(out)
        return out

    @staticmethod
    def _summary(held: _Held, kind: str, stamp: str, reason: str) -> Event:
        assert held.event is not None
        detail: dict[str, str | int | float | bool | None] = {
            "count": held.count, "first": held.first, "last": held.last}
        if kind == COALESCED:
            detail = {"of": held.event.kind, **detail}
        return msgspec.structs.replace(held.event, time=stamp, kind=kind, reason=reason,
                                       latency_us=0.0, detail=detail)

    def stats(self) -> dict[str, int]:
        return {"coalesced": self.coalesced, "rate_limited": self.rate_limited,
                "summaries": self.summaries, "open_windows": len(self._open),
                "limited_callers": len(self._limited)}
