"""Request ring: native threads -> asyncio event loop (native: src/_native/ring.pyx + ring_impl.c).

Native producer threads (the FUSE data path) submit TAKA protocol messages and block
for the answer without touching the GIL; the agent's event loop is the single consumer.
Design, slot layout and wake-up protocol: docs/ring.md.

Slot layout
-----------
``slots`` slots of ``slot_size`` bytes (a multiple of 64, default 512)::

    offset size field
         0    8 seq     Vyukov sequence number (atomic)
         8    8 ticket  reply ticket           (first slot of a record)
        16    4 len     message length          (first slot of a record)
        20    4 nslots  slots of this record    (first slot of a record)
        24    - data    slot_size - 24 bytes of the message

A message longer than ``slot_payload`` (= slot_size - 24) occupies
``record_slots(len)`` consecutive slots.  Messages (requests and replies) are at most
``MAX_MSG`` = 8192 bytes and a request must fit in the ring.

Tickets
-------
``submit`` returns a ticket (an int, ``generation << 20 | cell``) naming the request's
reply cell.  A reply is stored only while the request is pending; a reply to a ticket
that timed out, was cancelled or collected is dropped (``reply`` returns ``False``), so
it can never reach the newer request that reuses the cell.  Every submitted ticket MUST
be collected with ``wait_reply`` or ``cancel``-ed (a timeout collects it too).

Wake-ups
--------
``fileno()`` is an eventfd that becomes readable when requests are pending and the
consumer is *armed* (``drain`` returned fewer than ``max`` items).  It is written at
most once per consumer sleep, never per message.  Consumer loop::

    def on_readable():          # loop.add_reader(ring.fileno(), on_readable)
        ring.ack()              # reset the eventfd
        while len(batch := ring.drain(256)) == 256: handle(batch)   # or call_soon
        handle(batch)           # fewer than max: armed, the next submit wakes us

Threads
-------
Producer methods (``submit``, ``wait_reply``, ``submit_and_wait``, ``cancel``) may be
called from any thread; they release the GIL while they wait.  ``ack`` and ``drain``
belong to one consumer thread at a time; ``reply``/``reply_error`` to any thread.
Calling a blocking producer method on the event loop thread that serves the ring
deadlocks until its timeout.

Errors
------
``BlockingIOError`` (ring or reply cells full, non-blocking submit), ``TimeoutError``,
``BrokenPipeError`` (ring closed), ``ValueError`` (message too large, bad argument,
unknown or stale ticket in ``wait_reply``), ``OSError(errno)`` for an error answer
posted with ``reply_error``.
"""

from types import TracebackType
from typing import Final, Literal, TypedDict

from typing_extensions import Buffer

MAX_MSG: Final[int]  # 8192
SLOT_HEADER: Final[int]  # 24
LOAD_HEADER: Final[int]  # 16: u32 thread id, u64 sequence, u32 length (little endian)

class RingStats(TypedDict):
    submitted: int        # requests accepted into the ring
    completed: int        # replies collected by their producer
    timeouts: int         # reply waits that timed out (request abandoned)
    full_rejections: int  # non-blocking submits refused (BlockingIOError)
    full_waits: int       # blocking submits that had to wait for space
    late_replies: int     # replies dropped because the ticket was stale
    cancelled: int        # requests cancelled (cancel(), close())
    drained: int          # requests handed to the consumer
    wakeups: int          # eventfd writes
    max_depth: int        # most slots found occupied at the start of a drain

class Ring:
    slots: Final[int]
    slot_size: Final[int]
    max_inflight: Final[int]

    def __init__(self, slots: int = 1024, slot_size: int = 512,
                 max_inflight: int | None = None) -> None:
        """``slots``: power of two in [2, 2**20]; ``slot_size``: multiple of 64 in
        [64, 16384]; ``max_inflight``: requests submitted and not yet collected, in
        [1, 2**20] (default: ``slots``).  ``ValueError`` otherwise."""
    @property
    def slot_payload(self) -> int:
        """Message bytes per slot (``slot_size - 24``)."""
    @property
    def closed(self) -> bool: ...
    def record_slots(self, length: int) -> int:
        """Slots a message of ``length`` bytes occupies (>= 1)."""
    def fileno(self) -> int:
        """The eventfd; open until the Ring is deallocated (not closed by ``close``)."""
    def _capsule(self) -> object:
        """``PyCapsule`` named ``"takakrypt._ring.tk_ring"`` holding the ``tk_ring *`` for
        native producers; the holder MUST keep this Ring alive while it uses it."""

    # consumer
    def ack(self) -> None:
        """Reset the eventfd; call once per readiness callback, before ``drain``."""
    def drain(self, max: int = 256) -> list[tuple[int, bytes]]:
        """Pop up to ``max`` pending requests as ``(ticket, payload)``, in ring order
        (per producer thread: submission order).  If fewer than ``max`` are returned the
        consumer is armed (the eventfd fires for the next request); otherwise call
        again soon.  Works after ``close`` too."""
    def reply(self, ticket: int, data: Buffer) -> bool:
        """Post the answer (at most ``MAX_MSG`` bytes, else ``ValueError``) and wake the
        producer.  ``False``: the ticket is stale (timed out, cancelled, unknown) and
        the answer was dropped."""
    def reply_error(self, ticket: int, err: int = ...) -> bool:
        """Answer with errno ``err`` (default ``EIO``): the producer's wait raises
        ``OSError(err)`` (native producers get ``-err``).  ``False`` if stale."""
    def close(self) -> None:
        """Idempotent.  Later submits raise ``BrokenPipeError``; producers waiting for
        space or for a reply wake up with ``BrokenPipeError`` (a reply already posted
        is still delivered)."""
    def stats(self) -> RingStats: ...

    # producers
    def submit(self, data: Buffer, timeout: float | None = 0) -> int:
        """Queue a request; return its ticket.  ``timeout=0``: ``BlockingIOError`` when
        full; otherwise wait up to ``timeout`` seconds (``None``: forever, GIL released)
        for space, then ``TimeoutError``."""
    def wait_reply(self, ticket: int, timeout: float | None = None) -> bytes:
        """The answer to ``ticket``.  On ``TimeoutError`` / ``BrokenPipeError`` the
        request is abandoned: a later reply is dropped.  ``ValueError`` for a ticket
        that is unknown or already collected."""
    def submit_and_wait(self, data: Buffer, timeout: float | None = None) -> bytes:
        """``submit`` + ``wait_reply`` sharing one timeout, GIL released throughout."""
    def cancel(self, ticket: int) -> bool:
        """Abandon a submitted request.  ``False`` if the ticket is unknown or stale."""
    def __enter__(self) -> "Ring": ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]: ...

class LoadResult(TypedDict):
    sent: int             # requests submitted
    ok: int               # replies equal to the request (the consumer must echo)
    mismatch: int         # replies that differ from the request
    timeouts: int         # reply waits that timed out
    submit_timeouts: int  # blocking submits that timed out
    errors: int           # other errors (including error answers)
    retries: int          # submits that found the ring full and were retried
    closed: int           # threads stopped by close()
    elapsed_ns: int       # first thread start to last thread end
    latencies: int        # number of latency samples (= replies received)
    min_ns: int
    p50_ns: int
    p90_ns: int
    p99_ns: int
    p999_ns: int
    max_ns: int
    mean_ns: int

class Producers:
    """Native producer threads (tests, benchmarks).  Dropping the handle while the
    threads still run closes the ring to stop them."""
    def done(self) -> bool:
        """True when every thread has finished (does not block)."""
    def join(self) -> LoadResult:
        """Wait for the threads (GIL released) and return the counts; idempotent.
        Calling it on the loop thread that serves the ring blocks the consumer: poll
        ``done()`` from the loop first."""

def _start_producers(ring: Ring, nthreads: int, nmsgs_per_thread: int, payload_size: int, *,
                     window: int = 1, timeout: float | None = 10.0, blocking: bool = True,
                     gap_us: int = 0) -> Producers:
    """Start ``nthreads`` native threads that each send ``nmsgs_per_thread`` messages of
    ``payload_size`` bytes (>= 16, see ``LOAD_HEADER``; ``_load_message`` gives the
    exact bytes) and check that each reply echoes its request, measuring round-trip
    latency in C.  ``window``: requests a thread keeps in flight.  ``blocking``: wait for
    space (``submit`` with ``timeout``) or retry non-blocking submits, counting
    ``retries``.  ``gap_us``: pause before each submit after the first.  ``timeout``
    applies to each submit and each reply wait."""

def _load_message(thread_id: int, seq: int, size: int) -> bytes:
    """The message producer ``thread_id`` sends as number ``seq``."""
