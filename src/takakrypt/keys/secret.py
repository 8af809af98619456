"""Small helpers for holding secrets in memory.

Python gives no hard guarantees about memory hygiene: immutable ``bytes`` objects
(for example the outputs of ``cryptography``'s KDFs, or the copies that library
makes internally) cannot be zeroed and may linger until the allocator reuses them.
What this module does is the best effort that is possible in pure Python:

* secrets that *we* own live in mutable ``bytearray`` buffers,
* the pages under those buffers are locked against swap and left out of core dumps
  (:func:`lock`: ``mlock`` + ``MADV_DONTDUMP``, counted per page, released by
  :func:`wipe`), and
* those buffers are overwritten with zeros (:func:`wipe`) as soon as they are no
  longer needed, instead of waiting for the garbage collector.

Locking is page-granular and the pages are shared with other Python objects, which
are then locked and undumped too (harmless).  It fails soft: when ``RLIMIT_MEMLOCK``
refuses (an unprivileged user over the limit) the buffer is used unlocked and
:func:`lock_stats` counts it.  ``MADV_WIPEONFORK`` is not applied here: it would zero
the unrelated objects on the page in a child.  See docs/keys.md, "Keys in memory".

:class:`Secret` wraps such a buffer so that it never shows up in ``repr()``,
``str()``, tracebacks, logs or pickles.
"""

from __future__ import annotations

import ctypes
import hmac
import mmap
import threading
from typing import Any

__all__ = ["Secret", "lock", "lock_stats", "random_secret", "scrub_stack", "wipe"]

_MADV_DODUMP, _MADV_DONTDUMP = 17, 16


class _PageLocks:
    """mlock + MADV_DONTDUMP on the pages under registered buffers, counted per page
    (two secrets on one page: the page stays locked until both are wiped)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._pages: dict[int, int] = {}           # page address -> buffers on it
        self._bufs: dict[int, tuple[int, int]] = {}  # buffer address -> (first, npages)
        self.failures = 0
        self._libc: Any = None
        self._page = mmap.PAGESIZE
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            for fn in (self._libc.mlock, self._libc.munlock, self._libc.madvise):
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + (
                    [ctypes.c_int] if fn is self._libc.madvise else [])
        except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
            self._libc = None

    @staticmethod
    def _address(buf: bytearray) -> int:
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        try:
            return ctypes.addressof(view)
        finally:
            del view  # drop the export: the bytearray stays resizable

    def lock(self, buf: bytearray) -> bool:
        if self._libc is None or not isinstance(buf, bytearray) or not buf:
            return False
        addr = self._address(buf)
        first = addr - addr % self._page
        npages = (addr + len(buf) - first + self._page - 1) // self._page
        with self._mu:
            if addr in self._bufs:  # a stale entry (freed unwiped) or locked twice
                return True
            ok = True
            for i in range(npages):
                page = first + i * self._page
                if self._pages.get(page, 0) == 0:
                    if self._libc.mlock(page, self._page) != 0:
                        ok = False
                    self._libc.madvise(page, self._page, _MADV_DONTDUMP)
                self._pages[page] = self._pages.get(page, 0) + 1
            self._bufs[addr] = (first, npages)
            if not ok:
                self.failures += 1
            return ok

    def release(self, buf: bytearray) -> None:
        if self._libc is None or not buf:
            return
        addr = self._address(buf)
        with self._mu:
            entry = self._bufs.pop(addr, None)
            if entry is None:
                return
            first, npages = entry
            for i in range(npages):
                page = first + i * self._page
                left = self._pages.pop(page, 1) - 1
                if left > 0:
                    self._pages[page] = left
                else:
                    self._libc.munlock(page, self._page)
                    self._libc.madvise(page, self._page, _MADV_DODUMP)

    def stats(self) -> dict[str, int]:
        with self._mu:
            return {"buffers": len(self._bufs), "pages": len(self._pages),
                    "lock_failures": self.failures}


_locks = _PageLocks()


def lock(buf: bytearray) -> bool:
    """Lock the pages under ``buf`` in memory and leave them out of core dumps until
    :func:`wipe` (best effort; False if ``mlock`` was refused or is unavailable).
    ``buf`` must not be resized while locked (resizing can move it)."""
    return _locks.lock(buf)


def lock_stats() -> dict[str, int]:
    """``buffers`` and ``pages`` locked right now, ``lock_failures`` so far."""
    return _locks.stats()


def scrub_stack() -> None:
    """Zero the C stack below the caller, where ``cryptography``/OpenSSL just left
    copies of a key (an AEAD or KDF set-up); a no-op without the native module."""
    try:
        from .._aesgcm import scrub_stack as scrub
    except ImportError:  # pragma: no cover - the extension is part of the build
        return
    scrub()


def random_secret(n: int) -> bytearray:
    """``n`` random bytes read straight into a locked bytearray (``os.urandom`` would
    leave an unwipeable ``bytes`` copy behind); the caller wipes it."""
    buf = bytearray(n)
    lock(buf)
    with open("/dev/urandom", "rb", buffering=0) as f:
        mv = memoryview(buf)
        try:
            while mv:
                mv = mv[f.readinto(mv):]
        finally:
            mv.release()
    return buf


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite a mutable buffer with zeros in place (and release a :func:`lock`).

    ``None`` and empty buffers are accepted (no-op), so ``finally: wipe(x)`` works
    even when ``x`` was never filled.  Immutable ``bytes`` are refused with
    ``TypeError`` because they cannot be wiped and passing one is a bug.
    """
    if buf is None:
        return
    if isinstance(buf, bytes):
        raise TypeError("cannot wipe immutable bytes; keep secrets in a bytearray")
    mv = memoryview(buf)
    try:
        if mv.readonly:
            raise TypeError("cannot wipe a read-only buffer")
        n = mv.nbytes
        if n:
            mv.cast("B")[:] = bytes(n)
    finally:
        mv.release()
    if isinstance(buf, bytearray):
        _locks.release(buf)


class Secret:
    """A secret byte string held in a wipeable ``bytearray``.

    * The buffer's pages are locked and left out of core dumps (:func:`lock`).
    * ``Secret(data)`` copies ``data`` into a fresh buffer; if ``data`` is a
      ``bytearray`` the caller keeps ownership of (and must wipe) the original.
      ``Secret.take(buf)`` adopts the bytearray without copying.
    * ``value`` returns the live buffer (not a copy): do not keep references to it
      beyond the lifetime of the Secret.
    * :meth:`wipe` zeroes the buffer; afterwards ``value`` raises ``ValueError``.
      It is also called by ``__exit__`` and, as a last resort, by ``__del__``.
    * ``repr()``/``str()`` show only the length; pickling is refused; equality is
      constant-time.
    """

    __slots__ = ("_buf", "__weakref__")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf: bytearray | None = bytearray(data)
        lock(self._buf)

    @classmethod
    def take(cls, buf: bytearray) -> "Secret":
        """Adopt ``buf`` (no copy). The Secret now owns and will wipe it."""
        if not isinstance(buf, bytearray):
            raise TypeError("Secret.take() needs a bytearray")
        s = cls.__new__(cls)
        s._buf = buf
        lock(buf)
        return s

    @property
    def value(self) -> bytearray:
        if self._buf is None:
            raise ValueError("secret has been wiped")
        return self._buf

    @property
    def wiped(self) -> bool:
        return self._buf is None

    def copy(self) -> bytearray:
        """A new, locked bytearray with the secret's bytes (the caller must wipe it)."""
        out = bytearray(self.value)
        lock(out)
        return out

    def wipe(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            wipe(buf)

    def __len__(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def __enter__(self) -> "Secret":
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        if self._buf is None or other._buf is None:
            return False
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._buf is None:
            return "<Secret wiped>"
        return f"<Secret {len(self._buf)} bytes>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("Secret objects cannot be pickled")
