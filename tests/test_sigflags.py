"""takakrypt.sigflags: a foreground loop's signal handling never deadlocks.

The guard servers (``python -m takakrypt.guard``, the test and benchmark servers) once
set a threading.Event from their signal handlers; a signal landing while the main
thread held that Event's lock (inside Event.wait) hung the process for ever.  The child
here runs the same loop shape as the servers under a storm of signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

CHILD = r"""
import signal, sys
from takakrypt.sigflags import SignalFlags
sigs = SignalFlags(signal.SIGTERM, signal.SIGUSR1)
print("ready", flush=True)
dumps = 0
while not sigs.seen(signal.SIGTERM):
    sigs.sleep(0.0001)  # as many loop turns as the storm can hit
    if sigs.take(signal.SIGUSR1):
        dumps += 1
print(dumps, flush=True)
"""


def test_a_signal_storm_never_hangs_the_loop():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, env=env,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 3  # a storm of USR1 (the stats request)
        sent = 0
        while time.monotonic() < deadline:
            for _ in range(200):
                os.kill(p.pid, signal.SIGUSR1)
            sent += 200
        os.kill(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=60)  # a wait for the exit, not a timed assertion
        assert p.returncode == 0
        dumps = int(out.strip())
        assert 1 <= dumps <= sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_take_clears_and_seen_keeps():
    from takakrypt.sigflags import SignalFlags

    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        f = SignalFlags(signal.SIGUSR1, signal.SIGUSR2)
        assert not f.seen(signal.SIGUSR1, signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        f.sleep(0)  # the handler runs between bytecodes
        assert f.seen(signal.SIGUSR2) and f.seen(signal.SIGUSR2)
        assert not f.take(signal.SIGUSR1)
        assert f.take(signal.SIGUSR2) and not f.take(signal.SIGUSR2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
