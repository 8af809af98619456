/*
 * ring_impl.h -- Takakrypt request ring: native threads -> agent event loop (no Python).
 *
 * Producers (C threads of the FUSE data path, any number) submit TAKA protocol
 * messages of at most TK_RING_MAX_MSG bytes and block for the answer; one consumer
 * (the asyncio event loop, woken through an eventfd) drains requests in batches and
 * posts replies.  Producers never take the GIL or any lock.
 *
 * Request ring: a bounded Vyukov queue of `nslots` fixed-size slots, each
 *
 *     offset  size  field
 *          0     8  seq      sequence number (atomic): pos = free for position pos,
 *                            pos + 1 = record published, pos + nslots = consumed
 *          8     8  ticket   reply ticket of the request     (head slot only)
 *         16     4  len      message length in bytes          (head slot only)
 *         20     4  nslots   slots used by this record, >= 1  (head slot only)
 *         24     -  data     slot_size - 24 payload bytes
 *
 * A message longer than one slot's payload takes k = ceil(len / (slot_size - 24))
 * consecutive slots (a multi-slot record): the producer claims all k positions with
 * one CAS, fills them, and publishes the head slot last.  The default slot_size of
 * 512 holds 488 bytes inline (typical requests are 100-300 bytes); an 8 KiB message
 * takes 17 slots.
 *
 * Replies: each request owns a reply cell (one of `max_inflight`) from submit until
 * its answer is collected, it times out or it is cancelled.  A ticket is
 * (generation << 20) | cell index; a reply is stored only if the cell is still
 * pending for exactly that generation, so a late reply after a timeout is dropped
 * (tk_ring_reply returns -ENOENT) and never lands in a cell reused by a newer request.
 *
 * Wake-up: the eventfd (tk_ring_fd) becomes readable when the consumer may be
 * sleeping and a request is pending.  It is written at most once per consumer sleep,
 * not per message (protocol in ring_impl.c and docs/ring.md).
 *
 * Errors are negative errno values:
 *   -EAGAIN     ring or reply cells full (non-blocking submit)
 *   -ETIMEDOUT  timeout passed (blocking submit, wait for reply)
 *   -EPIPE      the ring is closed
 *   -EMSGSIZE   message longer than TK_RING_MAX_MSG or than the whole ring;
 *               reply buffer too small (wait_reply: truncated, *len = full length)
 *   -ENOENT     ticket unknown, stale (timed out / cancelled / collected)
 *   -EINVAL     bad argument
 *   -ENOMEM     allocation failed
 *   other       a -errno posted by the consumer with tk_ring_reply_error
 *
 * Thread safety: submit / submit_wait / wait_reply / cancel / call / close / stats
 * may be called from any thread at any time.  drain, ack and reply/reply_error are
 * the consumer's: drain and ack from one thread at a time (single consumer);
 * reply/reply_error from any thread.  tk_ring_free must not race with any other call
 * (every producer must have returned first).
 */
#ifndef TAKAKRYPT_RING_IMPL_H
#define TAKAKRYPT_RING_IMPL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TK_RING_MAX_MSG       8192          /* largest request or reply, bytes */
#define TK_RING_SLOT_HDR      24            /* per-slot header, bytes */
#define TK_RING_MIN_SLOT_SIZE 64            /* slot_size: multiple of 64 in [64, 16384] */
#define TK_RING_MAX_SLOT_SIZE 16384
#define TK_RING_MAX_SLOTS     (1u << 20)    /* nslots: power of two in [2, 2^20] */
#define TK_RING_IDX_BITS      20
#define TK_RING_MAX_INFLIGHT  (1u << TK_RING_IDX_BITS) /* reply cells, [1, 2^20] */

typedef struct tk_ring tk_ring;

typedef struct {
    uint64_t submitted;       /* requests accepted into the ring */
    uint64_t completed;       /* replies collected by their producer */
    uint64_t timeouts;        /* waits for a reply that timed out (request abandoned) */
    uint64_t full_rejections; /* tk_ring_submit calls that returned -EAGAIN */
    uint64_t full_waits;      /* tk_ring_submit_wait calls that had to wait for space */
    uint64_t late_replies;    /* replies dropped: ticket stale (timed out, cancelled) */
    uint64_t cancelled;       /* requests cancelled (tk_ring_cancel, close) */
    uint64_t drained;         /* requests handed to the consumer */
    uint64_t wakeups;         /* eventfd writes (consumer wake-ups) */
    uint64_t max_depth;       /* most slots found occupied at the start of a drain */
} tk_ring_stats;

/*
 * New ring.  nslots: power of two in [2, TK_RING_MAX_SLOTS]; slot_size: multiple of 64
 * in [TK_RING_MIN_SLOT_SIZE, TK_RING_MAX_SLOT_SIZE]; max_inflight: reply cells, i.e.
 * requests submitted and not yet collected, in [1, TK_RING_MAX_INFLIGHT].
 * Returns NULL and sets *err (-EINVAL, -ENOMEM, or eventfd's -errno) on failure.
 */
tk_ring *tk_ring_new(uint32_t nslots, uint32_t slot_size, uint32_t max_inflight, int *err);

/* Close the eventfd and free everything.  NULL is accepted.  See thread safety. */
void tk_ring_free(tk_ring *r);

/* The eventfd (non-blocking, close-on-exec); valid until tk_ring_free. */
int tk_ring_fd(const tk_ring *r);

/* Payload bytes per slot (slot_size - TK_RING_SLOT_HDR). */
size_t tk_ring_slot_payload(const tk_ring *r);

/* Slots a message of `len` bytes takes (>= 1). */
uint32_t tk_ring_record_slots(const tk_ring *r, size_t len);

/*
 * Non-blocking submit.  On success 0 and *ticket identifies the request; the caller
 * MUST then collect it with tk_ring_wait_reply (or tk_ring_cancel it), otherwise its
 * reply cell is never freed.  -EAGAIN when the ring or the reply cells are full.
 */
int tk_ring_submit(tk_ring *r, const void *msg, size_t len, uint64_t *ticket);

/* Like tk_ring_submit, waiting up to timeout_ms (< 0: forever) for space. */
int tk_ring_submit_wait(tk_ring *r, const void *msg, size_t len, uint64_t *ticket,
                        int timeout_ms);

/*
 * Wait up to timeout_ms (< 0: forever, 0: poll) for the reply to `ticket`, copy it to
 * buf[0..cap) and set *len to its full length.  Whatever the result (except -ENOENT /
 * -EINVAL) the ticket is consumed: on -ETIMEDOUT / -EPIPE the request is abandoned and
 * a later reply is dropped.  -EMSGSIZE: cap < reply length, buf holds the first cap
 * bytes.  A reply posted with tk_ring_reply_error returns that -errno (*len = 0).
 */
int tk_ring_wait_reply(tk_ring *r, uint64_t ticket, void *buf, size_t cap, size_t *len,
                       int timeout_ms);

/* Abandon a submitted request (its reply, if any, is discarded).  0 or -ENOENT. */
int tk_ring_cancel(tk_ring *r, uint64_t ticket);

/* submit_wait + wait_reply sharing one timeout. */
int tk_ring_call(tk_ring *r, const void *msg, size_t len, void *buf, size_t cap,
                 size_t *rlen, int timeout_ms);

/*
 * Consumer callback: one request.  `msg` is valid only during the call.  Return 0 to
 * continue, non-zero to stop the drain after this message (it is consumed either way).
 * It may call tk_ring_reply / tk_ring_reply_error, never tk_ring_drain.
 */
typedef int (*tk_ring_cb)(void *ctx, uint64_t ticket, const void *msg, size_t len);

/*
 * Pop up to `max` pending requests, in ring order, calling cb for each.  Returns the
 * number popped.  When the ring is found empty the consumer is *armed* (*armed = 1,
 * if armed is not NULL): the next submit writes the eventfd.  When `max` requests were
 * popped or cb stopped the drain, *armed = 0 and the caller must call again soon
 * (no eventfd write will come for requests already pending).
 */
unsigned tk_ring_drain(tk_ring *r, tk_ring_cb cb, void *ctx, unsigned max, int *armed);

/* Read (reset) the eventfd; call it once per readiness notification, before drain. */
void tk_ring_ack(tk_ring *r);

/*
 * Post the reply to `ticket` (len <= TK_RING_MAX_MSG) and wake its producer.
 * 0, or -ENOENT if the ticket is stale (the reply is dropped), -EMSGSIZE, -ENOMEM.
 */
int tk_ring_reply(tk_ring *r, uint64_t ticket, const void *msg, size_t len);

/* Post an error (err > 0, an errno): the producer's wait returns -err. */
int tk_ring_reply_error(tk_ring *r, uint64_t ticket, int err);

/*
 * Close: every later submit returns -EPIPE; producers blocked in submit_wait or
 * wait_reply wake up with -EPIPE (a reply already posted is still delivered).
 * drain keeps working so the consumer can empty the ring.  Idempotent.
 */
void tk_ring_close(tk_ring *r);
int tk_ring_closed(const tk_ring *r);

void tk_ring_get_stats(const tk_ring *r, tk_ring_stats *out);

/* --------------------------------------------------------------------------------
 * Load generator (tests and benchmarks): producer threads that submit messages
 * carrying (thread id, sequence) and check that each reply echoes its request.
 *
 * Message layout (little endian): u32 thread id, u64 sequence, u32 length, then
 * length - 16 pattern bytes derived from (id, sequence).  payload >= 16.
 */
#define TK_RING_LOAD_HDR 16

typedef struct tk_ring_load tk_ring_load;

typedef struct {
    uint32_t nthreads;
    uint64_t nmsgs;      /* messages per thread */
    size_t payload;      /* bytes per message, [16, TK_RING_MAX_MSG] */
    uint32_t window;     /* requests a thread keeps in flight (>= 1) */
    int timeout_ms;      /* for submit_wait and wait_reply; < 0 forever */
    int blocking;        /* 1: tk_ring_submit_wait; 0: tk_ring_submit + retry on -EAGAIN */
    uint32_t gap_us;     /* pause between two submits of a thread (0: none) */
} tk_ring_load_params;

typedef struct {
    uint64_t sent, ok, mismatch, timeouts, submit_timeouts, errors, retries, closed;
    uint64_t elapsed_ns; /* start of the first thread to end of the last */
    uint64_t lat_n, min_ns, p50_ns, p90_ns, p99_ns, p999_ns, max_ns, mean_ns;
} tk_ring_load_result;

tk_ring_load *tk_ring_load_start(tk_ring *r, const tk_ring_load_params *p, int *err);
int tk_ring_load_done(const tk_ring_load *l);            /* 1 when every thread ended */
void tk_ring_load_join(tk_ring_load *l, tk_ring_load_result *out); /* blocks */
void tk_ring_load_free(tk_ring_load *l);                 /* joins first if needed */

/* Fill msg[0..len) with the message thread `id` sends as number `seq`. */
void tk_ring_load_fill(uint8_t *msg, size_t len, uint32_t id, uint64_t seq);

#ifdef __cplusplus
}
#endif

#endif /* TAKAKRYPT_RING_IMPL_H */
