"""Tests of the native policy decision cache (takakrypt._cache).

Time is injected through the test-only ``_lookup_at`` / ``_insert_at`` / ``_len_at``
methods (CLOCK_MONOTONIC nanoseconds), so nothing here depends on machine speed.
"""

from __future__ import annotations

import os
import random
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from takakrypt import _cache
from takakrypt._cache import MAX_PATH, DecisionCache, fnv1a64, key_hash

S = 1_000_000_000  # ns per second
T0 = 10**12  # an arbitrary injected "now"
KEY = (1000, 1000, 4242, 123456789, 2049, 1311768, b"/data/pg/base/16384/2619", 1)
FIELD_MAX = [2**32 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, None,
             2**32 - 1]


def invariant_holds(s: dict) -> bool:
    return s["occupied"] == (s["inserts"] - s["updates"] - s["evictions"]
                             - s["expirations"] - s["invalidations"])


# ---------------------------------------------------------------------------------
# hash


@pytest.mark.parametrize("data, expected", [
    (b"", 0xCBF29CE484222325),
    (b"a", 0xAF63DC4C8601EC8C),
    (b"foobar", 0x85944171F73967E8),
])
def test_fnv1a64_published_vectors(data, expected):
    assert fnv1a64(data) == expected
    assert fnv1a64(bytearray(data)) == expected
    assert fnv1a64(memoryview(data)) == expected


def py_fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


@given(st.binary(max_size=300))
def test_fnv1a64_matches_reference(data):
    assert fnv1a64(data) == py_fnv1a64(data)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_key_hash_byte_order(uid, gid, pid, start, dev, ino, path, op):
    packed = struct.pack("<IIIQQQI", uid, gid, pid, start, dev, ino, op) + path
    assert len(packed) == 40 + len(path)
    assert key_hash(uid, gid, pid, start, dev, ino, path, op) == py_fnv1a64(packed)


# ---------------------------------------------------------------------------------
# basics


def test_hit_and_miss():
    c = DecisionCache()
    assert c.lookup(*KEY) is None
    assert c.insert(*KEY, _cache.EFFECT_PERMIT | _cache.EFFECT_APPLY_KEY, 3, 7, 9) is True
    assert c.lookup(*KEY) == (5, 3, 7, 9)
    assert len(c) == 1
    s = c.stats()
    assert (s["hits"], s["misses"], s["inserts"], s["entries"], s["occupied"]) == (1, 1, 1, 1, 1)
    assert s["capacity"] == 65536 and s["generation"] == 0
    assert c.capacity == 65536 and c.default_ttl == 30.0


def test_value_ranges_round_trip():
    c = DecisionCache()
    c.insert(*KEY, 2**32 - 1, -(2**31), 2**32 - 1, 2**32 - 1)
    assert c.lookup(*KEY) == (2**32 - 1, -(2**31), 2**32 - 1, 2**32 - 1)
    c.insert(*KEY, 0, 2**31 - 1)
    assert c.lookup(*KEY) == (0, 2**31 - 1, 0, 0)


def test_effect_bits():
    assert (_cache.EFFECT_PERMIT, _cache.EFFECT_DENY, _cache.EFFECT_APPLY_KEY,
            _cache.EFFECT_AUDIT, _cache.EFFECT_WOULD_DENY) == (1, 2, 4, 8, 16)


@pytest.fixture(params=["full-hash", "all-collide"])
def mask(request):
    """all-collide: every key hashes to 0, so only the full-key compare tells keys apart."""
    return 2**64 - 1 if request.param == "full-hash" else 0


def new_cache(mask: int, *args, **kw) -> DecisionCache:
    c = DecisionCache(*args, **kw)
    _cache._set_hash_mask(c, mask)
    return c


@pytest.mark.parametrize("field", range(8))
def test_every_key_field_matters(field, mask):
    c = new_cache(mask)
    c.insert(*KEY, 1, 0)
    for delta in (1, -1):
        other = list(KEY)
        if field == 6:
            other[6] = KEY[6] + b"x" if delta == 1 else KEY[6][:-1]
        else:
            other[field] = (KEY[field] + delta) % (FIELD_MAX[field] + 1)
        assert c.lookup(*other) is None
        c.insert(*other, 2, 1)
        assert c.lookup(*other) == (2, 1, 0, 0)
    assert c.lookup(*KEY) == (1, 0, 0, 0)
    assert len(c) == 3


def test_extreme_field_values(mask):
    c = new_cache(mask)
    lo = (0, 0, 0, 0, 0, 0, b"", 0)
    hi = (2**32 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, b"\xff" * MAX_PATH,
          2**32 - 1)
    c.insert(*lo, 1, 1)
    c.insert(*hi, 2, 2)
    assert c.lookup(*lo) == (1, 1, 0, 0)
    assert c.lookup(*hi) == (2, 2, 0, 0)


def test_path_types_and_length(mask):
    c = new_cache(mask)
    c.insert(*KEY[:6], "/data/pg/base/16384/2619", 1, 1, 0)
    assert c.lookup(*KEY) == (1, 0, 0, 0)
    weird = "/d/\udcff\u00e9"  # surrogateescape, like os.listdir gives for bad bytes
    c.insert(*KEY[:6], weird, 1, 2, 0)
    assert c.lookup(*KEY[:6], os.fsencode(weird), 1) == (2, 0, 0, 0)

    class B(bytes):
        pass
    assert c.lookup(*KEY[:6], B(KEY[6]), 1) == (1, 0, 0, 0)
    # NUL bytes and the empty path are ordinary keys
    c.insert(*KEY[:6], b"a\0b", 1, 3, 0)
    assert c.lookup(*KEY[:6], b"a\0c", 1) is None
    assert c.lookup(*KEY[:6], b"a\0b", 1) == (3, 0, 0, 0)

    for n in (0, 1, 63, 64, 65, 1000, MAX_PATH):  # around the inline/heap boundary
        p = bytes(random.Random(n).randbytes(n))
        assert c.insert(*KEY[:6], p, 9, n, 0)
        assert c.lookup(*KEY[:6], p, 9) == (n, 0, 0, 0)
    too_long = b"x" * (MAX_PATH + 1)
    with pytest.raises(ValueError, match="4096"):
        c.lookup(*KEY[:6], too_long, 1)
    with pytest.raises(ValueError, match="4096"):
        c.insert(*KEY[:6], too_long, 1, 1, 0)
    with pytest.raises(ValueError):
        key_hash(*KEY[:6], too_long, 1)
    for bad in (bytearray(b"/x"), memoryview(b"/x"), None, 5):
        with pytest.raises(TypeError):
            c.lookup(*KEY[:6], bad, 1)


def test_integer_arguments_checked():
    c = DecisionCache()
    for i, top in enumerate(FIELD_MAX):
        if top is None:
            continue
        for bad in (-1, top + 1):
            k = list(KEY)
            k[i] = bad
            with pytest.raises(OverflowError):
                c.lookup(*k)
            with pytest.raises(OverflowError):
                c.insert(*k, 1, 0)
        k = list(KEY)
        k[i] = 1.0
        with pytest.raises(TypeError):
            c.lookup(*k)
    with pytest.raises(OverflowError):
        c.insert(*KEY, 2**32, 0)
    with pytest.raises(OverflowError):
        c.insert(*KEY, 1, 2**31)
    with pytest.raises(OverflowError):
        c.insert(*KEY, 1, 0, generation=-1)
    with pytest.raises(TypeError):
        c.insert(*KEY, 1, 0.5)
    assert c.stats()["inserts"] == 0


def test_set_hash_mask_needs_empty_cache():
    c = DecisionCache()
    c.insert(*KEY, 1, 0)
    with pytest.raises(ValueError):
        _cache._set_hash_mask(c, 0)


def test_constructor_validation():
    for bad in (0, -1, _cache.MAX_ENTRIES + 1):
        with pytest.raises(ValueError):
            DecisionCache(bad)
    with pytest.raises(TypeError):
        DecisionCache(1.5)
    for bad in (0, -1.0, float("nan"), float("inf"), 1e12):
        with pytest.raises(ValueError):
            DecisionCache(10, bad)
    assert DecisionCache(1, 0.001).capacity == 1
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(DecisionCache(4))


# ---------------------------------------------------------------------------------
# TTL


def test_ttl_expiry_injected_clock():
    c = DecisionCache(default_ttl=2.0)
    assert c._insert_at(T0, *KEY, 1, 0)
    assert c._lookup_at(T0 + 2 * S - 1, *KEY) == (1, 0, 0, 0)
    assert c._len_at(T0 + 2 * S - 1) == 1
    assert c._len_at(T0 + 2 * S) == 0
    assert c._lookup_at(T0 + 2 * S, *KEY) is None
    s = c.stats()
    assert (s["hits"], s["misses"], s["expirations"], s["occupied"]) == (1, 1, 1, 0)
    assert invariant_holds(s)


def test_per_entry_ttl():
    c = DecisionCache(default_ttl=30.0)
    k2 = KEY[:7] + (2,)
    k3 = KEY[:7] + (3,)
    c._insert_at(T0, *KEY, 1, 0, ttl=0.5)
    c._insert_at(T0, *k2, 2, 0)  # default 30 s
    c._insert_at(T0, *k3, 3, 0, ttl=3600.0)
    at = T0 + S
    assert c._lookup_at(at, *KEY) is None
    assert c._lookup_at(at, *k2) == (2, 0, 0, 0)
    at = T0 + 31 * S
    assert c._lookup_at(at, *k2) is None
    assert c._lookup_at(at, *k3) == (3, 0, 0, 0)


def test_ttl_zero_is_not_stored_and_bad_ttl_rejected():
    c = DecisionCache()
    assert c.insert(*KEY, 1, 0, ttl=0) is False
    assert c.lookup(*KEY) is None
    assert c.stats()["inserts"] == 0 and c.stats()["stale_drops"] == 0
    for bad in (-1, float("nan"), float("inf"), 1e300):
        with pytest.raises(ValueError):
            c.insert(*KEY, 1, 0, ttl=bad)
    with pytest.raises(TypeError):
        c.insert(*KEY, 1, 0, ttl="1")


def test_ttl_saturates_near_clock_end():
    c = DecisionCache()
    far = 2**64 - 10
    assert c._insert_at(far, *KEY, 1, 0, ttl=3600.0)
    assert c._lookup_at(2**64 - 2, *KEY) == (1, 0, 0, 0)


def test_ttl_expiry_real_clock():
    c = DecisionCache()
    assert c.insert(*KEY, 1, 0, ttl=0.002)
    deadline = _cache._monotonic_ns() + 3_000_000
    while _cache._monotonic_ns() < deadline:
        pass
    assert c.lookup(*KEY) is None
    assert c.stats()["expirations"] == 1


def test_update_refreshes_value_and_ttl():
    c = DecisionCache()
    c._insert_at(T0, *KEY, 1, 0, ttl=1.0)
    c._insert_at(T0 + S // 2, *KEY, 2, 5, ttl=1.0)
    assert c._lookup_at(T0 + S + 1, *KEY) == (2, 5, 0, 0)
    s = c.stats()
    assert (s["inserts"], s["updates"], s["occupied"]) == (2, 1, 1)
    # an expired entry of the same key is reclaimed, not updated
    c._insert_at(T0 + 10 * S, *KEY, 3, 0, ttl=1.0)
    s = c.stats()
    assert (s["inserts"], s["updates"], s["expirations"], s["occupied"]) == (3, 1, 1, 1)
    assert invariant_holds(s)


# ---------------------------------------------------------------------------------
# generation


def test_generation_bump_hides_everything():
    c = DecisionCache()
    for i in range(100):
        c.insert(*KEY[:2], i, *KEY[3:], 1, i)
    g0 = c.generation
    assert c.bump_generation() == g0 + 1 == c.generation
    assert len(c) == 0
    assert all(c.lookup(*KEY[:2], i, *KEY[3:]) is None for i in range(100))
    s = c.stats()
    assert s["invalidations"] == 100 and s["occupied"] == 0 and invariant_holds(s)


def test_stale_generation_insert_dropped():
    c = DecisionCache()
    g = c.generation  # read before "asking the policy engine"
    c.bump_generation()  # a reload happens meanwhile
    assert c.insert(*KEY, 1, 0, generation=g) is False
    assert c.lookup(*KEY) is None
    assert c.stats()["stale_drops"] == 1
    assert c.insert(*KEY, 1, 0, generation=c.generation) is True
    assert c.lookup(*KEY) == (1, 0, 0, 0)
    # a generation from the future is not current either
    assert c.insert(*KEY, 2, 0, generation=c.generation + 1) is False
    assert c.lookup(*KEY) == (1, 0, 0, 0)


def test_generation_is_read_only():
    c = DecisionCache()
    with pytest.raises(AttributeError):
        c.generation = 5


def test_clear():
    c = DecisionCache()
    for i in range(10):
        c.insert(*KEY[:2], i, *KEY[3:], 1, i)
    c.lookup(*KEY)
    c.clear()
    assert len(c) == 0 and c.lookup(*KEY[:2], 1, *KEY[3:]) is None
    s = c.stats()
    assert s["invalidations"] == 10 and s["inserts"] == 10 and invariant_holds(s)
    assert c.insert(*KEY, 1, 0) and c.lookup(*KEY) == (1, 0, 0, 0)


# ---------------------------------------------------------------------------------
# bound and eviction


def k_(i: int, path: bytes = b"/p") -> tuple:
    return (i, 0, 0, 0, 0, 0, path, 0)


@pytest.mark.parametrize("cap", [1, 7, 100, 1000, 5000])
def test_size_bound_and_eviction_count(cap, mask):
    c = new_cache(mask, cap)
    n = 3 * cap + 5
    for i in range(n):
        assert c.insert(*k_(i, b"/long/" * (i % 20)), 1, i)
        assert c.stats()["occupied"] <= cap
    s = c.stats()
    assert s["occupied"] <= cap and len(c) <= cap
    assert s["evictions"] == n - s["occupied"]
    assert invariant_holds(s)
    hits = sum(c.lookup(*k_(i, b"/long/" * (i % 20))) == (1, i, 0, 0) for i in range(n))
    assert hits == s["occupied"]
    if cap < 128:  # a single shard: it fills completely
        assert s["occupied"] == cap


def test_recently_used_survive():
    # < 128 entries: one shard, so the CLOCK guarantee is exact.
    c = DecisionCache(100)
    for i in range(100):
        c.insert(*k_(i), 1, i)
    hot = range(0, 100, 10)
    for i in hot:
        assert c.lookup(*k_(i)) == (1, i, 0, 0)
    for i in range(100, 150):
        c.insert(*k_(i), 1, i)
    assert c.stats()["evictions"] == 50
    assert all(c.lookup(*k_(i)) == (1, i, 0, 0) for i in hot)


def test_recently_used_survive_sharded():
    # Many shards: hits keep a hot set resident under a stream of one-off inserts.
    c = DecisionCache(4096)
    hot = range(256)
    for i in hot:
        c.insert(*k_(i), 1, i)
    rng = random.Random(1)
    for j in range(20000):
        c.insert(*k_(10_000 + j), 1, 0)
        h = rng.choice(hot)
        if c.lookup(*k_(h)) is None:
            c.insert(*k_(h), 1, h)
    survivors = sum(c.lookup(*k_(i)) is not None for i in hot)
    assert survivors >= 0.9 * len(hot)


def test_expired_and_stale_are_reclaimed_before_eviction():
    c = DecisionCache(100)
    for i in range(50):
        c._insert_at(T0, *k_(i), 1, i, ttl=1.0)
    for i in range(50, 100):
        c._insert_at(T0, *k_(i), 1, i, ttl=100.0)
    later = T0 + 2 * S
    for i in range(100, 150):
        assert c._insert_at(later, *k_(i), 1, i)
    s = c.stats()
    assert (s["evictions"], s["expirations"]) == (0, 50)
    assert all(c._lookup_at(later, *k_(i)) is not None for i in range(50, 150))

    c.bump_generation()
    for i in range(150, 250):
        assert c._insert_at(later, *k_(i), 1, i)
    s = c.stats()
    assert (s["evictions"], s["invalidations"]) == (0, 100)
    assert invariant_holds(s)


# ---------------------------------------------------------------------------------
# threads


def test_threads_nogil_stress():
    """8 threads doing random inserts/lookups/bumps in C, truly in parallel (no GIL)."""
    c = DecisionCache(500)  # smaller than the key space: evictions race too
    results = []

    def run(seed):
        results.append(_cache._stress(c, seed, 100_000, nkeys=2000, bump_every=500))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert sum(r["violations"] for r in results) == 0
    assert sum(r["hits"] for r in results) > 0
    s = c.stats()
    assert s["hits"] == sum(r["hits"] for r in results)
    assert s["hits"] + s["misses"] == sum(r["lookups"] for r in results)
    assert s["inserts"] == sum(r["inserts"] for r in results)
    assert s["occupied"] <= 500 and invariant_holds(s)
    assert s["evictions"] > 0 and s["stale_drops"] + s["invalidations"] > 0


def test_threads_python_api_consistency():
    """8 Python threads + the nogil C stress at once, with reloads; a hit is always the
    value some thread stored for that key under the generation of the lookup."""
    c = DecisionCache(300)
    nkeys = 400
    errors: list[str] = []
    stop = threading.Event()

    def key(i):
        return (i, i * 3, 7, 11, 13, i, b"/k/%d" % i * (i % 30), i % 4)

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(20_000):
            i = rng.randrange(nkeys)
            r = rng.random()
            if r < 0.01:
                c.bump_generation()
            elif r < 0.4:
                g = c.generation
                c.insert(*key(i), i & 31, i, g, 0xBEEF, generation=g)
            else:
                g0 = c.generation
                v = c.lookup(*key(i))
                g1 = c.generation
                if v is not None and not (v[:2] == (i & 31, i) and v[3] == 0xBEEF
                                          and g0 <= v[2] <= g1):
                    errors.append(f"key {i}: {v} outside generations {g0}..{g1}")

    def c_worker(seed):
        while not stop.is_set():
            r = _cache._stress(c, seed, 5000, nkeys=300, bump_every=200)
            if r["violations"]:
                errors.append(f"C stress: {r}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    cthreads = [threading.Thread(target=c_worker, args=(100 + s,)) for s in range(2)]
    for t in threads + cthreads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in cthreads:
        t.join()
    assert errors == []
    s = c.stats()
    assert s["occupied"] <= 300 and invariant_holds(s)


# ---------------------------------------------------------------------------------
# model test


class CacheModel(RuleBasedStateMachine):
    """DecisionCache vs a dict, with an injected clock.

    With a capacity above the key space the cache must agree exactly; with a small
    one it may miss (eviction) but never return anything the model does not hold.
    """

    @initialize(cap=st.sampled_from([3, 50, 1000]), ttl=st.integers(1, 20),
                mask=st.sampled_from([2**64 - 1, 0, 0xF]))
    def setup(self, cap, ttl, mask):
        self.cap = cap
        self.exact = cap >= 50  # keys below come from a space of 48
        self.c = DecisionCache(cap, default_ttl=ttl)
        _cache._set_hash_mask(self.c, mask)  # 0 / 0xF: colliding keys share chains
        self.default_ttl = ttl * S
        self.now = T0
        self.gen = 0
        self.model: dict[tuple, tuple] = {}  # key -> (value, expires, generation)
        self.hits = self.misses = self.lookups = 0

    keys = st.tuples(st.integers(0, 1), st.just(5), st.integers(0, 1), st.just(2**40),
                     st.just(3), st.just(9), st.sampled_from([b"", b"/a", b"/b" * 50]),
                     st.integers(0, 3))

    def visible(self, k):
        e = self.model.get(k)
        if e is not None and e[2] == self.gen and self.now < e[1]:
            return e[0]
        return None

    @rule(k=keys, effects=st.integers(0, 31), rule_=st.integers(-1, 5),
          ttl=st.one_of(st.none(), st.integers(0, 30)), stale=st.booleans())
    def insert(self, k, effects, rule_, ttl, stale):
        gen = self.gen - 1 if stale and self.gen > 0 else self.gen
        ok = self.c._insert_at(self.now, *k, effects, rule_, 1, 2,
                               ttl=None if ttl is None else float(ttl), generation=gen)
        ttl_ns = self.default_ttl if ttl is None else ttl * S
        expected = gen == self.gen and ttl_ns > 0
        assert ok is expected
        if ok:
            self.model[k] = ((effects, rule_, 1, 2), self.now + ttl_ns, gen)

    @rule(k=keys)
    def lookup(self, k):
        got = self.c._lookup_at(self.now, *k)
        want = self.visible(k)
        self.lookups += 1
        if got is not None:
            self.hits += 1
        if self.exact:
            assert got == want
        else:
            assert got is None or got == want

    @rule(dt=st.integers(0, 25 * S))
    def advance(self, dt):
        self.now += dt

    @rule()
    def bump(self):
        self.gen += 1
        assert self.c.bump_generation() == self.gen

    @rule()
    def clear(self):
        self.c.clear()
        self.model.clear()

    @invariant()
    def sizes_and_counters(self):
        n = self.c._len_at(self.now)
        live = sum(self.visible(k) is not None for k in self.model)
        if self.exact:
            assert n == live
        else:
            assert n <= min(live, self.cap)
        s = self.c.stats()
        assert s["occupied"] <= self.cap
        assert s["hits"] == self.hits and s["hits"] + s["misses"] == self.lookups
        assert s["generation"] == self.gen
        assert invariant_holds(s)


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
