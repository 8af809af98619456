"""Request ring (takakrypt._ring + takakrypt.ringserver): correctness under concurrency.

Native producer threads (no GIL) against the asyncio consumer, on the default loop and
on uvloop.  No assertion depends on timing: timeouts are either the behaviour under
test or generous upper bounds that only turn a hang into a failure.  ci/asan.sh runs
this file on an ASan/UBSan build with smaller stress sizes.
"""

import asyncio
import errno
import os
import select
import struct
import threading
import time

import pytest

from takakrypt import ringserver
from takakrypt._ring import (LOAD_HEADER, MAX_MSG, Ring, _load_message,
                             _start_producers)

SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
#: stress scale: full in the normal run, moderate under the sanitizers
BIG = not SANITIZED

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    uvloop is None, reason="uvloop not installed"))]


@pytest.fixture(params=LOOPS)
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield lp
    lp.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


async def finished(h) -> dict:
    """Let the loop serve while native producers run, then collect their counts."""
    while not h.done():
        await asyncio.sleep(0.002)
    return h.join()


def wait_for(cond, what: str, limit: float = 60.0) -> None:
    """Poll `cond` (a hang guard, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.002)


class OrderChecker:
    """Echo handler that checks content and per-producer order of load messages."""

    def __init__(self):
        self.next: dict[tuple[int, int], int] = {}
        self.errors: list[str] = []
        self.seen = 0

    def __call__(self, payload: bytes) -> bytes:
        tid, seq, ln = struct.unpack_from("<IQI", payload)
        key = (tid, ln)
        want = self.next.get(key, 0)
        if seq != want:
            self.errors.append(f"producer {key}: got seq {seq}, expected {want}")
        if ln != len(payload) or payload != _load_message(tid, seq, ln):
            self.errors.append(f"producer {key} seq {seq}: corrupted payload")
        self.next[key] = seq + 1
        self.seen += 1
        return payload


def assert_clean(res: dict, total: int) -> None:
    assert res["sent"] == total, res
    assert res["ok"] == total, res
    for k in ("mismatch", "timeouts", "submit_timeouts", "errors", "closed"):
        assert res[k] == 0, (k, res)
    assert res["latencies"] == total
    assert 0 < res["p50_ns"] <= res["p99_ns"] <= res["max_ns"]


# -- basic API -------------------------------------------------------------------------


def test_round_trip_and_stats():
    r = Ring(slots=8, slot_size=128)
    assert (r.slots, r.slot_size, r.max_inflight, r.slot_payload) == (8, 128, 8, 104)
    t = r.submit(b"hello")
    assert r.drain() == [(t, b"hello")]
    assert r.reply(t, b"world") is True
    assert r.wait_reply(t, timeout=5) == b"world"
    with pytest.raises(ValueError, match="ticket"):
        r.wait_reply(t, timeout=0)  # already collected
    assert r.reply(t, b"again") is False
    s = r.stats()
    assert (s["submitted"], s["completed"], s["drained"], s["late_replies"]) == (1, 1, 1, 1)
    assert s["max_depth"] == 1 and s["wakeups"] == 1


@pytest.mark.parametrize("kw", [dict(slots=3), dict(slots=1), dict(slots=2**21),
                                dict(slot_size=100), dict(slot_size=0),
                                dict(slot_size=32768), dict(max_inflight=0),
                                dict(slots="8")])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        Ring(**kw)


@pytest.mark.parametrize("slot_size", [64, 128, 512])
@pytest.mark.parametrize("size", [0, 1, 39, 40, 41, 103, 104, 105, 488, 489, 1000,
                                  4096, 8191, 8192])
def test_sizes_round_trip(slot_size, size):
    """Single- and multi-slot records, inline and heap replies, across the ring's end."""
    r = Ring(slots=256, slot_size=slot_size, max_inflight=4)
    nslots = r.record_slots(size)
    assert nslots == max(1, -(-size // r.slot_payload))
    for i in range(3 * 256 // nslots + 2):  # enough rounds to wrap around
        msg = os.urandom(size)
        t = r.submit(msg)
        assert r.drain(4) == [(t, msg)]
        answer = msg[::-1] + bytes([i & 0xFF]) if size < MAX_MSG else msg[::-1]
        assert r.reply(t, answer)
        assert r.wait_reply(t, timeout=5) == answer


def test_oversize_rejected():
    r = Ring(slots=4, slot_size=64)  # 40 bytes per slot, 160 per ring
    with pytest.raises(ValueError, match="too large"):
        r.submit(b"x" * (MAX_MSG + 1))
    with pytest.raises(ValueError, match="too large"):
        r.submit(b"x" * 161)  # fits the protocol, not this ring
    with pytest.raises(ValueError, match="too large"):
        r.submit_and_wait(b"x" * 161, timeout=1)
    t = r.submit(b"x" * 160)
    (t2, m), = r.drain()
    assert t2 == t and m == b"x" * 160
    with pytest.raises(ValueError, match="too large"):
        r.reply(t, b"y" * (MAX_MSG + 1))
    assert r.reply(t, b"y" * MAX_MSG)  # the ticket is still pending after the refusal
    assert r.wait_reply(t) == b"y" * MAX_MSG
    with pytest.raises(TypeError):
        r.submit("text")
    assert r.stats()["submitted"] == 1


def test_error_answer_and_tickets():
    r = Ring(slots=8)
    t = r.submit(b"open /secret")
    r.drain()
    assert r.reply_error(t, errno.EACCES)
    with pytest.raises(PermissionError):
        r.wait_reply(t)
    with pytest.raises(ValueError):
        r.reply_error(t, 0)
    for bogus in (0, 12345, (1 << 20) | 7, 2**64 - 1):
        assert r.reply(bogus, b"x") is False
        assert r.cancel(bogus) is False
        with pytest.raises(ValueError):
            r.wait_reply(bogus, timeout=0)
    with pytest.raises(ValueError):
        r.reply(-1, b"x")
    t = r.submit(b"y")
    assert r.cancel(t) is True
    assert r.drain() == [(t, b"y")]  # already queued: still delivered...
    assert r.reply(t, b"z") is False  # ...but its answer is dropped
    assert r.cancel(t) is False


# -- timeouts and late replies ---------------------------------------------------------


def test_timeout_then_late_reply_is_dropped_and_cell_reused():
    r = Ring(slots=4, max_inflight=1)  # one reply cell: the next request reuses it
    t1 = r.submit(b"one")
    assert r.drain() == [(t1, b"one")]
    with pytest.raises(TimeoutError):
        r.wait_reply(t1, timeout=0.02)
    t2 = r.submit(b"two")
    assert t2 != t1 and (t2 ^ t1) & 0xFFFFF == 0  # same cell, newer generation
    assert r.reply(t1, b"LATE ANSWER FOR ONE") is False
    assert r.drain() == [(t2, b"two")]
    assert r.reply(t2, b"two!") is True
    assert r.wait_reply(t2, timeout=5) == b"two!"
    s = r.stats()
    assert (s["timeouts"], s["late_replies"], s["completed"]) == (1, 1, 1)
    # The request that timed out before being drained is still drained, answer dropped.
    t3 = r.submit(b"three")
    with pytest.raises(TimeoutError):
        r.wait_reply(t3, timeout=0)
    assert r.drain() == [(t3, b"three")]
    assert r.reply(t3, b"x") is False


def test_native_timeout_late_reply_under_reuse(loop):
    """A producer times out on one request; the late answer arrives while the same reply
    cell serves later requests and must not corrupt them."""
    ring = Ring(slots=16, max_inflight=1)
    n = 40

    async def handler(p):
        _, seq, _ = struct.unpack_from("<IQI", p)
        if seq == 5:
            await asyncio.sleep(0.3)  # beyond the producer's 0.1 s timeout
        return p

    async def main():
        srv = ringserver.attach(loop, ring, handler)
        h = _start_producers(ring, 1, n, 64, timeout=0.1)
        res = await finished(h)
        await srv.wait_idle()
        srv.close()
        return res

    res = loop.run_until_complete(main())
    assert res["timeouts"] == 1 and res["ok"] == n - 1 and res["mismatch"] == 0, res
    s = ring.stats()
    assert s["late_replies"] == 1 and s["timeouts"] == 1 and s["completed"] == n - 1


# -- back-pressure -------------------------------------------------------------------


def test_full_ring_python():
    r = Ring(slots=2, slot_size=64, max_inflight=8)
    a, b = r.submit(b"a"), r.submit(b"b")
    with pytest.raises(BlockingIOError):
        r.submit(b"c")
    with pytest.raises(TimeoutError):
        r.submit(b"c", timeout=0.02)
    s = r.stats()
    assert s["full_rejections"] == 1 and s["full_waits"] == 1

    got = []
    th = threading.Thread(target=lambda: got.append(r.submit(b"c", timeout=None)))
    th.start()
    wait_for(lambda: r.stats()["full_waits"] == 2, "the blocking submit to wait")
    assert r.drain(2) == [(a, b"a"), (b, b"b")]
    th.join()
    assert r.drain() == [(got[0], b"c")]


def test_reply_cells_exhausted():
    r = Ring(slots=8, max_inflight=2)
    t1, t2 = r.submit(b"1"), r.submit(b"2")
    assert len(r.drain()) == 2  # the ring is empty, but both cells are in flight
    with pytest.raises(BlockingIOError):
        r.submit(b"3")
    r.reply(t1, b"ok")
    with pytest.raises(BlockingIOError):
        r.submit(b"3")  # answered but not collected yet: still in flight
    assert r.wait_reply(t1) == b"ok"
    t3 = r.submit(b"3")
    assert r.cancel(t2) and r.cancel(t3)


@pytest.mark.parametrize("blocking", [False, True], ids=["eagain-retry", "blocking"])
def test_back_pressure_slow_consumer(loop, blocking):
    ring = Ring(slots=4, slot_size=128, max_inflight=8)
    nthreads, n = 4, (300 if BIG else 80)
    check = OrderChecker()

    def slow(p):
        time.sleep(0.0002)  # a consumer slower than the producers
        return check(p)

    async def main():
        srv = ringserver.attach(loop, ring, slow, batch=2)
        h = _start_producers(ring, nthreads, n, 100, window=2, blocking=blocking,
                             timeout=60)
        res = await finished(h)
        srv.close()
        return res

    res = loop.run_until_complete(main())
    assert_clean(res, nthreads * n)
    assert not check.errors, check.errors[:5]
    s = ring.stats()
    if blocking:
        assert s["full_waits"] > 0
    else:
        assert s["full_rejections"] > 0 and res["retries"] > 0
    assert s["max_depth"] <= 4
    assert s["submitted"] == s["completed"] == s["drained"] == nthreads * n


# -- stress ----------------------------------------------------------------------------


def test_stress_many_producers(loop):
    nthreads, n = (8, 20000) if BIG else (4, 2000)
    ring = Ring(slots=1024)
    check = OrderChecker()

    async def main():
        srv = ringserver.attach(loop, ring, check, batch=64)
        h = _start_producers(ring, nthreads, n, 200, window=4, timeout=120)
        res = await finished(h)
        srv.close()
        return res

    res = loop.run_until_complete(main())
    total = nthreads * n
    assert_clean(res, total)
    assert not check.errors, check.errors[:5]
    assert check.seen == total
    assert check.next == {(t, 200): n for t in range(nthreads)}  # none lost or duplicated
    s = ring.stats()
    assert s["submitted"] == s["completed"] == s["drained"] == total
    assert s["late_replies"] == s["timeouts"] == 0
    assert s["wakeups"] <= total


def test_stress_mixed_sizes_multi_slot(loop):
    """Single-slot and multi-slot records interleaved, wrapping a small ring often."""
    ring = Ring(slots=128, slot_size=256)  # 232 bytes per slot
    small, large = (4, 3000) if BIG else (2, 300), (2, 1500) if BIG else (2, 150)
    check = OrderChecker()

    async def main():
        srv = ringserver.attach(loop, ring, check, batch=32)
        hs = _start_producers(ring, small[0], small[1], 64, window=3, timeout=120)
        hl = _start_producers(ring, large[0], large[1], 3000, window=2, timeout=120)
        hm = _start_producers(ring, 1, large[1], MAX_MSG, timeout=120)
        res = [await finished(h) for h in (hs, hl, hm)]
        srv.close()
        return res

    rs, rl, rm = loop.run_until_complete(main())
    assert_clean(rs, small[0] * small[1])
    assert_clean(rl, large[0] * large[1])
    assert_clean(rm, large[1])
    assert not check.errors, check.errors[:5]
    assert ring.stats()["max_depth"] <= 128


def test_python_threads_submit_and_wait(loop):
    ring = Ring(slots=64)
    nthreads, n = 4, (500 if BIG else 100)

    async def handler(p):
        await asyncio.sleep(0)
        return p.upper()

    def worker(i):
        for k in range(n):
            msg = f"thread {i} msg {k}".encode()
            assert ring.submit_and_wait(msg, timeout=60) == msg.upper()
        return n

    async def main():
        srv = ringserver.attach(loop, ring, handler)
        done = await asyncio.gather(*(loop.run_in_executor(None, worker, i)
                                      for i in range(nthreads)))
        srv.close()
        return done

    assert loop.run_until_complete(main()) == [n] * nthreads


# -- close -----------------------------------------------------------------------------


def test_close_wakes_waiting_native_producers():
    """No consumer: 2 producers wait for replies, 2 wait for space; close wakes all."""
    ring = Ring(slots=2, slot_size=64, max_inflight=2)
    h = _start_producers(ring, 4, 10, 32, timeout=600)  # only close can end them
    wait_for(lambda: ring.stats()["submitted"] == 2 and ring.stats()["full_waits"] >= 2,
             "producers to block")
    ring.close()
    res = h.join()
    assert res["closed"] == 4 and res["ok"] == 0, res
    assert res["timeouts"] == res["submit_timeouts"] == res["errors"] == 0, res
    assert ring.closed
    # The consumer can still empty the ring; the answers are dropped.
    items = ring.drain()
    assert len(items) == 2
    assert [ring.reply(t, p) for t, p in items] == [False, False]
    with pytest.raises(BrokenPipeError):
        ring.submit(b"late")
    ring.close()  # idempotent


def test_close_wakes_python_waiter_and_keeps_posted_reply():
    ring = Ring(slots=8)
    errs = []

    def waiter():
        try:
            ring.submit_and_wait(b"q", timeout=None)
        except BrokenPipeError as e:
            errs.append(e)

    th = threading.Thread(target=waiter)
    th.start()
    wait_for(lambda: ring.stats()["submitted"] == 1, "the request")
    t_answered = ring.submit(b"answered")
    (t1, _), (t2, _) = ring.drain()
    assert t2 == t_answered and ring.reply(t_answered, b"yes")
    ring.close()
    th.join()
    assert len(errs) == 1
    assert ring.wait_reply(t_answered) == b"yes"  # posted before close: delivered
    assert ring.reply(t1, b"too late") is False


def test_dropping_running_producers_stops_them():
    ring = Ring(slots=4)
    h = _start_producers(ring, 2, 1000, 32, timeout=600)
    wait_for(lambda: ring.stats()["submitted"] >= 2, "producers to start")
    del h  # closes the ring and joins the threads
    assert ring.closed


# -- wake-ups ------------------------------------------------------------------------


def test_eventfd_protocol():
    r = Ring(slots=16)
    fd = r.fileno()
    assert not readable(fd)
    t = r.submit(b"a")
    assert readable(fd)
    r.submit(b"b")  # the consumer was already woken: no second write
    assert r.stats()["wakeups"] == 1
    r.ack()
    assert not readable(fd)
    assert len(r.drain(max=1)) == 1  # max reached: not armed, no write for new requests
    r.submit(b"c")
    assert not readable(fd) and r.stats()["wakeups"] == 1
    assert len(r.drain(max=8)) == 2  # emptied: armed
    assert not readable(fd)
    r.submit(b"d")
    assert readable(fd) and r.stats()["wakeups"] == 2
    r.ack()
    r.ack()  # a second ack on an empty eventfd is harmless
    assert not readable(fd)
    assert len(r.drain()) == 1
    assert r.reply(t, b"")
    assert r.wait_reply(t) == b""


def test_wakeup_after_idle_between_bursts(loop):
    """Consumer sleeps between bursts; each burst must wake it (no lost wake-up)."""
    ring = Ring(slots=64)
    bursts = 40 if BIG else 10
    check = OrderChecker()

    async def main():
        srv = ringserver.attach(loop, ring, check)
        out = []
        for _ in range(bursts):
            await asyncio.sleep(0.005)  # idle: the consumer is armed and sleeping
            check.next.clear()  # thread ids restart at 0 with every burst
            out.append(await finished(_start_producers(ring, 2, 10, 48, timeout=30)))
        srv.close()
        return out

    for res in loop.run_until_complete(main()):
        assert_clean(res, 20)
    assert not check.errors
    assert ring.stats()["wakeups"] >= bursts


def test_wakeup_every_message_with_gaps(loop):
    """Producers pause between messages, so most messages find the consumer asleep."""
    ring = Ring(slots=64)
    n = 300 if BIG else 60
    check = OrderChecker()

    async def main():
        srv = ringserver.attach(loop, ring, check)
        res = await finished(_start_producers(ring, 2, n, 40, gap_us=300, timeout=30))
        srv.close()
        return res

    assert_clean(loop.run_until_complete(main()), 2 * n)
    assert not check.errors
    assert ring.stats()["wakeups"] > 0


# -- ringserver ------------------------------------------------------------------------


def test_ringserver_fails_closed(loop, caplog):
    ring = Ring(slots=16)

    async def slow_ok(p):
        await asyncio.sleep(0.001)
        return bytearray(p + b"!")

    def handler(p):
        if p == b"raise":
            raise RuntimeError("boom")
        if p == b"str":
            return "not bytes"
        if p == b"huge":
            return b"x" * (MAX_MSG + 1)
        if p == b"async-raise":
            async def bad():
                raise KeyError("nope")
            return bad()
        if p == b"async":
            return slow_ok(p)
        return memoryview(p + b"?")

    async def main():
        srv = ringserver.attach(loop, ring, handler, batch=2)
        call = lambda m: loop.run_in_executor(None, ring.submit_and_wait, m, 30)  # noqa: E731
        results = await asyncio.gather(
            *(call(m) for m in (b"raise", b"str", b"huge", b"async-raise", b"async",
                                b"plain")), return_exceptions=True)
        srv.close()
        srv.close()
        return srv, results

    srv, results = loop.run_until_complete(main())
    for r in results[:4]:
        assert isinstance(r, OSError) and r.errno == errno.EIO, r
    assert results[4:] == [b"async!", b"plain?"]
    assert srv.failed == 4 and srv.handled == 6
    assert "answering EIO" in caplog.text


def test_load_message_layout():
    m = _load_message(3, 2**40 + 5, 64)
    assert len(m) == 64 and LOAD_HEADER == 16
    assert struct.unpack_from("<IQI", m) == (3, 2**40 + 5, 64)
    assert m != _load_message(3, 2**40 + 6, 64)


def test_attach_serves_requests_left_unarmed(loop):
    """A previous consumer stopped after a full batch (ring not armed, no eventfd write
    pending): a new attach must still serve the requests already queued."""
    ring = Ring(slots=16)
    tickets = [ring.submit(b"%d" % i) for i in range(3)]
    ring.ack()
    assert len(ring.drain(max=1)) == 1  # full batch: not armed
    assert not readable(ring.fileno())

    async def main():
        srv = ringserver.attach(loop, ring, lambda p: p + b"!")
        got = await asyncio.gather(*(loop.run_in_executor(None, ring.wait_reply, t, 30)
                                     for t in tickets[1:]))
        srv.close()
        return got

    assert loop.run_until_complete(main()) == [b"1!", b"2!"]
    assert ring.cancel(tickets[0])
