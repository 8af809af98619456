"""Guard point data path (native: src/_native/fuse.pyx over fuse_impl.c, fuse_ops.c,
fuse_inode.c, fuse_taka.c on the libfuse3 low-level API).  Use takakrypt.guard.

Contract
--------
``Mount(...).mount()`` opens the backing directory (before mounting, so an in-place
guard point still reaches the files it covers), mounts with
``default_permissions,allow_other``, starts ``threads`` FUSE workers in C and returns
once the kernel's INIT was answered.  Every operation is checked by policy: a
decision cache hit needs no Python; a miss calls ``decide`` with the GIL, or, with
``ring`` (a ``takakrypt._ring.Ring``), sends a TAKA POLICY_CHECK v2 request over the
ring from C and waits up to ``ring_timeout_ms`` for the answer without the GIL (rename
and link still call ``decide``; ``decide`` None denies them).  Every ring failure
(timeout, closed ring, non-SUCCESS status, malformed answer) denies and is audited.
The Mount keeps a reference to the ring for its lifetime.

Callbacks run on engine threads and MUST be thread-safe; they MUST NOT access the
mount themselves.  An exception in ``decide`` denies (EACCES), in ``get_key`` fails
the file (EIO), in ``audit`` is ignored; the message is kept in
``last_callback_error``.  After interpreter shutdown has begun, callbacks deny without
touching Python.  ``unmount()`` is idempotent; clients still holding files get
ENOTCONN (the connection is aborted after a short grace period).

Live rekey (docs/guard-points.md, "Live rekey (data path)")
-----------------------------------------------------------
``rekey_file(relpath, *, version=0, rate=0, chunk_blocks=256)`` re-encrypts one regular
file of the mounted guard point (``relpath`` relative to the backing directory, no
leading ``/``, no ``.``/``..``/empty components) to ``version`` of the key its header
names (0: the current version, as new files get it) while applications keep using it,
and returns ``(outcome, bytes_written)`` (bytes the copy wrote, not the application
writes it mirrored into the copy meanwhile); outcome is one of :data:`REKEY_OUTCOMES`:
``"done"`` (the copy is swapped in, open descriptors follow it), ``"current"`` (at the
target version or newer: nothing written), ``"skipped-hardlink"``,
``"skipped-not-regular"``, ``"busy"`` (renamed, restored raw, a raw writer, too hot or a
handover: try again later), ``"cancelled"`` (``rekey_cancel()`` or unmount: the original
untouched, the temporary removed).  Raises OSError: EIO for a header or block that does
not verify (nothing written; an ``integrity`` audit event), ENOKEY for a key that cannot
be got, ENOENT for a file that is gone, EINVAL for a bad path.  ``rate``: bytes of
ciphertext per second (0: unlimited), slept without a lock; ``chunk_blocks``: blocks per
read-lock hold (at most 8 MiB of stored blocks).  Blocks the calling thread with the GIL
released (it calls ``get_key``); MUST NOT be called from a callback.  Thread-safe.
``rekey_cancel(on=True)`` sets (``False`` clears) the flag that stops running and new
rekeys; ``backing_fd()`` returns a new descriptor of the backing directory.
"""

from collections.abc import Callable
from typing import Any

from takakrypt._ring import Ring

PERMIT: int
DENY: int
APPLY_KEY: int
AUDIT: int
WOULD_DENY: int
ANY_PATH: int
HINT_PLAIN_ONLY: int
HINT_GETATTR_ALL: int
ACTIONS: tuple[str, ...]
PROTOCOL_ACTIONS: dict[str, int]   # action name -> enum takakrypt_action code
RING_TIMEOUT_MS: int               # 5000, TAKAKRYPT_TIMEOUT_MS
REKEY_OUTCOMES: tuple[str, ...]    # "done", "current", "skipped-hardlink", ...

class Mount:
    mountpoint: str
    backing: str
    key_name: str
    last_callback_error: str | None
    ring: Ring | None
    ring_timeout_ms: int
    def __init__(
        self,
        mountpoint: str,
        backing: str | None,
        key_name: str,
        decide: Callable[[int, int, int, str, str], tuple[int, int, int, float]] | None,
        get_key: Callable[[str, int | None], tuple[int, bytes | bytearray]],
        audit: Callable[[str, int, int, int, str, str, int, str, int, int, int], None]
        | None = ...,
        *,
        threads: int = ...,
        cache_entries: int = ...,
        debug: bool = ...,
        ring: Ring | None = ...,
        ring_timeout_ms: int = ...,
    ) -> None: ...
    def mount(self) -> None: ...
    def unmount(self) -> None: ...
    @property
    def is_mounted(self) -> bool: ...
    def bump_generation(self) -> int: ...
    def invalidate(self) -> None: ...
    def drop_keys(self) -> None: ...
    def rekey_file(self, relpath: str, *, version: int = 0, rate: int = 0,
                   chunk_blocks: int = 256) -> tuple[str, int]: ...
    def rekey_cancel(self, on: bool = True) -> None: ...
    def backing_fd(self) -> int: ...
    def set_hints(self, hints: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...
