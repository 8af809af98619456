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
    def set_hints(self, hints: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...
