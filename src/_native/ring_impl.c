/*
 * ring_impl.c -- Takakrypt request ring.  Contract and slot layout: ring_impl.h.
 *
 * Three lock-free structures, all C11 atomics:
 *
 *   request ring  Vyukov bounded queue, many producers / one consumer, records of
 *                 1..k slots claimed with one CAS on enq_pos.
 *   reply cells   one per in-flight request; a 64-bit state word (generation << 3 |
 *                 state) is the only gate for writing a reply, so a stale ticket can
 *                 never write into a reused cell.  Producers sleep on a per-cell
 *                 32-bit futex word.
 *   free list     a Vyukov MPMC queue of free cell indices.
 *
 * Sleep/wake pairs (consumer eventfd, producers waiting for space, producers waiting
 * for a reply) all follow the same Dekker pattern: the sleeper announces itself, a
 * seq_cst fence, re-checks the condition; the waker makes the condition true, a
 * seq_cst fence, looks for an announced sleeper.  One of the two always sees the
 * other, so no wake-up is lost, and the waker pays a syscall only when someone
 * announced (the eventfd: at most once per consumer sleep).
 */
#define _GNU_SOURCE 1

#include "ring_impl.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CACHELINE 64
#define IDX_MASK ((UINT64_C(1) << TK_RING_IDX_BITS) - 1)
#define GEN_MASK ((UINT64_C(1) << (64 - TK_RING_IDX_BITS)) - 1)

/* reply cell states: low 3 bits of tk_cell.state, the generation above them */
enum { C_FREE = 0, C_PENDING = 1, C_FILLING = 2, C_DONE = 3, C_TAKING = 4 };
#define CST(gen, s) (((uint64_t)(gen) << 3) | (uint64_t)(s))

/* consumer state */
enum { CS_AWAKE = 0, CS_ARMED = 1 };

struct tk_slot {
    _Atomic uint64_t seq;
    uint64_t ticket;
    uint32_t len;
    uint32_t nslots;
    uint8_t data[];
};

struct tk_cell {
    _Atomic uint64_t state;   /* CST(generation, C_*) */
    _Atomic uint32_t wseq;    /* futex word, bumped when a sleeping producer must look */
    _Atomic uint32_t waiters; /* producers sleeping (or about to) on wseq */
    uint32_t len;             /* reply length (C_DONE) */
    int32_t status;           /* 0 or -errno (C_DONE) */
    uint8_t *heap;            /* reply longer than the inline area, malloc'd by the replier */
    uint8_t data[];           /* inline reply area, cell_inline bytes */
};

struct fl_ent {
    _Atomic uint64_t seq;
    uint32_t val;
};

struct tk_ring {
    /* read-only after tk_ring_new */
    uint32_t nslots, mask;
    size_t slot_size, slot_payload;
    uint8_t *slots;
    uint32_t ncells;
    size_t cell_stride, cell_inline;
    uint8_t *cells;
    uint64_t fl_mask;
    struct fl_ent *fl;
    int efd;

    _Alignas(CACHELINE) _Atomic uint64_t enq_pos; /* producers */
    _Alignas(CACHELINE) _Atomic uint64_t fl_enq;  /* free list */
    _Alignas(CACHELINE) _Atomic uint64_t fl_deq;

    /* SAFETY: deq_pos and scratch are touched only by the (single) consumer thread. */
    _Alignas(CACHELINE) uint64_t deq_pos;
    uint8_t *scratch; /* TK_RING_MAX_MSG bytes to gather multi-slot records */

    /* read by every producer on every submit, written once per consumer sleep */
    _Alignas(CACHELINE) _Atomic uint32_t cstate;
    _Atomic int closed;

    _Alignas(CACHELINE) _Atomic uint32_t space_seq; /* futex: space freed / closed */
    _Atomic uint32_t space_waiters;

    _Alignas(CACHELINE) _Atomic uint64_t st_submitted, st_completed, st_timeouts,
        st_full_rejections, st_full_waits, st_late, st_cancelled, st_drained, st_wakeups,
        st_max_depth;
};

#define RLX memory_order_relaxed
#define ACQ memory_order_acquire
#define REL memory_order_release

static inline void stat_inc(_Atomic uint64_t *c)
{
    atomic_fetch_add_explicit(c, 1, RLX);
}

/* ------------------------------------------------------------------------- */
/* time and futex                                                             */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Absolute CLOCK_MONOTONIC deadline in ns; 0 = none (timeout_ms < 0). */
static uint64_t deadline_after(int timeout_ms)
{
    if (timeout_ms < 0)
        return 0;
    return now_ns() + (uint64_t)timeout_ms * 1000000u;
}

static int expired(uint64_t deadline)
{
    return deadline != 0 && now_ns() >= deadline;
}

/* Sleep while *addr == val, until woken or the absolute deadline (0 = none). */
static void futex_wait(_Atomic uint32_t *addr, uint32_t val, uint64_t deadline)
{
    struct timespec ts, *tsp = NULL;
    if (deadline != 0) {
        ts.tv_sec = (time_t)(deadline / 1000000000u);
        ts.tv_nsec = (long)(deadline % 1000000000u);
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC timeout, so retries after
     * EINTR or spurious wake-ups never stretch the caller's timeout. */
    syscall(SYS_futex, (void *)addr, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, val, tsp,
            NULL, FUTEX_BITSET_MATCH_ANY);
}

static void futex_wake_all(_Atomic uint32_t *addr)
{
    syscall(SYS_futex, (void *)addr, FUTEX_WAKE | FUTEX_PRIVATE_FLAG, INT_MAX, NULL, NULL, 0);
}

/* ------------------------------------------------------------------------- */
/* layout helpers                                                             */

static inline struct tk_slot *slot_at(const tk_ring *r, uint64_t pos)
{
    return (struct tk_slot *)(r->slots + (size_t)(pos & r->mask) * r->slot_size);
}

static inline struct tk_cell *cell_at(const tk_ring *r, uint32_t idx)
{
    return (struct tk_cell *)(r->cells + (size_t)idx * r->cell_stride);
}

static inline uint64_t cell_gen(uint64_t state)
{
    return (state >> 3) & GEN_MASK;
}

static inline size_t round_up(size_t n, size_t a)
{
    return (n + a - 1) / a * a;
}

uint32_t tk_ring_record_slots(const tk_ring *r, size_t len)
{
    if (len <= r->slot_payload)
        return 1;
    return (uint32_t)((len + r->slot_payload - 1) / r->slot_payload);
}

size_t tk_ring_slot_payload(const tk_ring *r)
{
    return r->slot_payload;
}

int tk_ring_fd(const tk_ring *r)
{
    return r->efd;
}

/* ------------------------------------------------------------------------- */
/* free list of reply cells (Vyukov MPMC queue of indices; never overflows:   */
/* it holds at most ncells entries and has >= ncells places)                  */

static void fl_push(tk_ring *r, uint32_t idx)
{
    uint64_t pos = atomic_load_explicit(&r->fl_enq, RLX);
    struct fl_ent *e;
    for (;;) {
        e = &r->fl[pos & r->fl_mask];
        uint64_t seq = atomic_load_explicit(&e->seq, ACQ);
        int64_t dif = (int64_t)(seq - pos);
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&r->fl_enq, &pos, pos + 1, RLX, RLX))
                break;
        } else if (dif < 0) {
            /* Impossible: more pushes than cells.  Spin rather than lose the cell. */
            sched_yield();
            pos = atomic_load_explicit(&r->fl_enq, RLX);
        } else {
            pos = atomic_load_explicit(&r->fl_enq, RLX);
        }
    }
    /* SAFETY: e->val is written only between winning position pos and publishing it. */
    e->val = idx;
    atomic_store_explicit(&e->seq, pos + 1, REL);
}

static int fl_pop(tk_ring *r, uint32_t *idx)
{
    uint64_t pos = atomic_load_explicit(&r->fl_deq, RLX);
    struct fl_ent *e;
    for (;;) {
        e = &r->fl[pos & r->fl_mask];
        uint64_t seq = atomic_load_explicit(&e->seq, ACQ);
        int64_t dif = (int64_t)(seq - (pos + 1));
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&r->fl_deq, &pos, pos + 1, RLX, RLX))
                break;
        } else if (dif < 0) {
            return 0; /* empty */
        } else {
            pos = atomic_load_explicit(&r->fl_deq, RLX);
        }
    }
    *idx = e->val;
    atomic_store_explicit(&e->seq, pos + r->fl_mask + 1, REL);
    return 1;
}

/* ------------------------------------------------------------------------- */
/* creation                                                                   */

tk_ring *tk_ring_new(uint32_t nslots, uint32_t slot_size, uint32_t max_inflight, int *err)
{
    tk_ring *r = NULL;
    void *p;
    int e = -ENOMEM;

    if (nslots < 2 || nslots > TK_RING_MAX_SLOTS || (nslots & (nslots - 1)) != 0 ||
        slot_size < TK_RING_MIN_SLOT_SIZE || slot_size > TK_RING_MAX_SLOT_SIZE ||
        slot_size % CACHELINE != 0 || max_inflight < 1 ||
        max_inflight > TK_RING_MAX_INFLIGHT) {
        e = -EINVAL;
        goto fail;
    }
    if (posix_memalign(&p, CACHELINE, sizeof(*r)) != 0)
        goto fail;
    r = p;
    memset(r, 0, sizeof(*r));
    r->efd = -1;
    r->nslots = nslots;
    r->mask = nslots - 1;
    r->slot_size = slot_size;
    r->slot_payload = slot_size - TK_RING_SLOT_HDR;
    r->ncells = max_inflight;
    /* Replies as long as one slot's payload stay inline; the stride's padding too. */
    r->cell_stride = round_up(sizeof(struct tk_cell) + r->slot_payload, CACHELINE);
    r->cell_inline = r->cell_stride - sizeof(struct tk_cell);

    if (posix_memalign(&p, CACHELINE, (size_t)nslots * slot_size) != 0)
        goto fail;
    r->slots = p;
    memset(r->slots, 0, (size_t)nslots * slot_size);
    for (uint32_t i = 0; i < nslots; i++)
        atomic_init(&slot_at(r, i)->seq, i);

    if (posix_memalign(&p, CACHELINE, (size_t)max_inflight * r->cell_stride) != 0)
        goto fail;
    r->cells = p;
    memset(r->cells, 0, (size_t)max_inflight * r->cell_stride);
    for (uint32_t i = 0; i < max_inflight; i++) {
        struct tk_cell *c = cell_at(r, i);
        atomic_init(&c->state, CST(0, C_FREE));
        atomic_init(&c->wseq, 0);
        atomic_init(&c->waiters, 0);
    }

    uint64_t flcap = 1;
    while (flcap < max_inflight)
        flcap <<= 1;
    r->fl_mask = flcap - 1;
    r->fl = calloc(flcap, sizeof(*r->fl));
    if (r->fl == NULL)
        goto fail;
    for (uint64_t i = 0; i < flcap; i++)
        atomic_init(&r->fl[i].seq, i);
    atomic_init(&r->fl_enq, 0);
    atomic_init(&r->fl_deq, 0);
    for (uint32_t i = 0; i < max_inflight; i++)
        fl_push(r, i);

    r->scratch = malloc(TK_RING_MAX_MSG);
    if (r->scratch == NULL)
        goto fail;

    atomic_init(&r->enq_pos, 0);
    r->deq_pos = 0;
    /* Armed from the start: the first request wakes a consumer that never drained. */
    atomic_init(&r->cstate, CS_ARMED);
    atomic_init(&r->closed, 0);
    atomic_init(&r->space_seq, 0);
    atomic_init(&r->space_waiters, 0);

    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->efd < 0) {
        e = -errno;
        goto fail;
    }
    return r;

fail:
    tk_ring_free(r);
    if (err != NULL)
        *err = e;
    return NULL;
}

void tk_ring_free(tk_ring *r)
{
    if (r == NULL)
        return;
    if (r->efd >= 0)
        close(r->efd);
    if (r->cells != NULL)
        for (uint32_t i = 0; i < r->ncells; i++)
            free(cell_at(r, i)->heap);
    free(r->cells);
    free(r->slots);
    free(r->fl);
    free(r->scratch);
    free(r);
}

/* ------------------------------------------------------------------------- */
/* producers                                                                  */

/* Someone may sleep in submit_wait: tell them space was freed (or the ring closed). */
static void wake_space(tk_ring *r)
{
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&r->space_waiters, RLX) != 0) {
        atomic_fetch_add(&r->space_seq, 1);
        futex_wake_all(&r->space_seq);
    }
}

static void release_cell(tk_ring *r, uint32_t idx, uint64_t gen)
{
    struct tk_cell *c = cell_at(r, idx);
    atomic_store_explicit(&c->state, CST(gen, C_FREE), REL);
    fl_push(r, idx);
    wake_space(r);
}

static int try_submit(tk_ring *r, const void *msg, size_t len, uint64_t *ticket)
{
    uint32_t k, idx;
    uint64_t pos, gen;
    struct tk_cell *c;

    if (len > TK_RING_MAX_MSG || (msg == NULL && len != 0) || ticket == NULL)
        return len > TK_RING_MAX_MSG ? -EMSGSIZE : -EINVAL;
    k = tk_ring_record_slots(r, len);
    if (k > r->nslots)
        return -EMSGSIZE;
    if (atomic_load_explicit(&r->closed, ACQ))
        return -EPIPE;

    if (!fl_pop(r, &idx))
        return -EAGAIN;
    c = cell_at(r, idx);
    /* The pop synchronises with the push that followed the cell's last release. */
    gen = (cell_gen(atomic_load_explicit(&c->state, RLX)) + 1) & GEN_MASK;

    pos = atomic_load_explicit(&r->enq_pos, RLX);
    for (;;) {
        /*
         * The consumer frees slots strictly in position order, so if the record's
         * last slot is free for its position, all k slots are.
         */
        uint64_t last = pos + k - 1;
        uint64_t seq = atomic_load_explicit(&slot_at(r, last)->seq, ACQ);
        int64_t dif = (int64_t)(seq - last);
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&r->enq_pos, &pos, pos + k, RLX, RLX))
                break;
        } else if (dif < 0) {
            release_cell(r, idx, cell_gen(atomic_load_explicit(&c->state, RLX)));
            return -EAGAIN; /* full */
        } else {
            pos = atomic_load_explicit(&r->enq_pos, RLX);
        }
    }

    /* Visible to the replier through the slot's release/acquire below. */
    atomic_store_explicit(&c->state, CST(gen, C_PENDING), RLX);
    *ticket = (gen << TK_RING_IDX_BITS) | idx;

    /*
     * SAFETY: positions pos..pos+k-1 belong to this thread alone from the CAS until
     * the head's seq is published (release); the consumer reads them only after
     * acquiring seq == pos + 1 and rewrites nothing; it hands them back with
     * seq = position + nslots once it is done (after the callback returned).
     */
    struct tk_slot *h = slot_at(r, pos);
    h->ticket = *ticket;
    h->len = (uint32_t)len;
    h->nslots = k;
    const uint8_t *src = msg;
    size_t left = len;
    for (uint32_t i = 0; i < k && left > 0; i++) {
        size_t n = left < r->slot_payload ? left : r->slot_payload;
        memcpy(slot_at(r, pos + i)->data, src, n);
        src += n;
        left -= n;
    }
    atomic_store_explicit(&h->seq, pos + 1, REL);
    stat_inc(&r->st_submitted);

    /*
     * Wake-up protocol, producer half: publish; fence; if the consumer is armed (may
     * sleep), the one producer that disarms it writes the eventfd.  The consumer half
     * (tk_ring_drain) is: arm; fence; re-check the head slot.  With the two seq_cst
     * fences either we see ARMED or the consumer sees our record.
     */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&r->cstate, RLX) == CS_ARMED) {
        uint32_t exp = CS_ARMED;
        if (atomic_compare_exchange_strong(&r->cstate, &exp, CS_AWAKE)) {
            uint64_t one = 1;
            ssize_t w;
            do
                w = write(r->efd, &one, sizeof(one));
            while (w < 0 && errno == EINTR);
            stat_inc(&r->st_wakeups);
        }
    }
    return 0;
}

int tk_ring_submit(tk_ring *r, const void *msg, size_t len, uint64_t *ticket)
{
    int rc = try_submit(r, msg, len, ticket);
    if (rc == -EAGAIN)
        stat_inc(&r->st_full_rejections);
    return rc;
}

static int submit_until(tk_ring *r, const void *msg, size_t len, uint64_t *ticket,
                        uint64_t deadline)
{
    int rc = try_submit(r, msg, len, ticket);
    if (rc != -EAGAIN)
        return rc;
    stat_inc(&r->st_full_waits);
    for (;;) {
        if (expired(deadline))
            return -ETIMEDOUT;
        /* Sleeper half of the space protocol (waker: wake_space). */
        atomic_fetch_add(&r->space_waiters, 1);
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t w = atomic_load(&r->space_seq);
        rc = try_submit(r, msg, len, ticket);
        if (rc == -EAGAIN)
            futex_wait(&r->space_seq, w, deadline);
        atomic_fetch_sub(&r->space_waiters, 1);
        if (rc != -EAGAIN)
            return rc;
    }
}

int tk_ring_submit_wait(tk_ring *r, const void *msg, size_t len, uint64_t *ticket,
                        int timeout_ms)
{
    return submit_until(r, msg, len, ticket, deadline_after(timeout_ms));
}

static int ticket_cell(const tk_ring *r, uint64_t ticket, uint32_t *idx, uint64_t *gen)
{
    *idx = (uint32_t)(ticket & IDX_MASK);
    *gen = (ticket >> TK_RING_IDX_BITS) & GEN_MASK;
    return *idx < r->ncells ? 0 : -ENOENT;
}

/* Take the posted reply out of a cell we moved to C_TAKING, then free the cell. */
static int collect(tk_ring *r, uint32_t idx, uint64_t gen, void *buf, size_t cap,
                   size_t *len)
{
    struct tk_cell *c = cell_at(r, idx);
    int rc = c->status;
    size_t n = c->len;
    if (rc == 0) {
        const uint8_t *src = c->heap != NULL ? c->heap : c->data;
        size_t m = n < cap ? n : cap;
        if (m > 0)
            memcpy(buf, src, m);
        if (n > cap)
            rc = -EMSGSIZE;
    } else {
        n = 0;
    }
    if (len != NULL)
        *len = n;
    free(c->heap);
    c->heap = NULL;
    release_cell(r, idx, gen);
    return rc;
}

static int wait_until(tk_ring *r, uint64_t ticket, void *buf, size_t cap, size_t *len,
                      uint64_t deadline, int poll)
{
    uint32_t idx;
    uint64_t gen;
    if (ticket_cell(r, ticket, &idx, &gen) != 0)
        return -ENOENT;
    if (buf == NULL && cap != 0)
        return -EINVAL;
    struct tk_cell *c = cell_at(r, idx);

    for (;;) {
        uint64_t st = atomic_load_explicit(&c->state, ACQ);
        if (st == CST(gen, C_DONE)) {
            if (atomic_compare_exchange_strong(&c->state, &st, CST(gen, C_TAKING))) {
                stat_inc(&r->st_completed);
                return collect(r, idx, gen, buf, cap, len);
            }
            continue;
        }
        if (st == CST(gen, C_FILLING)) {
            sched_yield(); /* a replier is copying the answer: a memcpy away */
            continue;
        }
        if (st != CST(gen, C_PENDING))
            return -ENOENT; /* not ours: already collected, cancelled or bogus */

        int closed = atomic_load(&r->closed);
        if (closed || poll || expired(deadline)) {
            /* Abandon: from now on a reply for this generation is dropped. */
            if (!atomic_compare_exchange_strong(&c->state, &st, CST(gen, C_FREE)))
                continue; /* the reply is arriving: take it */
            release_cell(r, idx, gen);
            if (closed) {
                stat_inc(&r->st_cancelled);
                return -EPIPE;
            }
            stat_inc(&r->st_timeouts);
            return -ETIMEDOUT;
        }

        /* Sleeper half of the reply protocol (waker: post_reply, tk_ring_close). */
        atomic_fetch_add(&c->waiters, 1);
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t w = atomic_load(&c->wseq);
        if (atomic_load(&c->state) == st && !atomic_load(&r->closed))
            futex_wait(&c->wseq, w, deadline);
        atomic_fetch_sub(&c->waiters, 1);
    }
}

int tk_ring_wait_reply(tk_ring *r, uint64_t ticket, void *buf, size_t cap, size_t *len,
                       int timeout_ms)
{
    return wait_until(r, ticket, buf, cap, len, deadline_after(timeout_ms), timeout_ms == 0);
}

int tk_ring_cancel(tk_ring *r, uint64_t ticket)
{
    uint32_t idx;
    uint64_t gen;
    if (ticket_cell(r, ticket, &idx, &gen) != 0)
        return -ENOENT;
    struct tk_cell *c = cell_at(r, idx);
    for (;;) {
        uint64_t st = atomic_load_explicit(&c->state, ACQ);
        if (st == CST(gen, C_PENDING)) {
            if (atomic_compare_exchange_strong(&c->state, &st, CST(gen, C_FREE))) {
                release_cell(r, idx, gen);
                break;
            }
        } else if (st == CST(gen, C_DONE)) {
            if (atomic_compare_exchange_strong(&c->state, &st, CST(gen, C_TAKING))) {
                collect(r, idx, gen, NULL, 0, NULL);
                break;
            }
        } else if (st == CST(gen, C_FILLING)) {
            sched_yield();
        } else {
            return -ENOENT;
        }
    }
    stat_inc(&r->st_cancelled);
    return 0;
}

int tk_ring_call(tk_ring *r, const void *msg, size_t len, void *buf, size_t cap,
                 size_t *rlen, int timeout_ms)
{
    uint64_t deadline = deadline_after(timeout_ms), ticket;
    int rc = submit_until(r, msg, len, &ticket, deadline);
    if (rc != 0)
        return rc;
    return wait_until(r, ticket, buf, cap, rlen, deadline, timeout_ms == 0);
}

/* ------------------------------------------------------------------------- */
/* consumer                                                                   */

static inline int head_ready(const tk_ring *r)
{
    return atomic_load_explicit(&slot_at(r, r->deq_pos)->seq, ACQ) == r->deq_pos + 1;
}

unsigned tk_ring_drain(tk_ring *r, tk_ring_cb cb, void *ctx, unsigned max, int *armed)
{
    unsigned n = 0;
    int is_armed = 0;

    /* We are running: producers need not write the eventfd. */
    if (atomic_load_explicit(&r->cstate, RLX) != CS_AWAKE)
        atomic_store_explicit(&r->cstate, CS_AWAKE, RLX);

    uint64_t depth = atomic_load_explicit(&r->enq_pos, RLX) - r->deq_pos;
    if (depth > atomic_load_explicit(&r->st_max_depth, RLX))
        atomic_store_explicit(&r->st_max_depth, depth, RLX);

    while (n < max) {
        uint64_t pos = r->deq_pos;
        struct tk_slot *h = slot_at(r, pos);
        if (atomic_load_explicit(&h->seq, ACQ) != pos + 1) {
            /*
             * Wake-up protocol, consumer half: arm; fence; re-check.  A record
             * published before our fence is seen here; one published after it
             * sees ARMED and makes its producer write the eventfd.
             */
            atomic_store_explicit(&r->cstate, CS_ARMED, RLX);
            atomic_thread_fence(memory_order_seq_cst);
            if (!head_ready(r)) {
                is_armed = 1;
                break;
            }
            /* Raced with a producer.  If it disarmed us first it also writes the
             * eventfd: one spurious, harmless wake-up. */
            uint32_t exp = CS_ARMED;
            atomic_compare_exchange_strong(&r->cstate, &exp, CS_AWAKE);
            continue;
        }

        uint64_t ticket = h->ticket;
        size_t len = h->len;
        uint32_t k = h->nslots;
        const void *msg;
        if (k <= 1) {
            msg = h->data;
        } else {
            /* SAFETY: the record's slots are ours until the release stores below. */
            size_t left = len, off = 0;
            for (uint32_t i = 0; i < k && left > 0; i++) {
                size_t m = left < r->slot_payload ? left : r->slot_payload;
                memcpy(r->scratch + off, slot_at(r, pos + i)->data, m);
                off += m;
                left -= m;
            }
            msg = r->scratch;
        }
        int stop = cb(ctx, ticket, msg, len);
        if (k < 1)
            k = 1;
        /* In position order: try_submit relies on it (see there). */
        for (uint32_t i = 0; i < k; i++)
            atomic_store_explicit(&slot_at(r, pos + i)->seq, pos + i + r->nslots, REL);
        r->deq_pos = pos + k;
        n++;
        if (stop)
            break;
    }
    if (n > 0) {
        atomic_fetch_add_explicit(&r->st_drained, n, RLX);
        wake_space(r);
    }
    if (armed != NULL)
        *armed = is_armed;
    return n;
}

void tk_ring_ack(tk_ring *r)
{
    uint64_t v;
    ssize_t n;
    do
        n = read(r->efd, &v, sizeof(v));
    while (n < 0 && errno == EINTR);
    /* -EAGAIN: a spurious readiness report (or a second ack); nothing to reset. */
}

static int post_reply(tk_ring *r, uint64_t ticket, const void *msg, size_t len, int status)
{
    uint32_t idx;
    uint64_t gen;
    int rc = 0;
    if (len > TK_RING_MAX_MSG)
        return -EMSGSIZE;
    if (msg == NULL && len != 0)
        return -EINVAL;
    if (ticket_cell(r, ticket, &idx, &gen) != 0) {
        stat_inc(&r->st_late);
        return -ENOENT;
    }
    struct tk_cell *c = cell_at(r, idx);

    /* The only way to write into a cell: own exactly this generation's pending state. */
    uint64_t exp = CST(gen, C_PENDING);
    if (!atomic_compare_exchange_strong_explicit(&c->state, &exp, CST(gen, C_FILLING),
                                                 memory_order_acquire, RLX)) {
        stat_inc(&r->st_late);
        return -ENOENT;
    }
    /* SAFETY: C_FILLING excludes everyone else from len/status/heap/data until the
     * release store of C_DONE; the collector reads them after acquiring C_DONE. */
    if (status == 0 && len > r->cell_inline) {
        c->heap = malloc(len);
        if (c->heap == NULL)
            status = rc = -ENOMEM;
        else
            memcpy(c->heap, msg, len);
    } else if (status == 0 && len > 0) {
        memcpy(c->data, msg, len);
    }
    c->len = status == 0 ? (uint32_t)len : 0;
    c->status = status;
    atomic_store_explicit(&c->state, CST(gen, C_DONE), REL);

    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&c->waiters, RLX) != 0) {
        atomic_fetch_add(&c->wseq, 1);
        futex_wake_all(&c->wseq);
    }
    return rc;
}

int tk_ring_reply(tk_ring *r, uint64_t ticket, const void *msg, size_t len)
{
    return post_reply(r, ticket, msg, len, 0);
}

int tk_ring_reply_error(tk_ring *r, uint64_t ticket, int err)
{
    if (err <= 0)
        return -EINVAL;
    return post_reply(r, ticket, NULL, 0, -err);
}

void tk_ring_close(tk_ring *r)
{
    atomic_store(&r->closed, 1);
    atomic_thread_fence(memory_order_seq_cst);
    atomic_fetch_add(&r->space_seq, 1);
    futex_wake_all(&r->space_seq);
    for (uint32_t i = 0; i < r->ncells; i++) {
        struct tk_cell *c = cell_at(r, i);
        if (atomic_load(&c->waiters) != 0) {
            atomic_fetch_add(&c->wseq, 1);
            futex_wake_all(&c->wseq);
        }
    }
}

int tk_ring_closed(const tk_ring *r)
{
    return atomic_load(&r->closed);
}

void tk_ring_get_stats(const tk_ring *r, tk_ring_stats *o)
{
    o->submitted = atomic_load_explicit(&r->st_submitted, RLX);
    o->completed = atomic_load_explicit(&r->st_completed, RLX);
    o->timeouts = atomic_load_explicit(&r->st_timeouts, RLX);
    o->full_rejections = atomic_load_explicit(&r->st_full_rejections, RLX);
    o->full_waits = atomic_load_explicit(&r->st_full_waits, RLX);
    o->late_replies = atomic_load_explicit(&r->st_late, RLX);
    o->cancelled = atomic_load_explicit(&r->st_cancelled, RLX);
    o->drained = atomic_load_explicit(&r->st_drained, RLX);
    o->wakeups = atomic_load_explicit(&r->st_wakeups, RLX);
    o->max_depth = atomic_load_explicit(&r->st_max_depth, RLX);
}

/* ------------------------------------------------------------------------- */
/* load generator (tests, benchmarks)                                         */

struct load_thread {
    struct tk_ring_load *l;
    uint32_t id;
    pthread_t tid;
    int started;
    uint64_t sent, ok, mismatch, timeouts, submit_timeouts, errors, retries, closed;
    uint64_t t_start, t_end;
    uint64_t *lat;
    uint64_t nlat;
};

struct tk_ring_load {
    tk_ring *r;
    tk_ring_load_params p;
    struct load_thread *th;
    _Atomic uint32_t finished;
    _Atomic int abort;
    int joined;
};

static inline void store_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void store_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

void tk_ring_load_fill(uint8_t *msg, size_t len, uint32_t id, uint64_t seq)
{
    if (len < TK_RING_LOAD_HDR)
        return;
    store_le32(msg, id);
    store_le64(msg + 4, seq);
    store_le32(msg + 12, (uint32_t)len);
    uint32_t x = id * 2654435761u ^ (uint32_t)seq * 40503u ^ (uint32_t)(seq >> 32);
    for (size_t i = TK_RING_LOAD_HDR; i < len; i++) {
        x = x * 1103515245u + 12345u;
        msg[i] = (uint8_t)(x >> 24);
    }
}

struct outstanding {
    uint64_t ticket, seq, t0;
};

static void *load_main(void *arg)
{
    struct load_thread *t = arg;
    struct tk_ring_load *l = t->l;
    const tk_ring_load_params *p = &l->p;
    tk_ring *r = l->r;
    uint8_t *req = malloc(p->payload);
    uint8_t *want = malloc(p->payload);
    uint8_t *rep = malloc(TK_RING_MAX_MSG);
    struct outstanding *win = calloc(p->window, sizeof(*win));
    uint64_t next = 0, head = 0, nout = 0;
    int stop = 0;

    t->t_start = now_ns();
    if (req == NULL || want == NULL || rep == NULL || win == NULL) {
        t->errors++;
        goto out;
    }
    while (!atomic_load_explicit(&l->abort, RLX) && ((!stop && next < p->nmsgs) || nout)) {
        while (!stop && nout < p->window && next < p->nmsgs) {
            uint64_t tk = 0, t0;
            int rc;
            if (p->gap_us > 0 && next > 0) {
                struct timespec ts = {0, (long)p->gap_us * 1000};
                nanosleep(&ts, NULL);
            }
            tk_ring_load_fill(req, p->payload, t->id, next);
            t0 = now_ns();
            if (nout > 0) {
                /*
                 * Never block for space while holding uncollected tickets: the reply
                 * cells we need may be exactly the ones we hold.  Collect first.
                 */
                rc = tk_ring_submit(r, req, p->payload, &tk);
                if (rc == -EAGAIN) {
                    t->retries++;
                    break;
                }
            } else if (p->blocking) {
                rc = tk_ring_submit_wait(r, req, p->payload, &tk, p->timeout_ms);
            } else {
                while ((rc = tk_ring_submit(r, req, p->payload, &tk)) == -EAGAIN &&
                       !atomic_load_explicit(&l->abort, RLX)) {
                    t->retries++;
                    sched_yield();
                }
            }
            if (rc == 0) {
                win[(head + nout) % p->window] = (struct outstanding){tk, next, t0};
                nout++;
                t->sent++;
            } else if (rc == -ETIMEDOUT) {
                t->submit_timeouts++;
            } else {
                if (rc == -EPIPE)
                    t->closed++;
                else
                    t->errors++;
                stop = 1;
            }
            next++;
        }
        if (nout > 0) {
            struct outstanding o = win[head % p->window];
            size_t n = 0;
            int rc = tk_ring_wait_reply(r, o.ticket, rep, TK_RING_MAX_MSG, &n, p->timeout_ms);
            uint64_t t1 = now_ns();
            head++;
            nout--;
            if (rc == 0) {
                tk_ring_load_fill(want, p->payload, t->id, o.seq);
                if (n == p->payload && memcmp(rep, want, n) == 0)
                    t->ok++;
                else
                    t->mismatch++;
                t->lat[t->nlat++] = t1 - o.t0;
            } else if (rc == -ETIMEDOUT) {
                t->timeouts++;
            } else if (rc == -EPIPE) {
                if (!stop)
                    t->closed++;
                stop = 1;
            } else {
                t->errors++;
            }
        }
    }
    while (nout > 0) { /* aborted: abandon what is still in flight */
        tk_ring_cancel(r, win[head % p->window].ticket);
        head++;
        nout--;
    }
out:
    t->t_end = now_ns();
    free(req);
    free(want);
    free(rep);
    free(win);
    atomic_fetch_add(&l->finished, 1);
    return NULL;
}

tk_ring_load *tk_ring_load_start(tk_ring *r, const tk_ring_load_params *p, int *err)
{
    int e = -EINVAL;
    tk_ring_load *l = NULL;
    if (p->nthreads < 1 || p->nthreads > 1024 || p->window < 1 ||
        p->payload < TK_RING_LOAD_HDR || p->payload > TK_RING_MAX_MSG ||
        p->gap_us >= 1000000)
        goto fail;
    e = -ENOMEM;
    l = calloc(1, sizeof(*l));
    if (l == NULL)
        goto fail;
    l->r = r;
    l->p = *p;
    atomic_init(&l->finished, 0);
    atomic_init(&l->abort, 0);
    l->th = calloc(p->nthreads, sizeof(*l->th));
    if (l->th == NULL)
        goto fail;
    for (uint32_t i = 0; i < p->nthreads; i++) {
        l->th[i].l = l;
        l->th[i].id = i;
        l->th[i].lat = malloc(((size_t)p->nmsgs + 1) * sizeof(uint64_t));
        if (l->th[i].lat == NULL)
            goto fail;
    }
    for (uint32_t i = 0; i < p->nthreads; i++) {
        int rc = pthread_create(&l->th[i].tid, NULL, load_main, &l->th[i]);
        if (rc != 0) {
            e = -rc;
            atomic_store(&l->abort, 1);
            goto fail;
        }
        l->th[i].started = 1;
    }
    return l;

fail:
    tk_ring_load_free(l);
    if (err != NULL)
        *err = e;
    return NULL;
}

int tk_ring_load_done(const tk_ring_load *l)
{
    return atomic_load(&l->finished) == l->p.nthreads;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void load_join_threads(tk_ring_load *l)
{
    if (l->joined)
        return;
    for (uint32_t i = 0; i < l->p.nthreads; i++)
        if (l->th[i].started)
            pthread_join(l->th[i].tid, NULL);
    l->joined = 1;
}

void tk_ring_load_join(tk_ring_load *l, tk_ring_load_result *o)
{
    uint64_t t0 = UINT64_MAX, t1 = 0, total = 0, sum = 0;
    load_join_threads(l);
    memset(o, 0, sizeof(*o));
    for (uint32_t i = 0; i < l->p.nthreads; i++) {
        struct load_thread *t = &l->th[i];
        o->sent += t->sent;
        o->ok += t->ok;
        o->mismatch += t->mismatch;
        o->timeouts += t->timeouts;
        o->submit_timeouts += t->submit_timeouts;
        o->errors += t->errors;
        o->retries += t->retries;
        o->closed += t->closed;
        if (t->t_start < t0)
            t0 = t->t_start;
        if (t->t_end > t1)
            t1 = t->t_end;
        total += t->nlat;
    }
    o->elapsed_ns = t1 > t0 ? t1 - t0 : 0;
    o->lat_n = total;
    if (total == 0)
        return;
    uint64_t *all = malloc(total * sizeof(uint64_t));
    if (all == NULL)
        return;
    uint64_t off = 0;
    for (uint32_t i = 0; i < l->p.nthreads; i++) {
        memcpy(all + off, l->th[i].lat, l->th[i].nlat * sizeof(uint64_t));
        off += l->th[i].nlat;
    }
    qsort(all, total, sizeof(uint64_t), cmp_u64);
    for (uint64_t i = 0; i < total; i++)
        sum += all[i];
    o->min_ns = all[0];
    o->max_ns = all[total - 1];
    o->p50_ns = all[(total - 1) * 50 / 100];
    o->p90_ns = all[(total - 1) * 90 / 100];
    o->p99_ns = all[(total - 1) * 99 / 100];
    o->p999_ns = all[(total - 1) * 999 / 1000];
    o->mean_ns = sum / total;
    free(all);
}

void tk_ring_load_free(tk_ring_load *l)
{
    if (l == NULL)
        return;
    if (l->th != NULL) {
        load_join_threads(l);
        for (uint32_t i = 0; i < l->p.nthreads; i++)
            free(l->th[i].lat);
    }
    free(l->th);
    free(l);
}
