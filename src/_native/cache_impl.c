/*
 * cache_impl.c -- Takakrypt policy decision cache.  See cache_impl.h for the contract.
 *
 * Layout: S shards (power of two, <= 64), each cache-line aligned with
 *   - a mutex (adaptive where glibc has it),
 *   - `cap` preallocated slots (the shard's share of max_entries),
 *   - a chained hash table: buckets[] holds slot indices, slots link through `next`
 *     (the same field links the free list),
 *   - a CLOCK hand over the slots,
 *   - its counters.
 *
 * Why a mutex and not an rwlock: a read lock writes the lock word too, so readers of a
 * shard bounce the same cache line either way, and the critical sections are a few
 * dozen nanoseconds; with an exclusive lock a lookup can also set the CLOCK bit and
 * reclaim the expired/stale entry it finds without a second locking step.
 *
 * Counters are C11 atomics written only under the shard lock (relaxed load + store,
 * no locked instruction) and read with relaxed loads by tk_cache_stats_get().
 */
#define _GNU_SOURCE 1

#include "cache_impl.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct tk_slot {
    uint64_t hash;
    uint64_t gen;
    uint64_t expires;           /* visible while now < expires */
    uint64_t start_time;
    uint64_t exe_dev;
    uint64_t exe_ino;
    uint32_t uid, gid, pid, op;
    tk_cache_value value;
    uint32_t path_len;
    int32_t next;               /* bucket chain / free list, -1 = end */
    uint8_t used;
    uint8_t ref;                /* CLOCK reference bit */
    uint8_t *path_heap;         /* path_len > TK_CACHE_INLINE_PATH */
    uint8_t path_inline[TK_CACHE_INLINE_PATH];
};

enum { C_HITS, C_MISSES, C_INSERTS, C_UPDATES, C_EVICTIONS, C_EXPIRATIONS,
       C_INVALIDATIONS, C_STALE_DROPS, C_NCOUNTERS };

struct tk_shard {
    pthread_mutex_t mu;
    struct tk_slot *slots;
    int32_t *buckets;
    uint32_t cap;
    uint32_t bucket_mask;
    uint32_t hand;
    uint32_t used;
    int32_t free_head;
    uint64_t min_exp;           /* <= expires of every entry (UINT64_MAX if none) */
    uint64_t min_gen;           /* <= gen of every entry (UINT64_MAX if none) */
    _Atomic uint64_t counters[C_NCOUNTERS];
    _Atomic uint64_t occupied;  /* mirror of `used` for lock-free stats */
} __attribute__((aligned(64)));

struct tk_cache {
    _Atomic uint64_t generation;
    size_t capacity;
    uint64_t default_ttl;
    uint32_t nshards;
    uint32_t shard_shift;       /* 64 - log2(nshards); unused when nshards == 1 */
    uint64_t hash_mask;         /* all ones; tests narrow it to force collisions */
    struct tk_shard *shards;
};

/* ------------------------------------------------------------------------- */
/* helpers                                                                    */

const char *tk_cache_strerror(int status)
{
    switch (status) {
    case TK_CACHE_HIT:       return "hit / stored";
    case TK_CACHE_MISS:      return "miss / dropped";
    case TK_CACHE_ERR_NOMEM: return "out of memory";
    case TK_CACHE_ERR_ARG:   return "invalid argument";
    default:                 return "unknown status";
    }
}

/* Single writer (the lock holder): no locked instruction needed. */
static inline void cnt_inc(struct tk_shard *s, int which)
{
    uint64_t v = atomic_load_explicit(&s->counters[which], memory_order_relaxed);
    atomic_store_explicit(&s->counters[which], v + 1, memory_order_relaxed);
}

static inline void cnt_add(struct tk_shard *s, int which, uint64_t n)
{
    uint64_t v = atomic_load_explicit(&s->counters[which], memory_order_relaxed);
    atomic_store_explicit(&s->counters[which], v + n, memory_order_relaxed);
}

uint64_t tk_fnv1a64(const void *data, size_t len, uint64_t h)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= TK_FNV1A64_PRIME;
    }
    return h;
}

static inline uint64_t fnv_u32(uint64_t h, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        h ^= (uint8_t)(v >> (8 * i));
        h *= TK_FNV1A64_PRIME;
    }
    return h;
}

static inline uint64_t fnv_u64(uint64_t h, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        h ^= (uint8_t)(v >> (8 * i));
        h *= TK_FNV1A64_PRIME;
    }
    return h;
}

uint64_t tk_cache_hash(const tk_cache_key *k)
{
    uint64_t h = TK_FNV1A64_OFFSET;
    h = fnv_u32(h, k->uid);
    h = fnv_u32(h, k->gid);
    h = fnv_u32(h, k->pid);
    h = fnv_u64(h, k->start_time);
    h = fnv_u64(h, k->exe_dev);
    h = fnv_u64(h, k->exe_ino);
    h = fnv_u32(h, k->op);
    return tk_fnv1a64(k->path, k->path_len, h);
}

uint64_t tk_cache_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spread FNV's bits: top bits pick the shard, bits 20.. the bucket. */
static inline uint64_t mix(uint64_t h)
{
    return h * 0x9E3779B97F4A7C15ULL;
}

static inline struct tk_shard *shard_of(const tk_cache *c, uint64_t m)
{
    return &c->shards[c->nshards == 1 ? 0 : (m >> c->shard_shift)];
}

static inline uint32_t bucket_of(const struct tk_shard *s, uint64_t m)
{
    return (uint32_t)(m >> 20) & s->bucket_mask;
}

static inline const uint8_t *slot_path(const struct tk_slot *e)
{
    return e->path_len > TK_CACHE_INLINE_PATH ? e->path_heap : e->path_inline;
}

static inline int key_eq(const struct tk_slot *e, const tk_cache_key *k, uint64_t h)
{
    return e->hash == h && e->uid == k->uid && e->gid == k->gid && e->pid == k->pid
        && e->op == k->op && e->start_time == k->start_time && e->exe_dev == k->exe_dev
        && e->exe_ino == k->exe_ino && e->path_len == k->path_len
        && (k->path_len == 0 || memcmp(slot_path(e), k->path, k->path_len) == 0);
}

/* Unlink slot idx, whose predecessor link is *link, and put it on the free list. */
static void slot_release(struct tk_shard *s, int32_t *link, int32_t idx)
{
    struct tk_slot *e = &s->slots[idx];
    *link = e->next;
    free(e->path_heap);
    e->path_heap = NULL;
    e->used = 0;
    e->ref = 0;
    e->next = s->free_head;
    s->free_head = idx;
    s->used--;
    atomic_store_explicit(&s->occupied, s->used, memory_order_relaxed);
}

/* Remove slot idx (located by walking its bucket chain). */
static void slot_remove(struct tk_shard *s, int32_t idx)
{
    int32_t *link = &s->buckets[bucket_of(s, mix(s->slots[idx].hash))];
    while (*link != idx)
        link = &s->slots[*link].next;  /* idx is in this chain: the loop terminates */
    slot_release(s, link, idx);
}

/* Reclaim every expired or stale entry of the shard; recompute min_exp / min_gen. */
static void shard_sweep(struct tk_shard *s, uint64_t now, uint64_t cur)
{
    uint64_t min_exp = UINT64_MAX, min_gen = UINT64_MAX;
    uint64_t expired = 0, stale = 0;
    for (uint32_t b = 0; b <= s->bucket_mask; b++) {
        int32_t *link = &s->buckets[b];
        while (*link >= 0) {
            int32_t idx = *link;
            struct tk_slot *e = &s->slots[idx];
            if (e->gen != cur) {
                slot_release(s, link, idx);
                stale++;
            } else if (now >= e->expires) {
                slot_release(s, link, idx);
                expired++;
            } else {
                if (e->expires < min_exp)
                    min_exp = e->expires;
                if (e->gen < min_gen)
                    min_gen = e->gen;
                link = &e->next;
            }
        }
    }
    s->min_exp = min_exp;
    s->min_gen = min_gen;
    cnt_add(s, C_EXPIRATIONS, expired);
    cnt_add(s, C_INVALIDATIONS, stale);
}

/* CLOCK / second chance over a full shard with no expired or stale entry. */
static void shard_evict_one(struct tk_shard *s)
{
    for (;;) {
        uint32_t idx = s->hand;
        s->hand = idx + 1 == s->cap ? 0 : idx + 1;
        struct tk_slot *e = &s->slots[idx];
        if (!e->used)
            continue;
        if (e->ref) {
            e->ref = 0;
            continue;
        }
        slot_remove(s, (int32_t)idx);
        cnt_inc(s, C_EVICTIONS);
        return;
    }
}

/* ------------------------------------------------------------------------- */
/* lifecycle                                                                  */

static void shard_destroy(struct tk_shard *s)
{
    if (s->slots) {
        for (uint32_t i = 0; i < s->cap; i++)
            free(s->slots[i].path_heap);
    }
    free(s->slots);
    free(s->buckets);
    pthread_mutex_destroy(&s->mu);
}

static int shard_init(struct tk_shard *s, uint32_t cap)
{
    pthread_mutexattr_t attr;
    uint32_t nb = 1;
    while (nb < cap)
        nb <<= 1;
    memset(s, 0, sizeof(*s));
    if (pthread_mutexattr_init(&attr) != 0)
        return TK_CACHE_ERR_NOMEM;
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
    /* spin briefly before sleeping: critical sections are tens of nanoseconds */
    (void)pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
#endif
    int rc = pthread_mutex_init(&s->mu, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0)
        return TK_CACHE_ERR_NOMEM;
    s->cap = cap;
    s->bucket_mask = nb - 1;
    s->slots = calloc(cap, sizeof(*s->slots));
    s->buckets = malloc(nb * sizeof(*s->buckets));
    if (!s->slots || !s->buckets) {
        shard_destroy(s);
        return TK_CACHE_ERR_NOMEM;
    }
    for (uint32_t i = 0; i < nb; i++)
        s->buckets[i] = -1;
    for (uint32_t i = 0; i < cap; i++)
        s->slots[i].next = i + 1 < cap ? (int32_t)(i + 1) : -1;
    s->free_head = 0;
    s->min_exp = UINT64_MAX;
    s->min_gen = UINT64_MAX;
    return 0;
}

tk_cache *tk_cache_new(size_t max_entries, uint64_t default_ttl_ns, int *status)
{
    int st = TK_CACHE_ERR_ARG;
    tk_cache *c = NULL;
    if (max_entries < 1 || max_entries > TK_CACHE_MAX_ENTRIES || default_ttl_ns == 0
        || default_ttl_ns == TK_CACHE_DEFAULT_TTL)
        goto fail;
    st = TK_CACHE_ERR_NOMEM;
    c = calloc(1, sizeof(*c));
    if (!c)
        goto fail;
    uint32_t n = 1, bits = 0;
    while (n < TK_CACHE_MAX_SHARDS && (size_t)n * 2 * 64 <= max_entries) {
        n *= 2;
        bits++;
    }
    c->nshards = n;
    c->shard_shift = 64 - bits;
    c->capacity = max_entries;
    c->default_ttl = default_ttl_ns;
    c->hash_mask = UINT64_MAX;
    atomic_init(&c->generation, 0);
    c->shards = aligned_alloc(64, n * sizeof(struct tk_shard));
    if (!c->shards)
        goto fail;
    size_t base = max_entries / n, rem = max_entries % n;
    for (uint32_t i = 0; i < n; i++) {
        if (shard_init(&c->shards[i], (uint32_t)(base + (i < rem)))) {
            while (i-- > 0)
                shard_destroy(&c->shards[i]);
            free(c->shards);
            c->shards = NULL;
            goto fail;
        }
    }
    if (status)
        *status = 0;
    return c;
fail:
    free(c);
    if (status)
        *status = st;
    return NULL;
}

void tk_cache_free(tk_cache *c)
{
    if (!c)
        return;
    for (uint32_t i = 0; i < c->nshards; i++)
        shard_destroy(&c->shards[i]);
    free(c->shards);
    free(c);
}

void tk_cache_set_hash_mask(tk_cache *c, uint64_t mask) { c->hash_mask = mask; }

size_t tk_cache_capacity(const tk_cache *c) { return c->capacity; }
uint64_t tk_cache_default_ttl(const tk_cache *c) { return c->default_ttl; }

uint64_t tk_cache_generation(const tk_cache *c)
{
    /* cast: atomic_load takes a non-const pointer in older C11 libraries */
    return atomic_load_explicit((_Atomic uint64_t *)&c->generation, memory_order_acquire);
}

uint64_t tk_cache_bump_generation(tk_cache *c)
{
    return atomic_fetch_add_explicit(&c->generation, 1, memory_order_acq_rel) + 1;
}

/* ------------------------------------------------------------------------- */
/* lookup / insert                                                            */

int tk_cache_lookup_at(tk_cache *c, const tk_cache_key *k, uint64_t now,
                       tk_cache_value *out)
{
    if (k->path_len > TK_CACHE_MAX_PATH)
        return TK_CACHE_ERR_ARG;
    uint64_t h = tk_cache_hash(k) & c->hash_mask, m = mix(h);
    struct tk_shard *s = shard_of(c, m);
    int rc = TK_CACHE_MISS;

    pthread_mutex_lock(&s->mu);
    /* Read under the lock: an entry inserted under the old generation after a bump
     * compares unequal here and is never returned. */
    uint64_t cur = atomic_load_explicit(&c->generation, memory_order_acquire);
    int32_t *link = &s->buckets[bucket_of(s, m)];
    while (*link >= 0) {
        int32_t idx = *link;
        struct tk_slot *e = &s->slots[idx];
        if (key_eq(e, k, h)) {
            if (e->gen != cur) {
                slot_release(s, link, idx);
                cnt_inc(s, C_INVALIDATIONS);
            } else if (now >= e->expires) {
                slot_release(s, link, idx);
                cnt_inc(s, C_EXPIRATIONS);
            } else {
                e->ref = 1;
                *out = e->value;
                rc = TK_CACHE_HIT;
            }
            break;  /* at most one slot per key */
        }
        link = &e->next;
    }
    cnt_inc(s, rc == TK_CACHE_HIT ? C_HITS : C_MISSES);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int tk_cache_lookup(tk_cache *c, const tk_cache_key *k, tk_cache_value *out)
{
    return tk_cache_lookup_at(c, k, tk_cache_now(), out);
}

int tk_cache_insert_at(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                       uint64_t ttl_ns, uint64_t generation, uint64_t now)
{
    if (k->path_len > TK_CACHE_MAX_PATH)
        return TK_CACHE_ERR_ARG;
    if (ttl_ns == TK_CACHE_DEFAULT_TTL)
        ttl_ns = c->default_ttl;
    if (ttl_ns == 0)
        return TK_CACHE_DROPPED;
    uint64_t expires = now > UINT64_MAX - ttl_ns ? UINT64_MAX : now + ttl_ns;

    /* Allocate before locking (and possibly for nothing) rather than under the lock. */
    uint8_t *heap = NULL;
    if (k->path_len > TK_CACHE_INLINE_PATH) {
        heap = malloc(k->path_len);
        if (!heap)
            return TK_CACHE_ERR_NOMEM;
        memcpy(heap, k->path, k->path_len);
    }

    uint64_t h = tk_cache_hash(k) & c->hash_mask, m = mix(h);
    struct tk_shard *s = shard_of(c, m);
    uint32_t b = bucket_of(s, m);

    pthread_mutex_lock(&s->mu);
    uint64_t cur = atomic_load_explicit(&c->generation, memory_order_acquire);
    if (generation != cur) {
        cnt_inc(s, C_STALE_DROPS);
        pthread_mutex_unlock(&s->mu);
        free(heap);
        return TK_CACHE_DROPPED;
    }

    int32_t *link = &s->buckets[b];
    while (*link >= 0) {
        int32_t idx = *link;
        struct tk_slot *e = &s->slots[idx];
        if (key_eq(e, k, h)) {
            if (e->gen == cur && now < e->expires) {
                e->value = *v;
                e->expires = expires;
                if (expires < s->min_exp)
                    s->min_exp = expires;
                cnt_inc(s, C_UPDATES);
                cnt_inc(s, C_INSERTS);
                pthread_mutex_unlock(&s->mu);
                free(heap);
                return TK_CACHE_STORED;
            }
            /* same key, but invisible: reclaim it and store a fresh entry */
            int stale = e->gen != cur;
            slot_release(s, link, idx);
            cnt_inc(s, stale ? C_INVALIDATIONS : C_EXPIRATIONS);
            break;
        }
        link = &e->next;
    }

    if (s->free_head < 0) {
        if (now >= s->min_exp || s->min_gen != cur)
            shard_sweep(s, now, cur);
        if (s->free_head < 0)
            shard_evict_one(s);
    }

    int32_t idx = s->free_head;
    struct tk_slot *e = &s->slots[idx];
    s->free_head = e->next;
    e->hash = h;
    e->gen = cur;
    e->expires = expires;
    e->start_time = k->start_time;
    e->exe_dev = k->exe_dev;
    e->exe_ino = k->exe_ino;
    e->uid = k->uid;
    e->gid = k->gid;
    e->pid = k->pid;
    e->op = k->op;
    e->value = *v;
    e->path_len = (uint32_t)k->path_len;
    e->path_heap = heap;
    if (!heap && k->path_len)
        memcpy(e->path_inline, k->path, k->path_len);
    e->used = 1;
    e->ref = 0;  /* new entries go first unless they are hit before the hand arrives */
    e->next = s->buckets[b];
    s->buckets[b] = idx;
    s->used++;
    atomic_store_explicit(&s->occupied, s->used, memory_order_relaxed);
    if (expires < s->min_exp)
        s->min_exp = expires;
    if (cur < s->min_gen)
        s->min_gen = cur;
    cnt_inc(s, C_INSERTS);
    pthread_mutex_unlock(&s->mu);
    return TK_CACHE_STORED;
}

int tk_cache_insert(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                    uint64_t ttl_ns, uint64_t generation)
{
    return tk_cache_insert_at(c, k, v, ttl_ns, generation, tk_cache_now());
}

/* ------------------------------------------------------------------------- */
/* whole-cache operations                                                     */

void tk_cache_clear(tk_cache *c)
{
    for (uint32_t i = 0; i < c->nshards; i++) {
        struct tk_shard *s = &c->shards[i];
        pthread_mutex_lock(&s->mu);
        uint64_t n = s->used;
        for (uint32_t j = 0; j <= s->bucket_mask; j++) {
            while (s->buckets[j] >= 0)
                slot_release(s, &s->buckets[j], s->buckets[j]);
        }
        s->hand = 0;
        s->min_exp = UINT64_MAX;
        s->min_gen = UINT64_MAX;
        cnt_add(s, C_INVALIDATIONS, n);
        pthread_mutex_unlock(&s->mu);
    }
}

size_t tk_cache_count(tk_cache *c, uint64_t now)
{
    size_t n = 0;
    for (uint32_t i = 0; i < c->nshards; i++) {
        struct tk_shard *s = &c->shards[i];
        pthread_mutex_lock(&s->mu);
        uint64_t cur = atomic_load_explicit(&c->generation, memory_order_acquire);
        if (s->used) {
            for (uint32_t j = 0; j < s->cap; j++) {
                const struct tk_slot *e = &s->slots[j];
                n += e->used && e->gen == cur && now < e->expires;
            }
        }
        pthread_mutex_unlock(&s->mu);
    }
    return n;
}

void tk_cache_stats_get(tk_cache *c, tk_cache_stats *out)
{
    uint64_t sum[C_NCOUNTERS] = {0};
    uint64_t occupied = 0;
    for (uint32_t i = 0; i < c->nshards; i++) {
        struct tk_shard *s = &c->shards[i];
        for (int j = 0; j < C_NCOUNTERS; j++)
            sum[j] += atomic_load_explicit(&s->counters[j], memory_order_relaxed);
        occupied += atomic_load_explicit(&s->occupied, memory_order_relaxed);
    }
    out->hits = sum[C_HITS];
    out->misses = sum[C_MISSES];
    out->inserts = sum[C_INSERTS];
    out->updates = sum[C_UPDATES];
    out->evictions = sum[C_EVICTIONS];
    out->expirations = sum[C_EXPIRATIONS];
    out->invalidations = sum[C_INVALIDATIONS];
    out->stale_drops = sum[C_STALE_DROPS];
    out->occupied = occupied;
    out->capacity = c->capacity;
    out->generation = tk_cache_generation(c);
}
