"""Circuit breaker state machine (seed 000): closed -> open -> half-open -> closed/open."""

import threading

import pytest

from takakrypt.agent.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from takakrypt.errors import BackendUnavailable, KeyNotFound


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def fail():
    raise BackendUnavailable("down")


def test_opens_after_threshold_and_rejects_fast():
    clk = Clock()
    b = CircuitBreaker("kms", failure_threshold=3, reset_timeout=10, clock=clk)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            b.call(fail)
        assert b.state == CLOSED
    with pytest.raises(BackendUnavailable):
        b.call(fail)
    assert b.state == OPEN
    calls = []
    with pytest.raises(BackendUnavailable, match="circuit open"):
        b.call(lambda: calls.append(1))
    assert calls == [] and b.rejected == 1


def test_half_open_probe_success_closes():
    clk = Clock()
    b = CircuitBreaker("kms", failure_threshold=1, reset_timeout=10, clock=clk)
    with pytest.raises(BackendUnavailable):
        b.call(fail)
    clk.t += 9.9
    assert b.state == OPEN
    clk.t += 0.2
    assert b.state == HALF_OPEN
    assert b.call(lambda: 42) == 42
    assert b.state == CLOSED
    assert b.transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_half_open_probe_failure_reopens_and_restarts_timer():
    clk = Clock()
    b = CircuitBreaker("kms", failure_threshold=1, reset_timeout=10, clock=clk)
    with pytest.raises(BackendUnavailable):
        b.call(fail)
    clk.t += 11
    with pytest.raises(BackendUnavailable, match="down"):
        b.call(fail)
    assert b.state == OPEN
    clk.t += 9
    assert b.state == OPEN
    clk.t += 2
    assert b.state == HALF_OPEN


def test_only_one_probe_in_half_open():
    clk = Clock()
    b = CircuitBreaker("kms", failure_threshold=1, reset_timeout=1, clock=clk)
    with pytest.raises(BackendUnavailable):
        b.call(fail)
    clk.t += 2
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return "ok"

    t = threading.Thread(target=lambda: b.call(slow))
    t.start()
    started.wait(5)
    with pytest.raises(BackendUnavailable, match="half_open"):
        b.call(lambda: "second")
    release.set()
    t.join()
    assert b.state == CLOSED


def test_not_found_is_a_healthy_answer():
    b = CircuitBreaker("kms", failure_threshold=1)

    def nf():
        raise KeyNotFound("no such key")
    for _ in range(3):
        with pytest.raises(KeyNotFound):
            b.call(nf)
    assert b.state == CLOSED


def test_oserror_counts_as_failure():
    b = CircuitBreaker("kms", failure_threshold=2)

    def boom():
        raise ConnectionRefusedError(111, "refused")
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            b.call(boom)
    assert b.state == OPEN


def test_keystore_failures_count_and_answers_do_not():
    """A keystore file that is missing, unreadable or corrupt is a backend failure (the
    circuit opens, the error is raised as it is); "no such key" is an answer."""
    from takakrypt.errors import KeyError_, KeystoreCorrupt

    b = CircuitBreaker("local", failure_threshold=2, reset_timeout=10, clock=Clock())

    def gone():
        raise KeystoreCorrupt("keystore /x has disappeared")

    def unreadable():
        raise KeyError_("cannot open keystore /x: Permission denied")

    def no_key():
        raise KeyNotFound("key 'k' not found")

    with pytest.raises(KeystoreCorrupt):
        b.call(gone)
    with pytest.raises(KeyNotFound):
        b.call(no_key)  # an answer: resets the count
    assert b.state == CLOSED
    with pytest.raises(KeystoreCorrupt):
        b.call(gone)
    with pytest.raises(KeyError_, match="Permission denied"):
        b.call(unreadable)
    assert b.state == OPEN
    b.record(True)  # the health probe saw the backend answer
    assert b.state == CLOSED
