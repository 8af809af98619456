"""The agent's in-memory key cache: data keys fetched from a key backend, held locked,
wiped when dropped, with a lifetime and revalidation (docs/keys.md, "Key cache and
offline operation").

Every entry remembers when the backend last *confirmed* it (fetched it, or answered
that the key and version still exist):

* younger than ``revalidate``: served as it is;
* older: the caller (:class:`takakrypt.agent.keymanager.KeyManager`) asks the backend
  again before serving it; a backend that fails lets it be served until it is
  ``ttl`` old, then it is dropped and wiped;
* ``ttl == 0``: entries never expire and are never revalidated.

The current-version memo (name -> version) follows the same ages.  This module holds
the data and the clock; what to ask the backend and when is the key manager's.
Thread-safe.  Material never appears in ``repr()``, in :meth:`stats` or in errors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from .secret import lock, wipe

__all__ = ["KeyCache"]


class KeyCache:
    """(name, version) -> (locked 32-byte buffer, confirmed-at); name -> (current
    version, confirmed-at).  ``ttl``: seconds an entry lives without the backend
    confirming it (0: for ever); ``revalidate``: age after which it is confirmed
    again on use (default a quarter of ``ttl``; at most ``ttl``)."""

    def __init__(self, ttl: float = 0.0, revalidate: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        if revalidate is None:
            revalidate = ttl / 4
        if ttl and not 0 < revalidate <= ttl:
            raise ValueError("revalidate must be more than 0 and at most ttl")
        self.ttl = float(ttl)
        self.revalidate = float(revalidate) if ttl else 0.0
        self._clock = clock
        self._mu = threading.Lock()
        self._keys: dict[tuple[str, int], tuple[bytearray, float]] = {}
        self._current: dict[str, tuple[int, float]] = {}

    # ages ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def stale(self, age: float) -> bool:
        """Due for revalidation (never with ``ttl == 0``)."""
        return bool(self.ttl) and age >= self.revalidate

    def expired(self, age: float) -> bool:
        """Past its lifetime: to be dropped unless the backend confirms it now."""
        return bool(self.ttl) and age >= self.ttl

    # keys ---------------------------------------------------------------------------
    def lookup(self, name: str, version: int) -> tuple[bytearray, float] | None:
        """A locked copy of the key (the caller wipes it) and its age, or None."""
        with self._mu:
            e = self._keys.get((name, version))
            if e is None:
                return None
            out = bytearray(e[0])
            lock(out)
            return out, self._clock() - e[1]

    def store(self, name: str, version: int, key: bytearray | bytes) -> None:
        """Keep a copy of ``key`` (the caller keeps and wipes its own), confirmed now."""
        buf = bytearray(key)
        lock(buf)
        with self._mu:
            old = self._keys.pop((name, version), None)
            self._keys[(name, version)] = (buf, self._clock())
        if old is not None:
            wipe(old[0])

    def confirm(self, name: str, active: Iterable[int], current: int) -> list[int]:
        """The backend answered for ``name``: ``active`` versions exist and ``current``
        is the current one.  Those entries count as confirmed now, the others of the
        name are dropped (wiped); returns the versions dropped."""
        keep = set(active)
        now = self._clock()
        dropped: list[tuple[str, int, bytearray]] = []
        with self._mu:
            for (n, v), (buf, _at) in list(self._keys.items()):
                if n != name:
                    continue
                if v in keep:
                    self._keys[(n, v)] = (buf, now)
                else:
                    del self._keys[(n, v)]
                    dropped.append((n, v, buf))
            self._current[name] = (current, now)
        for _n, _v, buf in dropped:
            wipe(buf)
        return [v for _n, v, _b in dropped]

    def drop(self, name: str, version: int | None = None) -> int:
        """Drop (wipe) one version, or every version and the current memo of ``name``."""
        with self._mu:
            gone = [k for k in self._keys if k[0] == name and version in (None, k[1])]
            bufs = [self._keys.pop(k)[0] for k in gone]
            if version is None:
                self._current.pop(name, None)
        for b in bufs:
            wipe(b)
        return len(bufs)

    # current versions ---------------------------------------------------------------
    def current(self, name: str) -> tuple[int, float] | None:
        """(version, age) of the current-version memo, or None."""
        with self._mu:
            e = self._current.get(name)
            return None if e is None else (e[0], self._clock() - e[1])

    def set_current(self, name: str, version: int) -> None:
        with self._mu:
            self._current[name] = (version, self._clock())

    # upkeep -------------------------------------------------------------------------
    def due(self) -> list[str]:
        """Names with an entry or a memo due for revalidation (sorted)."""
        if not self.ttl:
            return []
        now = self._clock()
        with self._mu:
            names = {n for (n, _v), (_b, at) in self._keys.items()
                     if now - at >= self.revalidate}
            names |= {n for n, (_v, at) in self._current.items() if now - at >= self.revalidate}
        return sorted(names)

    def expire(self) -> list[tuple[str, int]]:
        """Drop (wipe) every entry past ``ttl``, and current-version memos past it;
        returns the (name, version) of the keys dropped."""
        if not self.ttl:
            return []
        now = self._clock()
        with self._mu:
            gone = [k for k, (_b, at) in self._keys.items() if now - at >= self.ttl]
            bufs = [self._keys.pop(k)[0] for k in gone]
            for n in [n for n, (_v, at) in self._current.items() if now - at >= self.ttl]:
                del self._current[n]
        for b in bufs:
            wipe(b)
        return sorted(gone)

    def clear(self) -> None:
        with self._mu:
            bufs = [b for b, _at in self._keys.values()]
            self._keys.clear()
            self._current.clear()
        for b in bufs:
            wipe(b)

    def names(self) -> set[str]:
        with self._mu:
            return {n for n, _v in self._keys} | set(self._current)

    def stats(self) -> dict[str, object]:
        """Counts and ages only, never material."""
        now = self._clock()
        with self._mu:
            ages = [now - at for _b, at in self._keys.values()]
            return {"entries": len(self._keys), "names": len({n for n, _v in self._keys}),
                    "oldest_age": round(max(ages), 3) if ages else None,
                    "ttl": self.ttl, "revalidate": self.revalidate}

    def __len__(self) -> int:
        with self._mu:
            return len(self._keys)

    def __repr__(self) -> str:
        return f"<KeyCache {len(self)} keys ttl={self.ttl:g}s>"

    def __reduce__(self) -> object:
        raise TypeError("KeyCache objects cannot be pickled")
