"""Circuit breaker guarding the key backend (seed 000, "Circuit Breaker Pattern").

States::

    closed ──(failure_threshold consecutive failures)──> open
    open ──(reset_timeout elapsed)──> half_open   (the next call is the probe)
    half_open ──probe succeeds──> closed
    half_open ──probe fails──> open (timer restarts)

While open, calls fail at once with BackendUnavailable instead of waiting on a dead
server; only one probe is let through in half-open.  Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import BackendUnavailable, Error, KeyExists, KeyNotFound

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, name: str, *, failure_threshold: int = 5, reset_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.transitions: list[tuple[str, str]] = []
        self.rejected = 0

    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _set(self, new: str) -> None:
        if new != self._state:
            self.transitions.append((self._state, new))
            self._state = new

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout:
            self._set(HALF_OPEN)
            self._probe_in_flight = False

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` through the breaker.  Errors that mean "the backend is there but
        said no" (KeyNotFound, KeyExists) count as successes of the connection; every
        other failure (unreachable, a keystore file that is missing, unreadable, corrupt
        or no longer opens) counts as a failure and is raised as it is."""
        with self._lock:
            self._maybe_half_open()
            if self._state == OPEN or (self._state == HALF_OPEN and self._probe_in_flight):
                self.rejected += 1
                raise BackendUnavailable(f"key backend {self.name} unavailable "
                                         f"(circuit {self._state})")
            if self._state == HALF_OPEN:
                self._probe_in_flight = True
        try:
            result = fn()
        except (KeyNotFound, KeyExists):
            self._success()
            raise
        except Error:
            self._failure()
            raise
        except OSError as e:
            self._failure()
            raise BackendUnavailable(f"key backend {self.name}: {e}") from None
        self._success()
        return result

    def record(self, ok: bool) -> None:
        """The outcome of a health probe made outside :meth:`call` (the probe is how an
        open circuit learns that the backend is back)."""
        if ok:
            self._success()
        else:
            self._failure()

    def trip(self) -> None:
        """Open the circuit now, as after ``failure_threshold`` failures: the key backend
        was found down at start, and no start-up check is to wait on it once more."""
        with self._lock:
            self._failures = max(self._failures, self.failure_threshold)
            self._probe_in_flight = False
            self._opened_at = self._clock()
            self._set(OPEN)

    def _success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probe_in_flight = False
            self._set(CLOSED)

    def _failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probe_in_flight = False
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._set(OPEN)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._maybe_half_open()
            return {"name": self.name, "state": self._state, "failures": self._failures,
                    "rejected": self.rejected}
