/*
 * cache_impl.h -- Takakrypt policy decision cache (pure C, no Python, no GIL needed).
 *
 * Enforcement points (the C FUSE data path, the agent) cache the decision of the
 * policy engine for a (who, what, how) key so that only the first access pays for
 * policy evaluation.
 *
 * Key and hash
 * ------------
 * The hash is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3)
 * over this packed little-endian byte string, independent of the host byte order:
 *
 *     offset  size  field
 *          0     4  uid          uint32 LE
 *          4     4  gid          uint32 LE
 *          8     4  pid          uint32 LE
 *         12     8  start_time   uint64 LE  (process start time, e.g. /proc/PID/stat #22)
 *         20     8  exe_dev      uint64 LE  (st_dev of the executable)
 *         28     8  exe_ino      uint64 LE  (st_ino of the executable)
 *         36     4  op           uint32 LE  (operation code)
 *         40     n  path         raw bytes, n = path_len <= TK_CACHE_MAX_PATH, no NUL
 *
 * i.e. Python: fnv1a64(struct.pack("<IIIQQQI", uid, gid, pid, start_time, exe_dev,
 * exe_ino, op) + path).  The hash only picks the shard and bucket: entries always
 * compare the full key.
 *
 * Value
 * -----
 * tk_cache_value is opaque to the cache (TK_EFFECT_* documents the agent's meaning).
 *
 * Validity
 * --------
 * An entry is visible to a lookup only while (a) it carries the cache's current
 * generation and (b) now < inserted_at + ttl (CLOCK_MONOTONIC nanoseconds).
 * tk_cache_bump_generation() therefore hides every existing entry at once, in O(1);
 * hidden and expired entries are reclaimed lazily (on lookup of the same key, and in
 * bulk when a full shard needs room).  An insert carries the generation the caller
 * read BEFORE asking the policy engine; it is dropped if that generation is no longer
 * current, and even an insert racing with the bump is invisible afterwards, because
 * visibility is checked against the generation at lookup time.
 *
 * Bound and eviction
 * ------------------
 * At most max_entries entries are held.  The table is split into S shards (a power of
 * two, S = clamp(floor_pow2(max_entries / 64), 1, 64)), each with a fixed share of
 * the slots, its own mutex and a chained hash table.  When a shard is full, an insert
 * first reclaims every expired or stale entry of the shard (a scan that only runs
 * when the shard may hold one: it tracks its earliest expiry and oldest generation),
 * and only if none is found evicts one live entry with CLOCK (second chance): new
 * entries start unreferenced, a hit sets the reference bit, the hand clears set bits
 * and evicts the first entry whose bit is clear.  So an entry hit since the hand last
 * passed it survives until the hand has gone round once more.
 *
 * Thread safety
 * -------------
 * All functions except tk_cache_new / tk_cache_free may be called by any number of
 * threads at once.  tk_cache_free MUST NOT race with any other call.  Lookups never
 * allocate; an insert allocates only for a path longer than TK_CACHE_INLINE_PATH
 * (before taking the shard lock).  No function touches interpreter state.
 */
#ifndef TAKAKRYPT_CACHE_IMPL_H
#define TAKAKRYPT_CACHE_IMPL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TK_CACHE_MAX_PATH       4096
#define TK_CACHE_MAX_ENTRIES    (1u << 24)
#define TK_CACHE_MAX_SHARDS     64
#define TK_CACHE_INLINE_PATH    64     /* paths up to this long live inside the slot */
#define TK_CACHE_DEFAULT_TTL    UINT64_MAX  /* ttl_ns argument: use the cache's default */

#define TK_FNV1A64_OFFSET       0xcbf29ce484222325ULL
#define TK_FNV1A64_PRIME        0x100000001b3ULL

/* Meaning of tk_cache_value.effects for the agent (the cache does not interpret it). */
#define TK_EFFECT_PERMIT        (1u << 0)
#define TK_EFFECT_DENY          (1u << 1)
#define TK_EFFECT_APPLY_KEY     (1u << 2)
#define TK_EFFECT_AUDIT         (1u << 3)
#define TK_EFFECT_WOULD_DENY    (1u << 4)

/* Return codes. */
enum {
    TK_CACHE_HIT       = 1,   /* lookup: *out filled */
    TK_CACHE_MISS      = 0,   /* lookup: nothing visible for this key */
    TK_CACHE_STORED    = 1,   /* insert: entry stored (new or updated) */
    TK_CACHE_DROPPED   = 0,   /* insert: stale generation, or ttl_ns == 0 */
    TK_CACHE_ERR_NOMEM = -1,
    TK_CACHE_ERR_ARG   = -2   /* path longer than TK_CACHE_MAX_PATH, bad size or ttl */
};

typedef struct {
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint64_t start_time;
    uint64_t exe_dev;
    uint64_t exe_ino;
    uint32_t op;
    const uint8_t *path;   /* not retained by lookups; copied by inserts */
    size_t path_len;
} tk_cache_key;

typedef struct {
    uint32_t effects;      /* TK_EFFECT_* bits */
    int32_t rule;          /* index of the deciding rule, -1 = default */
    uint32_t key_version;
    uint32_t flags;
} tk_cache_value;

typedef struct {
    uint64_t hits;
    uint64_t misses;
    uint64_t inserts;        /* successful inserts, including updates */
    uint64_t updates;        /* inserts that overwrote a live entry of the same key */
    uint64_t evictions;      /* live entries removed to make room */
    uint64_t expirations;    /* expired entries reclaimed */
    uint64_t invalidations;  /* entries of an old generation reclaimed, or cleared */
    uint64_t stale_drops;    /* inserts dropped for a stale generation */
    uint64_t occupied;       /* slots in use (live + not yet reclaimed) */
    uint64_t capacity;       /* max entries */
    uint64_t generation;
} tk_cache_stats;
/* Invariant (quiescent cache):
 *   occupied == inserts - updates - evictions - expirations - invalidations */

typedef struct tk_cache tk_cache;

/* Human-readable text for a status code (static string, never NULL). */
const char *tk_cache_strerror(int status);

/* FNV-1a 64 of data[0..len), continuing from h (pass TK_FNV1A64_OFFSET to start). */
uint64_t tk_fnv1a64(const void *data, size_t len, uint64_t h);

/* The key hash described above. */
uint64_t tk_cache_hash(const tk_cache_key *k);

/* CLOCK_MONOTONIC in nanoseconds: the clock of the functions without `now`. */
uint64_t tk_cache_now(void);

/*
 * New cache holding at most max_entries (1 .. TK_CACHE_MAX_ENTRIES) entries, with
 * default_ttl_ns (> 0, != TK_CACHE_DEFAULT_TTL) for inserts that pass
 * TK_CACHE_DEFAULT_TTL.  All slots are allocated here.  Returns NULL and sets *status
 * on failure.
 */
tk_cache *tk_cache_new(size_t max_entries, uint64_t default_ttl_ns, int *status);

/* Free everything.  NULL is accepted.  Must not race with any other call. */
void tk_cache_free(tk_cache *c);

size_t tk_cache_capacity(const tk_cache *c);
uint64_t tk_cache_default_ttl(const tk_cache *c);

/* Current generation (starts at 0).  Read it BEFORE evaluating policy for an insert. */
uint64_t tk_cache_generation(const tk_cache *c);

/* Make every existing entry invisible; returns the new generation.  O(1). */
uint64_t tk_cache_bump_generation(tk_cache *c);

/*
 * Look k up at time now (tk_cache_lookup: now = tk_cache_now()).
 * TK_CACHE_HIT and *out filled, TK_CACHE_MISS, or TK_CACHE_ERR_ARG (path too long).
 * Never allocates.
 */
int tk_cache_lookup(tk_cache *c, const tk_cache_key *k, tk_cache_value *out);
int tk_cache_lookup_at(tk_cache *c, const tk_cache_key *k, uint64_t now,
                       tk_cache_value *out);

/*
 * Store v for k, visible while now < now + ttl_ns (TK_CACHE_DEFAULT_TTL: the cache's
 * default; the sum saturates), if `generation` is still current.  A live entry of the
 * same key is overwritten.  Returns TK_CACHE_STORED, TK_CACHE_DROPPED (stale
 * generation: counted in stale_drops; or ttl_ns == 0: not counted),
 * TK_CACHE_ERR_ARG or TK_CACHE_ERR_NOMEM.
 */
int tk_cache_insert(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                    uint64_t ttl_ns, uint64_t generation);
int tk_cache_insert_at(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                       uint64_t ttl_ns, uint64_t generation, uint64_t now);

/*
 * Testing only: use (hash & mask) to place and compare entries, so that distinct keys
 * collide (mask 0: one bucket of one shard).  Call on an empty cache, before any
 * other thread uses it.
 */
void tk_cache_set_hash_mask(tk_cache *c, uint64_t mask);

/* Remove every entry (counted as invalidations); counters and generation are kept. */
void tk_cache_clear(tk_cache *c);

/* Number of visible entries at `now` (current generation, not expired): O(capacity). */
size_t tk_cache_count(tk_cache *c, uint64_t now);

/* Counters summed over shards (each read atomically; the sum is not a snapshot
 * while other threads are active). */
void tk_cache_stats_get(tk_cache *c, tk_cache_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* TAKAKRYPT_CACHE_IMPL_H */
