# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython shim over ring_impl.c; the contract is in src/takakrypt/_ring.pyi."""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport (EAGAIN, ETIMEDOUT, EPIPE, EMSGSIZE, ENOENT, EINVAL, ENOMEM, EIO)
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport strerror


cdef extern from "ring_impl.h" nogil:
    enum:
        TK_RING_MAX_MSG
        TK_RING_SLOT_HDR
        TK_RING_MIN_SLOT_SIZE
        TK_RING_MAX_SLOT_SIZE
        TK_RING_MAX_SLOTS
        TK_RING_MAX_INFLIGHT
        TK_RING_LOAD_HDR
    ctypedef struct tk_ring:
        pass
    ctypedef struct tk_ring_stats:
        uint64_t submitted, completed, timeouts, full_rejections, full_waits
        uint64_t late_replies, cancelled, drained, wakeups, max_depth
    ctypedef struct tk_ring_load:
        pass
    ctypedef struct tk_ring_load_params:
        uint32_t nthreads
        uint64_t nmsgs
        size_t payload
        uint32_t window
        int timeout_ms
        int blocking
        uint32_t gap_us
    ctypedef struct tk_ring_load_result:
        uint64_t sent, ok, mismatch, timeouts, submit_timeouts, errors, retries, closed
        uint64_t elapsed_ns
        uint64_t lat_n, min_ns, p50_ns, p90_ns, p99_ns, p999_ns, max_ns, mean_ns

    tk_ring *tk_ring_new(uint32_t nslots, uint32_t slot_size, uint32_t max_inflight, int *err)
    void tk_ring_free(tk_ring *r)
    int tk_ring_fd(const tk_ring *r)
    size_t tk_ring_slot_payload(const tk_ring *r)
    uint32_t tk_ring_record_slots(const tk_ring *r, size_t len)
    int tk_ring_submit(tk_ring *r, const void *msg, size_t len, uint64_t *ticket)
    int tk_ring_submit_wait(tk_ring *r, const void *msg, size_t len, uint64_t *ticket,
                            int timeout_ms)
    int tk_ring_wait_reply(tk_ring *r, uint64_t ticket, void *buf, size_t cap, size_t *len,
                           int timeout_ms)
    int tk_ring_cancel(tk_ring *r, uint64_t ticket)
    int tk_ring_call(tk_ring *r, const void *msg, size_t len, void *buf, size_t cap,
                     size_t *rlen, int timeout_ms)
    void tk_ring_ack(tk_ring *r)
    int tk_ring_reply(tk_ring *r, uint64_t ticket, const void *msg, size_t len)
    int tk_ring_reply_error(tk_ring *r, uint64_t ticket, int err)
    void tk_ring_close(tk_ring *r)
    int tk_ring_closed(const tk_ring *r)
    void tk_ring_get_stats(const tk_ring *r, tk_ring_stats *out)

    tk_ring_load *tk_ring_load_start(tk_ring *r, const tk_ring_load_params *p, int *err)
    int tk_ring_load_done(const tk_ring_load *l)
    void tk_ring_load_join(tk_ring_load *l, tk_ring_load_result *out)
    void tk_ring_load_free(tk_ring_load *l)

# drain runs with the GIL held and calls back into Python-object code: this part of
# the header is declared without `nogil` so the callback type may touch objects.
cdef extern from "ring_impl.h":
    ctypedef int (*tk_ring_cb)(void *ctx, uint64_t ticket, const void *msg,
                               size_t len) noexcept
    unsigned tk_ring_drain(tk_ring *r, tk_ring_cb cb, void *ctx, unsigned max, int *armed)

MAX_MSG = TK_RING_MAX_MSG
SLOT_HEADER = TK_RING_SLOT_HDR
LOAD_HEADER = TK_RING_LOAD_HDR

_MAX_TIMEOUT_MS = 2**31 - 1


cdef int _timeout_ms(object timeout) except? -2:
    """None -> -1 (forever); seconds (>= 0) -> milliseconds, rounded up."""
    cdef double t
    if timeout is None:
        return -1
    cdef int ms
    t = timeout
    if not t >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    if t * 1000.0 >= _MAX_TIMEOUT_MS:
        return -1
    ms = <int>(t * 1000.0)
    if ms < t * 1000.0:
        ms += 1
    return ms


cdef object _raise(int rc, str what):
    """Map a negative errno from the C core to the Python exception (never returns)."""
    cdef int e = -rc
    if e == EAGAIN:
        raise BlockingIOError(e, f"{what}: ring full")
    if e == ETIMEDOUT:
        raise TimeoutError(e, f"{what}: timed out")
    if e == EPIPE:
        raise BrokenPipeError(e, f"{what}: ring closed")
    if e == EMSGSIZE:
        raise ValueError(f"{what}: message too large for this ring "
                         f"(at most {TK_RING_MAX_MSG} bytes, and no more than the ring holds)")
    if e == ENOENT:
        raise ValueError(f"{what}: unknown, stale or already collected ticket")
    if e == EINVAL:
        raise ValueError(f"{what}: invalid argument")
    if e == ENOMEM:
        raise MemoryError()
    raise OSError(e, f"{what}: {strerror(e).decode()}")


cdef uint64_t _ticket(object ticket) except? 0:
    try:
        return ticket
    except OverflowError:
        raise ValueError(f"ticket out of range: {ticket!r}") from None


cdef int _acquire(object obj, Py_buffer *view, str name) except -1:
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(obj).__name__}") from None
    except (BufferError, ValueError) as e:
        raise ValueError(f"{name} must be a C-contiguous buffer ({e})") from None
    return 0


cdef struct _drain_ctx:
    void *out        # borrowed list
    tk_ring *ring
    int failed       # 1: a bytes allocation failed (the request got ENOMEM)


cdef int _on_request(void *ctx, uint64_t ticket, const void *msg, size_t n) noexcept:
    cdef _drain_ctx *d = <_drain_ctx *>ctx
    try:
        (<list>d.out).append((ticket, PyBytes_FromStringAndSize(<const char *>msg, n)))
    except BaseException:
        # Never lose a request silently: fail it closed, then stop draining.
        tk_ring_reply_error(d.ring, ticket, ENOMEM)
        d.failed = 1
        return 1
    return 0


@cython.auto_pickle(False)
@cython.final
cdef class Ring:
    """Request ring between native producer threads and the event loop; see _ring.pyi."""

    # SAFETY: _r is created in __cinit__ and freed only in __dealloc__.  Every method
    # holds a reference to self while it runs (including nogil sections), and native
    # producer threads started here keep a reference through their Producers handle,
    # so no thread can be inside the ring when it is freed.
    cdef tk_ring *_r
    cdef readonly Py_ssize_t slots
    cdef readonly Py_ssize_t slot_size
    cdef readonly Py_ssize_t max_inflight

    def __cinit__(self, slots=1024, slot_size=512, max_inflight=None):
        cdef int err = 0
        self._r = NULL
        if max_inflight is None:
            max_inflight = slots
        for name, v, lo, hi in (("slots", slots, 2, TK_RING_MAX_SLOTS),
                                ("slot_size", slot_size, TK_RING_MIN_SLOT_SIZE,
                                 TK_RING_MAX_SLOT_SIZE),
                                ("max_inflight", max_inflight, 1, TK_RING_MAX_INFLIGHT)):
            if type(v) is not int or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
        if slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        if slot_size % 64:
            raise ValueError(f"slot_size must be a multiple of 64, got {slot_size}")
        self._r = tk_ring_new(<uint32_t>slots, <uint32_t>slot_size, <uint32_t>max_inflight,
                              &err)
        if self._r == NULL:
            _raise(err, "Ring")
        self.slots = slots
        self.slot_size = slot_size
        self.max_inflight = max_inflight

    def __dealloc__(self):
        if self._r != NULL:
            tk_ring_close(self._r)
            tk_ring_free(self._r)
            self._r = NULL

    def __repr__(self):
        state = " closed" if tk_ring_closed(self._r) else ""
        return (f"<Ring slots={self.slots} slot_size={self.slot_size} "
                f"max_inflight={self.max_inflight}{state}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def slot_payload(self):
        return tk_ring_slot_payload(self._r)

    @property
    def closed(self):
        return bool(tk_ring_closed(self._r))

    def record_slots(self, Py_ssize_t length):
        """Slots a message of `length` bytes occupies."""
        if length < 0:
            raise ValueError("length must be >= 0")
        return tk_ring_record_slots(self._r, <size_t>length)

    def fileno(self):
        return tk_ring_fd(self._r)

    def _capsule(self):
        return PyCapsule_New(<void *>self._r, b"takakrypt._ring.tk_ring", NULL)

    # -- consumer ---------------------------------------------------------------------

    def ack(self):
        """Reset the eventfd; once per readiness callback, before drain()."""
        tk_ring_ack(self._r)

    def drain(self, Py_ssize_t max=256):
        """Pop up to `max` requests as [(ticket, payload)]; armed if fewer than max."""
        cdef list out = []
        cdef _drain_ctx d
        if max < 1 or max > 1 << 30:
            raise ValueError(f"max must be in [1, 2**30], got {max}")
        d.out = <void *>out
        d.ring = self._r
        d.failed = 0
        tk_ring_drain(self._r, _on_request, &d, <unsigned>max, NULL)
        if d.failed:
            raise MemoryError("drain: could not copy a request (it was failed with ENOMEM)")
        return out

    def reply(self, ticket, data):
        """Post the answer; False if the ticket is stale (the reply was dropped)."""
        cdef Py_buffer b
        cdef uint64_t t = _ticket(ticket)
        cdef int rc
        if type(data) is bytes:
            rc = tk_ring_reply(self._r, t, PyBytes_AS_STRING(data),
                               <size_t>PyBytes_GET_SIZE(data))
        else:
            _acquire(data, &b, "data")
            try:
                rc = tk_ring_reply(self._r, t, b.buf, <size_t>b.len)
            finally:
                PyBuffer_Release(&b)
        if rc == 0:
            return True
        if rc == -ENOENT:
            return False
        _raise(rc, "reply")

    def reply_error(self, ticket, int err=EIO):
        """Fail the request with errno `err`; False if the ticket is stale."""
        cdef int rc
        if err <= 0:
            raise ValueError(f"err must be a positive errno, got {err}")
        rc = tk_ring_reply_error(self._r, _ticket(ticket), err)
        if rc == 0:
            return True
        if rc == -ENOENT:
            return False
        _raise(rc, "reply_error")

    def close(self):
        """Reject new requests and wake every waiting producer with BrokenPipeError."""
        tk_ring_close(self._r)

    def stats(self):
        cdef tk_ring_stats s
        tk_ring_get_stats(self._r, &s)
        return {"submitted": s.submitted, "completed": s.completed, "timeouts": s.timeouts,
                "full_rejections": s.full_rejections, "full_waits": s.full_waits,
                "late_replies": s.late_replies, "cancelled": s.cancelled,
                "drained": s.drained, "wakeups": s.wakeups, "max_depth": s.max_depth}

    # -- producer (Python threads) ------------------------------------------------------

    def submit(self, data, timeout=0):
        """Queue a request, return its ticket.  timeout=0: never wait for space."""
        cdef Py_buffer b
        cdef uint64_t ticket = 0
        cdef int rc, ms = _timeout_ms(timeout)
        cdef tk_ring *r = self._r
        _acquire(data, &b, "data")
        try:
            if ms == 0:
                rc = tk_ring_submit(r, b.buf, <size_t>b.len, &ticket)
            else:
                # SAFETY: the buffer stays exported (pinned) until the release below.
                with nogil:
                    rc = tk_ring_submit_wait(r, b.buf, <size_t>b.len, &ticket, ms)
        finally:
            PyBuffer_Release(&b)
        if rc != 0:
            _raise(rc, "submit")
        return ticket

    def wait_reply(self, ticket, timeout=None):
        """Wait for the answer to `ticket` (GIL released while waiting)."""
        cdef uint64_t t = _ticket(ticket)
        cdef int rc, ms = _timeout_ms(timeout)
        cdef size_t n = 0
        cdef tk_ring *r = self._r
        cdef char buf[TK_RING_MAX_MSG]
        # SAFETY: buf is this call's stack, private to this thread.
        with nogil:
            rc = tk_ring_wait_reply(r, t, buf, TK_RING_MAX_MSG, &n, ms)
        if rc != 0:
            _raise(rc, "wait_reply")
        return PyBytes_FromStringAndSize(buf, <Py_ssize_t>n)

    def submit_and_wait(self, data, timeout=None):
        """submit + wait_reply under one timeout, GIL released throughout."""
        cdef Py_buffer b
        cdef int rc, ms = _timeout_ms(timeout)
        cdef size_t n = 0
        cdef tk_ring *r = self._r
        cdef char buf[TK_RING_MAX_MSG]
        _acquire(data, &b, "data")
        try:
            # SAFETY: b stays exported (pinned) until the release; buf is our stack.
            with nogil:
                rc = tk_ring_call(r, b.buf, <size_t>b.len, buf, TK_RING_MAX_MSG, &n, ms)
        finally:
            PyBuffer_Release(&b)
        if rc != 0:
            _raise(rc, "submit_and_wait")
        return PyBytes_FromStringAndSize(buf, <Py_ssize_t>n)

    def cancel(self, ticket):
        """Abandon a submitted request; False if the ticket is unknown or stale."""
        return tk_ring_cancel(self._r, _ticket(ticket)) == 0


@cython.auto_pickle(False)
@cython.final
cdef class Producers:
    """Native producer threads started by _start_producers(); see _ring.pyi."""

    # SAFETY: the threads use _ring's tk_ring; the reference below keeps it alive until
    # tk_ring_load_free (in join or __dealloc__) has joined every thread.
    cdef tk_ring_load *_l
    cdef Ring _ring
    cdef object _result

    def __dealloc__(self):
        if self._l != NULL:
            if not tk_ring_load_done(self._l) and self._ring is not None:
                # Dropped while running: stop the threads instead of hanging in free.
                tk_ring_close(self._ring._r)
            with nogil:
                tk_ring_load_free(self._l)
            self._l = NULL

    def done(self):
        return self._l == NULL or bool(tk_ring_load_done(self._l))

    def join(self):
        cdef tk_ring_load_result o
        if self._result is not None:
            return dict(self._result)
        with nogil:
            tk_ring_load_join(self._l, &o)
            tk_ring_load_free(self._l)
        self._l = NULL
        self._result = {
            "sent": o.sent, "ok": o.ok, "mismatch": o.mismatch, "timeouts": o.timeouts,
            "submit_timeouts": o.submit_timeouts, "errors": o.errors, "retries": o.retries,
            "closed": o.closed, "elapsed_ns": o.elapsed_ns, "latencies": o.lat_n,
            "min_ns": o.min_ns, "p50_ns": o.p50_ns, "p90_ns": o.p90_ns, "p99_ns": o.p99_ns,
            "p999_ns": o.p999_ns, "max_ns": o.max_ns, "mean_ns": o.mean_ns,
        }
        return dict(self._result)


def _start_producers(Ring ring not None, int nthreads, nmsgs_per_thread, Py_ssize_t payload_size,
                     *, int window=1, timeout=10.0, bint blocking=True, int gap_us=0):
    """Start `nthreads` native producer threads (no GIL); see _ring.pyi."""
    cdef tk_ring_load_params p
    cdef int err = 0
    cdef Producers h
    if not 1 <= nthreads <= 1024:
        raise ValueError(f"nthreads must be in [1, 1024], got {nthreads}")
    if not TK_RING_LOAD_HDR <= payload_size <= TK_RING_MAX_MSG:
        raise ValueError(f"payload_size must be in [{TK_RING_LOAD_HDR}, {TK_RING_MAX_MSG}]")
    if not 0 <= nmsgs_per_thread <= 1 << 32:
        raise ValueError("nmsgs_per_thread must be in [0, 2**32]")
    if window < 1 or not 0 <= gap_us < 1000000:
        raise ValueError("window must be >= 1 and gap_us in [0, 1e6)")
    p.nthreads = <uint32_t>nthreads
    p.nmsgs = <uint64_t>nmsgs_per_thread
    p.payload = <size_t>payload_size
    p.window = <uint32_t>window
    p.timeout_ms = _timeout_ms(timeout)
    p.blocking = 1 if blocking else 0
    p.gap_us = <uint32_t>gap_us
    h = Producers.__new__(Producers)
    h._ring = ring
    h._l = tk_ring_load_start(ring._r, &p, &err)
    if h._l == NULL:
        _raise(err, "_start_producers")
    return h


def _load_message(int thread_id, uint64_t seq, Py_ssize_t size):
    """The message producer `thread_id` sends as number `seq` (for consumer checks)."""
    cdef bytes b
    if not TK_RING_LOAD_HDR <= size <= TK_RING_MAX_MSG:
        raise ValueError("size out of range")
    b = PyBytes_FromStringAndSize(NULL, size)
    _fill(<uint8_t *>PyBytes_AS_STRING(b), <size_t>size, <uint32_t>thread_id, seq)
    return b


cdef extern from "ring_impl.h" nogil:
    void _fill "tk_ring_load_fill"(uint8_t *msg, size_t len, uint32_t id, uint64_t seq)
