"""Small helpers for holding secrets in memory.

Python gives no hard guarantees about memory hygiene: immutable ``bytes`` objects
(for example the outputs of ``cryptography``'s KDFs, or the copies that library
makes internally) cannot be zeroed and may linger until the allocator reuses them.
What this module does is the best effort that is possible in pure Python:

* secrets that *we* own live in mutable ``bytearray`` buffers, and
* those buffers are overwritten with zeros (:func:`wipe`) as soon as they are no
  longer needed, instead of waiting for the garbage collector.

:class:`Secret` wraps such a buffer so that it never shows up in ``repr()``,
``str()``, tracebacks, logs or pickles.
"""

from __future__ import annotations

import hmac
from typing import Any

__all__ = ["Secret", "wipe"]


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite a mutable buffer with zeros in place.

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


class Secret:
    """A secret byte string held in a wipeable ``bytearray``.

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

    @classmethod
    def take(cls, buf: bytearray) -> "Secret":
        """Adopt ``buf`` (no copy). The Secret now owns and will wipe it."""
        if not isinstance(buf, bytearray):
            raise TypeError("Secret.take() needs a bytearray")
        s = cls.__new__(cls)
        s._buf = buf
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
        """A new bytearray with the secret's bytes (the caller must wipe it)."""
        return bytearray(self.value)

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
