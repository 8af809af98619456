"""Signals noted for a foreground main loop, without locks.

A Python signal handler runs on the main thread between two bytecodes, wherever that
thread happens to be, including inside ``threading.Event.wait()`` while it holds the
Event's own (non-reentrant) lock.  A handler that calls ``Event.set()`` there waits for
that lock for ever: the test guard server hung this way on a SIGUSR1, and a SIGTERM
could hang ``python -m takakrypt.guard`` the same way.  The handlers here only store a
flag; the loop polls it between sleeps.
"""

from __future__ import annotations

import signal
import time

#: seconds between two looks at the flags
POLL = 0.05


class SignalFlags:
    """Install a handler for each of ``signals`` that only notes its arrival."""

    def __init__(self, *signals: signal.Signals) -> None:
        self._seen = dict.fromkeys(signals, False)  # a dict store is atomic under the GIL
        for s in signals:
            signal.signal(s, self._note)

    def _note(self, signum: int, _frame: object) -> None:
        self._seen[signal.Signals(signum)] = True

    def seen(self, *signals: signal.Signals) -> bool:
        """Whether any of ``signals`` arrived (the flags stay set)."""
        return any(self._seen[s] for s in signals)

    def take(self, sig: signal.Signals) -> bool:
        """Whether ``sig`` arrived since the last take (clears its flag); arrivals in
        between are one, as with any pending signal."""
        if not self._seen[sig]:
            return False
        self._seen[sig] = False
        return True

    def sleep(self, seconds: float = POLL) -> None:
        """Wait ``seconds`` (a signal's handler runs meanwhile; the wait is not cut
        short: the caller polls again after at most ``seconds``)."""
        time.sleep(seconds)
