# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython shim over cache_impl.c; the contract is in src/takakrypt/_cache.pyi.

GIL: lookup/insert keep the GIL.  They take 50-150 ns in C, less than releasing and
re-acquiring the GIL costs, and a thread that drops the GIL may wait a whole switch
interval to get it back.  Holding the GIL while waiting for a shard mutex cannot
deadlock: C code that holds a shard mutex (FUSE threads) never needs the GIL.
Only the test/bench helpers (_bench_lookup_loop, _stress) run without the GIL.
"""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_Check
from libc.math cimport isfinite
from libc.stdint cimport uint8_t, int32_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free

from operator import index as _index
from os import fsencode as _fsencode

cdef extern from "cache_impl.h" nogil:
    enum:
        TK_CACHE_MAX_PATH
        TK_CACHE_MAX_ENTRIES
        TK_CACHE_HIT
        TK_CACHE_MISS
        TK_CACHE_STORED
        TK_CACHE_DROPPED
        TK_CACHE_ERR_NOMEM
        TK_CACHE_ERR_ARG
        TK_EFFECT_PERMIT
        TK_EFFECT_DENY
        TK_EFFECT_APPLY_KEY
        TK_EFFECT_AUDIT
        TK_EFFECT_WOULD_DENY
    const uint64_t TK_CACHE_DEFAULT_TTL
    ctypedef struct tk_cache_key:
        uint32_t uid
        uint32_t gid
        uint32_t pid
        uint64_t start_time
        uint64_t exe_dev
        uint64_t exe_ino
        uint32_t op
        const uint8_t *path
        size_t path_len
    ctypedef struct tk_cache_value:
        uint32_t effects
        int32_t rule
        uint32_t key_version
        uint32_t flags
    ctypedef struct tk_cache_stats:
        uint64_t hits
        uint64_t misses
        uint64_t inserts
        uint64_t updates
        uint64_t evictions
        uint64_t expirations
        uint64_t invalidations
        uint64_t stale_drops
        uint64_t occupied
        uint64_t capacity
        uint64_t generation
    ctypedef struct tk_cache:
        pass
    const char *tk_cache_strerror(int status)
    uint64_t tk_fnv1a64(const void *data, size_t len, uint64_t h)
    uint64_t tk_cache_hash(const tk_cache_key *k)
    uint64_t tk_cache_now()
    tk_cache *tk_cache_new(size_t max_entries, uint64_t default_ttl_ns, int *status)
    void tk_cache_free(tk_cache *c)
    size_t tk_cache_capacity(const tk_cache *c)
    uint64_t tk_cache_default_ttl(const tk_cache *c)
    uint64_t tk_cache_generation(const tk_cache *c)
    uint64_t tk_cache_bump_generation(tk_cache *c)
    int tk_cache_lookup(tk_cache *c, const tk_cache_key *k, tk_cache_value *out)
    int tk_cache_lookup_at(tk_cache *c, const tk_cache_key *k, uint64_t now,
                           tk_cache_value *out)
    int tk_cache_insert(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                        uint64_t ttl_ns, uint64_t generation)
    int tk_cache_insert_at(tk_cache *c, const tk_cache_key *k, const tk_cache_value *v,
                           uint64_t ttl_ns, uint64_t generation, uint64_t now)
    void tk_cache_clear(tk_cache *c)
    void tk_cache_set_hash_mask(tk_cache *c, uint64_t mask)
    size_t tk_cache_count(tk_cache *c, uint64_t now)
    void tk_cache_stats_get(tk_cache *c, tk_cache_stats *out)

MAX_PATH = TK_CACHE_MAX_PATH
MAX_ENTRIES = TK_CACHE_MAX_ENTRIES
EFFECT_PERMIT = TK_EFFECT_PERMIT
EFFECT_DENY = TK_EFFECT_DENY
EFFECT_APPLY_KEY = TK_EFFECT_APPLY_KEY
EFFECT_AUDIT = TK_EFFECT_AUDIT
EFFECT_WOULD_DENY = TK_EFFECT_WOULD_DENY

# ttl in seconds -> ns must stay below the TK_CACHE_DEFAULT_TTL sentinel (2**64 - 1)
cdef double _MAX_TTL_S = 9.2e9


cdef inline bytes _path_bytes(object path):
    cdef bytes p
    if type(path) is bytes:
        p = <bytes>path
    elif isinstance(path, str):
        p = _fsencode(path)
    elif isinstance(path, bytes):
        p = bytes(path)
    else:
        raise TypeError(f"path must be bytes or str, not {type(path).__name__}")
    if PyBytes_GET_SIZE(p) > TK_CACHE_MAX_PATH:
        raise ValueError(
            f"path is {PyBytes_GET_SIZE(p)} bytes, longer than {TK_CACHE_MAX_PATH}")
    return p


# Integer fields: int or __index__ only (Cython's own conversion would truncate floats);
# out of range -> OverflowError from the C conversion.
cdef inline uint32_t _u32(object o) except? 0xFFFFFFFF:
    if not PyLong_Check(o):
        o = _index(o)
    cdef uint32_t r = o
    return r


cdef inline int32_t _i32(object o) except? -1:
    if not PyLong_Check(o):
        o = _index(o)
    cdef int32_t r = o
    return r


cdef inline uint64_t _u64(object o) except? 0xFFFFFFFFFFFFFFFF:
    if not PyLong_Check(o):
        o = _index(o)
    cdef uint64_t r = o
    return r


cdef inline bytes _key(tk_cache_key *k, object uid, object gid, object pid,
                       object start_time, object exe_dev, object exe_ino, object path,
                       object op):
    """Fill *k; return the path bytes, which the caller keeps alive for the C call."""
    cdef bytes p = _path_bytes(path)
    k.uid = _u32(uid)
    k.gid = _u32(gid)
    k.pid = _u32(pid)
    k.start_time = _u64(start_time)
    k.exe_dev = _u64(exe_dev)
    k.exe_ino = _u64(exe_ino)
    k.op = _u32(op)
    # SAFETY: k.path borrows p's buffer (immutable bytes), alive while the caller holds p.
    k.path = <const uint8_t *>PyBytes_AS_STRING(p)
    k.path_len = <size_t>PyBytes_GET_SIZE(p)
    return p


cdef uint64_t _seconds_to_ns(object seconds, str name) except? 0:
    cdef double s = seconds  # TypeError for non-numbers
    if not isfinite(s) or s < 0 or s > _MAX_TTL_S:
        raise ValueError(f"{name} must be a finite number of seconds in [0, {_MAX_TTL_S:g}], "
                         f"got {seconds!r}")
    return <uint64_t>(s * 1e9)


cdef object _check(int rc):
    if rc == TK_CACHE_ERR_NOMEM:
        raise MemoryError()
    if rc < 0:
        raise ValueError(tk_cache_strerror(rc).decode())
    return None


def fnv1a64(data) -> int:
    """64-bit FNV-1a of a bytes-like object."""
    cdef Py_buffer view
    cdef uint64_t h
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        h = tk_fnv1a64(view.buf, <size_t>view.len, 0xcbf29ce484222325ULL)
    finally:
        PyBuffer_Release(&view)
    return h


def key_hash(uid, gid, pid, start_time, exe_dev, exe_ino, path, op) -> int:
    """The cache's key hash (FNV-1a 64 over the packed key; see the .pyi)."""
    cdef tk_cache_key k
    cdef bytes p = _key(&k, uid, gid, pid, start_time, exe_dev, exe_ino, path, op)
    return tk_cache_hash(&k)


def _monotonic_ns() -> int:
    """The cache's clock (CLOCK_MONOTONIC, ns): the `now` of the test-only methods."""
    return tk_cache_now()


@cython.auto_pickle(False)
@cython.final
cdef class DecisionCache:
    """Sharded, bounded, TTL + generation decision cache; see takakrypt/_cache.pyi."""

    cdef tk_cache *_c

    def __cinit__(self, max_entries=65536, default_ttl=30.0):
        cdef int status = 0
        cdef Py_ssize_t n
        cdef uint64_t ttl_ns
        self._c = NULL
        if not isinstance(max_entries, int):
            raise TypeError(f"max_entries must be an int, not {type(max_entries).__name__}")
        if not 1 <= max_entries <= TK_CACHE_MAX_ENTRIES:
            raise ValueError(
                f"max_entries must be in [1, {TK_CACHE_MAX_ENTRIES}], got {max_entries!r}")
        n = max_entries
        ttl_ns = _seconds_to_ns(default_ttl, "default_ttl")
        if ttl_ns == 0:
            raise ValueError(f"default_ttl must be > 0, got {default_ttl!r}")
        self._c = tk_cache_new(<size_t>n, ttl_ns, &status)
        if self._c == NULL:
            _check(status)
            raise MemoryError()

    def __dealloc__(self):
        # No other call can be running: each one holds a reference to self.
        tk_cache_free(self._c)
        self._c = NULL

    @property
    def generation(self) -> int:
        return tk_cache_generation(self._c)

    @property
    def capacity(self) -> int:
        return tk_cache_capacity(self._c)

    @property
    def default_ttl(self) -> float:
        return tk_cache_default_ttl(self._c) / 1e9

    def bump_generation(self) -> int:
        return tk_cache_bump_generation(self._c)

    # -- lookup ------------------------------------------------------------------

    cdef object _lookup(self, object uid, object gid, object pid, object start_time,
                        object exe_dev, object exe_ino, object path, object op,
                        bint have_now, uint64_t now):
        cdef tk_cache_key k
        cdef tk_cache_value v
        cdef int rc
        cdef bytes p = _key(&k, uid, gid, pid, start_time, exe_dev, exe_ino, path, op)
        if have_now:
            rc = tk_cache_lookup_at(self._c, &k, now, &v)
        else:
            rc = tk_cache_lookup(self._c, &k, &v)
        if rc == TK_CACHE_HIT:
            return (v.effects, v.rule, v.key_version, v.flags)
        if rc < 0:
            _check(rc)
        return None

    def lookup(self, uid, gid, pid, start_time, exe_dev, exe_ino, path, op):
        return self._lookup(uid, gid, pid, start_time, exe_dev, exe_ino, path, op, False, 0)

    def _lookup_at(self, now, uid, gid, pid, start_time, exe_dev, exe_ino, path, op):
        """Test only: lookup with an injected clock value (ns)."""
        return self._lookup(uid, gid, pid, start_time, exe_dev, exe_ino, path, op, True,
                            _u64(now))

    # -- insert ------------------------------------------------------------------

    cdef bint _insert(self, object uid, object gid, object pid, object start_time,
                      object exe_dev, object exe_ino, object path, object op,
                      object effects, object rule, object key_version, object flags,
                      object ttl, object generation, bint have_now,
                      uint64_t now) except -1:
        cdef tk_cache_key k
        cdef tk_cache_value v
        cdef uint64_t ttl_ns, gen
        cdef int rc
        cdef bytes p = _key(&k, uid, gid, pid, start_time, exe_dev, exe_ino, path, op)
        v.effects = _u32(effects)
        v.rule = _i32(rule)
        v.key_version = _u32(key_version)
        v.flags = _u32(flags)
        ttl_ns = TK_CACHE_DEFAULT_TTL if ttl is None else _seconds_to_ns(ttl, "ttl")
        gen = tk_cache_generation(self._c) if generation is None else _u64(generation)
        if have_now:
            rc = tk_cache_insert_at(self._c, &k, &v, ttl_ns, gen, now)
        else:
            rc = tk_cache_insert(self._c, &k, &v, ttl_ns, gen)
        if rc < 0:
            _check(rc)
        return rc == TK_CACHE_STORED

    def insert(self, uid, gid, pid, start_time, exe_dev, exe_ino, path, op, effects, rule,
               key_version=0, flags=0, *, ttl=None, generation=None):
        return self._insert(uid, gid, pid, start_time, exe_dev, exe_ino, path, op, effects,
                            rule, key_version, flags, ttl, generation, False, 0)

    def _insert_at(self, now, uid, gid, pid, start_time, exe_dev, exe_ino, path, op,
                   effects, rule, key_version=0, flags=0, *, ttl=None, generation=None):
        """Test only: insert with an injected clock value (ns)."""
        return self._insert(uid, gid, pid, start_time, exe_dev, exe_ino, path, op, effects,
                            rule, key_version, flags, ttl, generation, True, _u64(now))

    # -- whole cache -------------------------------------------------------------

    def clear(self) -> None:
        tk_cache_clear(self._c)

    def __len__(self) -> int:
        return tk_cache_count(self._c, tk_cache_now())

    def _len_at(self, now) -> int:
        """Test only: visible entries at an injected clock value (ns)."""
        return tk_cache_count(self._c, _u64(now))

    def stats(self) -> dict:
        cdef tk_cache_stats s
        tk_cache_stats_get(self._c, &s)
        return {
            "hits": s.hits,
            "misses": s.misses,
            "inserts": s.inserts,
            "updates": s.updates,
            "evictions": s.evictions,
            "expirations": s.expirations,
            "invalidations": s.invalidations,
            "stale_drops": s.stale_drops,
            "entries": tk_cache_count(self._c, tk_cache_now()),
            "occupied": s.occupied,
            "capacity": s.capacity,
            "generation": s.generation,
        }

    def __repr__(self) -> str:
        return (f"<DecisionCache capacity={self.capacity} generation={self.generation} "
                f"default_ttl={self.default_ttl:g}s>")


# ---------------------------------------------------------------------------------
# test / benchmark helpers (run in C without the GIL)


def _set_hash_mask(DecisionCache cache not None, uint64_t mask) -> None:
    """Test only: place entries by (hash & mask) to force collisions; empty cache only."""
    if _occupied(cache) != 0:
        raise ValueError("cache must be empty")
    tk_cache_set_hash_mask(cache._c, mask)


cdef uint64_t _occupied(DecisionCache cache):
    cdef tk_cache_stats s
    tk_cache_stats_get(cache._c, &s)
    return s.occupied


BENCH_PATH = b"/data/pg/base/16384/2619"


def _bench_lookup_loop(DecisionCache cache not None, Py_ssize_t n, path=BENCH_PATH,
                       Py_ssize_t nkeys=1, bint hit=True) -> float:
    """Bench only: ns per tk_cache_lookup() over n lookups in a C loop, GIL released.

    nkeys keys (differing in pid) are inserted first (hit=True) or not (hit=False) and
    looked up round robin.  Raises RuntimeError if a lookup does not give the expected
    hit/miss (e.g. the keys were evicted: keep nkeys well below the capacity).
    """
    cdef bytes p = _path_bytes(path)
    cdef tk_cache_key *keys
    cdef tk_cache_value v
    cdef Py_ssize_t i, j = 0, hits = 0
    cdef uint64_t t0, t1
    cdef tk_cache *c = cache._c
    if n <= 0 or nkeys <= 0:
        raise ValueError("n and nkeys must be > 0")
    keys = <tk_cache_key *>malloc(nkeys * sizeof(tk_cache_key))
    if keys == NULL:
        raise MemoryError()
    try:
        for i in range(nkeys):
            _key(&keys[i], 1000, 1000, 4242 + i, 123456789, 2049, 1311768, p, 1)
            if hit:
                cache.insert(1000, 1000, 4242 + i, 123456789, 2049, 1311768, p, 1,
                             TK_EFFECT_PERMIT | TK_EFFECT_APPLY_KEY, 3, ttl=3600.0)
        with nogil:
            t0 = tk_cache_now()
            for i in range(n):
                hits += tk_cache_lookup(c, &keys[j], &v) == TK_CACHE_HIT
                j += 1
                if j == nkeys:
                    j = 0
            t1 = tk_cache_now()
    finally:
        free(keys)
    if hits != (n if hit else 0):
        raise RuntimeError(f"expected {n if hit else 0} hits, got {hits}")
    return <double>(t1 - t0) / n


cdef inline uint64_t _rng(uint64_t *s) noexcept nogil:
    # xorshift64*
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * 0x2545F4914F6CDD1DULL


cdef void _stress_run(tk_cache *c, uint64_t seed, Py_ssize_t iters, uint32_t nkeys,
                      uint32_t bump_every, uint64_t *out) noexcept nogil:
    """Random inserts/lookups/bumps; out = [lookups, hits, violations, inserts]."""
    cdef uint8_t buf[256]
    cdef tk_cache_key k
    cdef tk_cache_value v
    cdef uint64_t st = seed * 2 + 1, r, g0, g1
    cdef uint32_t kid, plen, i
    cdef Py_ssize_t it
    cdef int rc
    for it in range(iters):
        r = _rng(&st)
        kid = <uint32_t>((r >> 16) % nkeys)
        k.uid = kid
        k.gid = kid * 7
        k.pid = kid ^ 0x55
        k.start_time = <uint64_t>kid * 1000003
        k.exe_dev = kid + 1
        k.exe_ino = <uint64_t>kid * 2654435761ULL
        k.op = kid % 5
        plen = 1 + (kid * 37) % 200  # both inline and heap-stored paths
        for i in range(plen):
            buf[i] = <uint8_t>(kid * 31 + i)
        k.path = buf
        k.path_len = plen
        if bump_every and (r >> 40) % bump_every == 0:
            tk_cache_bump_generation(c)
        elif (r & 0xff) < 96:
            g0 = tk_cache_generation(c)
            v.effects = kid & 31
            v.rule = <int32_t>kid
            v.key_version = <uint32_t>g0
            v.flags = kid ^ 0xA5A5
            rc = tk_cache_insert(c, &k, &v, TK_CACHE_DEFAULT_TTL, g0)
            out[3] += rc == TK_CACHE_STORED
        else:
            g0 = tk_cache_generation(c)
            rc = tk_cache_lookup(c, &k, &v)
            g1 = tk_cache_generation(c)
            out[0] += 1
            if rc == TK_CACHE_HIT:
                out[1] += 1
                # The value must be the one some thread stored for this key under the
                # generation current at the time of the lookup.
                if (v.effects != (kid & 31) or v.rule != <int32_t>kid
                        or v.flags != (kid ^ 0xA5A5)
                        or v.key_version < <uint32_t>g0 or v.key_version > <uint32_t>g1):
                    out[2] += 1


def _stress(DecisionCache cache not None, uint64_t seed, Py_ssize_t iters,
            uint32_t nkeys=64, uint32_t bump_every=0) -> dict:
    """Test only: random ops in C without the GIL (run it from several threads)."""
    cdef uint64_t out[4]
    out[0] = out[1] = out[2] = out[3] = 0
    if nkeys == 0:
        raise ValueError("nkeys must be > 0")
    with nogil:
        _stress_run(cache._c, seed, iters, nkeys, bump_every, out)
    return {"lookups": out[0], "hits": out[1], "violations": out[2], "inserts": out[3]}
