"""Policy decision cache (native: src/_native/cache.pyx + cache_impl.c).

Enforcement points cache the policy engine's decision per key; the C FUSE engine uses
the same C core (``cache_impl.h``) directly, without the GIL.

Key and hash
------------
A key is ``(uid, gid, pid, start_time, exe_dev, exe_ino, path, op)``.  Its hash is
64-bit FNV-1a over this packed little-endian byte string::

    offset  size  field
         0     4  uid         u32
         4     4  gid         u32
         8     4  pid         u32
        12     8  start_time  u64   process start time (boot ticks, /proc/PID/stat)
        20     8  exe_dev     u64   st_dev of the executable
        28     8  exe_ino     u64   st_ino of the executable
        36     4  op          u32   operation code
        40     n  path        bytes, n <= 4096 (MAX_PATH)

i.e. ``fnv1a64(struct.pack("<IIIQQQI", uid, gid, pid, start_time, exe_dev, exe_ino,
op) + path) == key_hash(...)``.  The hash only places the entry: lookups compare the
full key.  A ``str`` path is encoded with ``os.fsencode``.

Value
-----
``(effects, rule, key_version, flags)``: ``effects`` is a bitmask (``EFFECT_*``), ``rule``
the deciding rule's index (i32), ``key_version`` and ``flags`` u32.  Opaque to the cache.

Validity
--------
An entry is returned only while it carries the current generation and its TTL (per
entry; ``default_ttl`` if not given) has not run out on CLOCK_MONOTONIC.
``bump_generation()`` (on every policy reload) hides every entry at once.  To make a
decision computed before a reload unable to land after it, read ``generation`` BEFORE
asking the policy engine and pass it to ``insert(..., generation=g)``: the insert is
dropped (returns ``False``) if a bump happened in between, and an insert racing with
the bump is invisible anyway (lookups check the generation they run under).

Bound
-----
At most ``max_entries`` entries.  When the shard (one of up to 64, each with its fixed
share of the slots) an insert lands in is full, expired and stale entries of that shard
are reclaimed first; only if there are none is a live entry evicted by CLOCK (second
chance): an entry hit since the clock hand last passed it survives the next pass, an
entry never hit since its insert goes first.  Caches smaller than 128 entries have a
single shard.

Threads and the GIL
-------------------
Safe to use from any number of threads (and, in C, from threads without the GIL).
``lookup``/``insert`` keep the GIL: the C call takes ~100 ns, less than giving the GIL
up and taking it back.

Errors
------
``TypeError`` for a path that is not ``bytes``/``str`` or a non-integer field,
``OverflowError`` for an integer field outside its C type (u32/u64/i32), ``ValueError``
for a path longer than ``MAX_PATH`` bytes or a bad ``ttl``/``max_entries``.
"""

from typing import Final

MAX_PATH: Final[int]  # 4096
MAX_ENTRIES: Final[int]  # 2**24
EFFECT_PERMIT: Final[int]  # 1 << 0
EFFECT_DENY: Final[int]  # 1 << 1
EFFECT_APPLY_KEY: Final[int]  # 1 << 2
EFFECT_AUDIT: Final[int]  # 1 << 3
EFFECT_WOULD_DENY: Final[int]  # 1 << 4
BENCH_PATH: Final[bytes]

Path = bytes | str

def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of ``data`` (any bytes-like object)."""

def key_hash(
    uid: int, gid: int, pid: int, start_time: int, exe_dev: int, exe_ino: int,
    path: Path, op: int,
) -> int:
    """The hash of a key, as laid out above."""

class DecisionCache:
    """Bounded, sharded, thread-safe cache of policy decisions.  Not picklable."""

    def __init__(self, max_entries: int = 65536, default_ttl: float = 30.0) -> None:
        """``max_entries`` in [1, MAX_ENTRIES]; ``default_ttl`` seconds, > 0.

        All slots are allocated here (about 160 bytes each).
        """
    @property
    def generation(self) -> int:
        """Current generation (read-only; starts at 0)."""
    @property
    def capacity(self) -> int:
        """``max_entries``."""
    @property
    def default_ttl(self) -> float:
        """Seconds."""
    def bump_generation(self) -> int:
        """Hide every existing entry (O(1)); return the new generation."""
    def lookup(
        self, uid: int, gid: int, pid: int, start_time: int, exe_dev: int, exe_ino: int,
        path: Path, op: int,
    ) -> tuple[int, int, int, int] | None:
        """``(effects, rule, key_version, flags)`` if a visible entry exists, else None.

        A hit marks the entry recently used.  Never allocates in C.
        """
    def insert(
        self, uid: int, gid: int, pid: int, start_time: int, exe_dev: int, exe_ino: int,
        path: Path, op: int, effects: int, rule: int, key_version: int = 0,
        flags: int = 0, *, ttl: float | None = None, generation: int | None = None,
    ) -> bool:
        """Store a decision; True if stored.

        ``ttl``: seconds (``None``: ``default_ttl``; ``0``: not stored, returns False).
        ``generation``: the value of ``generation`` read before the policy decision was
        computed (``None``: the current one, i.e. no protection against a concurrent
        reload).  False if it is no longer current (counted in ``stale_drops``).
        A visible entry of the same key is overwritten (counted in ``updates``).
        """
    def clear(self) -> None:
        """Remove every entry (counted as ``invalidations``); counters are kept."""
    def stats(self) -> dict[str, int]:
        """Counters and sizes.

        ``hits``, ``misses`` (lookups), ``inserts`` (stored, updates included),
        ``updates``, ``evictions`` (live entries pushed out for room), ``expirations``
        and ``invalidations`` (expired / old-generation or cleared entries reclaimed),
        ``stale_drops`` (inserts refused for a stale generation), ``entries`` (visible,
        = ``len()``), ``occupied`` (slots in use, including entries not yet reclaimed),
        ``capacity``, ``generation``.  When no other thread is active:
        ``occupied == inserts - updates - evictions - expirations - invalidations``.
        """
    def __len__(self) -> int:
        """Visible entries (current generation, not expired).  O(capacity)."""

    # test-only: the same operations with an injected CLOCK_MONOTONIC value (ns)
    def _lookup_at(
        self, now: int, uid: int, gid: int, pid: int, start_time: int, exe_dev: int,
        exe_ino: int, path: Path, op: int,
    ) -> tuple[int, int, int, int] | None: ...
    def _insert_at(
        self, now: int, uid: int, gid: int, pid: int, start_time: int, exe_dev: int,
        exe_ino: int, path: Path, op: int, effects: int, rule: int, key_version: int = 0,
        flags: int = 0, *, ttl: float | None = None, generation: int | None = None,
    ) -> bool: ...
    def _len_at(self, now: int) -> int: ...

def _monotonic_ns() -> int:
    """The clock of the cache (CLOCK_MONOTONIC, ns)."""

def _bench_lookup_loop(
    cache: DecisionCache, n: int, path: Path = ..., nkeys: int = 1, hit: bool = True,
) -> float:
    """Bench only: ns per C lookup over ``n`` lookups of ``nkeys`` keys, GIL released."""

def _set_hash_mask(cache: DecisionCache, mask: int) -> None:
    """Test only: place entries by ``hash & mask`` (0: all collide); empty cache only."""

def _stress(
    cache: DecisionCache, seed: int, iters: int, nkeys: int = 64, bump_every: int = 0,
) -> dict[str, int]:
    """Test only: random inserts/lookups/bumps in C without the GIL; returns counts of
    ``lookups``, ``hits``, ``inserts`` and consistency ``violations`` (must be 0)."""
