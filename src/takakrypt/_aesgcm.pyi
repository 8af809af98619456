"""Batched AES-256-GCM over fixed-size blocks (native: src/_native/aesgcm.pyx + aesgcm_impl.c).

Stored layout
-------------
A plaintext of length ``L`` is split into ``ceil(L / block_size)`` blocks; only the last
may be partial, and no block is empty (``L == 0`` gives zero blocks).  Block ``i`` is
stored as ``nonce(12) ‖ ciphertext(n_i) ‖ tag(16)``, stored blocks back to back (stored
block ``i`` starts at ``i * (block_size + 28)``), with

    AAD_i = aad_prefix ‖ uint64_le(first_block + i)

so a block cannot be moved to another index, or to another file/prefix, without
failing authentication.  Each stored block is exactly what pyca/cryptography's
``nonce + AESGCM(key).encrypt(nonce, block, AAD_i)`` returns.

TAKA v2 (``BlockCipher(key, block_version=v)``, v >= 1): block ``i`` is stored as
``nonce(12) ‖ ciphertext(n_i) ‖ tag(12) ‖ uint32_le(v)`` (the same 28-byte stride) with

    AAD_i = aad_prefix ‖ uint64_le(first_block + i) ‖ uint32_le(v)

and the 96-bit tag is the first 12 bytes of the full GCM tag.  Decrypting a stored
block of another version raises ``takakrypt.errors.BlockVersionMismatch`` (an
``IntegrityError`` with ``.block`` and ``.version``); the blocks before it are
decrypted into ``out``, which is left as it was from that block on.

An all-zero stored block is reserved for sparse holes: random nonces are never all
zero, and ``holes=True`` on decryption maps such a block to zeros without a tag check.

Buffers
-------
Every data argument accepts any C-contiguous buffer (bytes, bytearray, memoryview,
mmap, numpy arrays of any dtype: their raw bytes are used).  ``out`` must be writable.
A non-contiguous or read-only-where-writable-needed buffer raises ``ValueError``; a
non-buffer object raises ``TypeError``.  ``out`` must not overlap the inputs
(``ValueError``).

Threads
-------
One ``BlockCipher`` may be used by many threads at once.  For batches of at least
16 KiB of input the GIL is released (once) during the crypto; smaller batches keep it
(they take about a microsecond).  While a call runs without the GIL, another thread
writing into the same input/output buffers only garbles that data (no memory error).

Key memory
----------
The ipsec-mb key schedule lives in secure memory (src/_native/secmem.h): locked
against swap (``mlock``; an unprivileged process over ``RLIMIT_MEMLOCK`` goes on
unlocked and counts it in ``secure_memory_stats()["lock_failures"]``), excluded from
core dumps (``MADV_DONTDUMP``), zeroed in a ``fork()``ed child (``MADV_WIPEONFORK``)
and wiped on free.  A cipher inherited across ``fork()`` therefore raises
``RuntimeError`` in the child: create it again there.  The OpenSSL engine's schedule
is allocated by OpenSSL and has none of this (docs/keys.md, "Keys in memory").

Errors
------
``ValueError`` for every bad argument and for use after ``wipe()`` (message
``"cipher wiped"``); ``takakrypt.errors.IntegrityError`` (``.block`` = absolute block
index) when a tag does not verify; ``OSError`` if getrandom(2) fails;
``RuntimeError`` for a cipher used in a child it was inherited by across ``fork()``.
"""

from types import TracebackType
from typing import Final, Literal

from typing_extensions import Buffer

NONCE_SIZE: Final[int]  # 12
TAG_SIZE: Final[int]  # 16
TAG_SIZE_V2: Final[int]  # 12: TAKA v2 blocks (``block_version=``), then a u32 version
OVERHEAD: Final[int]  # 28 = NONCE_SIZE + TAG_SIZE per stored block
MAX_AAD_PREFIX: Final[int]  # 256

EngineName = Literal["ipsecmb", "openssl"]

def secure_memory_stats() -> dict[str, int]:
    """Counters of the secure memory holding key schedules in this process:
    ``chunks``, ``bytes_mapped``, ``bytes_locked``, ``lock_failures`` (chunks used
    unlocked because ``mlock`` was refused), ``advise_failures`` (chunks without
    ``MADV_DONTDUMP``/``MADV_WIPEONFORK``), ``in_use`` (live allocations)."""

def scrub_stack() -> None:
    """Zero the vector registers and 64 KiB of this thread's C stack below the
    caller's depth: the copies of keys that a key derivation or unwrap just called from
    Python left there (registers would be spilled to the stack later)."""

def _set_secure_memory(on: bool) -> None:
    """Benchmarks only: ``False`` puts the schedules of ciphers made afterwards on the
    plain heap (to measure what secure memory costs); ``True`` restores the default."""

def _secure_peek(addr: int, n: int) -> bytes | None:
    """Test hook: the ``n`` bytes at ``addr`` if they lie in mapped secure memory."""

def engines() -> list[EngineName]:
    """Engines usable in this process, preferred first, e.g. ``["ipsecmb", "openssl"]``.

    ``"ipsecmb"`` (intel-ipsec-mb direct GCM API, the fast default) is missing when the
    library cannot initialise on this CPU; ``"openssl"`` (EVP, the reference path) is
    always present.
    """

class BlockCipher:
    """AES-256-GCM over blocks of ``block_size`` plaintext bytes.

    Use as a context manager (``__exit__`` wipes) or call ``wipe()``; deallocation
    also wipes.  Not picklable.
    """

    @property
    def engine(self) -> EngineName:
        """The engine in use (read-only)."""
    @property
    def block_size(self) -> int:
        """Plaintext bytes per block (read-only)."""
    @property
    def block_version(self) -> int | None:
        """TAKA v2 key version of the blocks it seals and opens; None: v1 blocks."""

    def __init__(
        self,
        key: Buffer,
        *,
        block_size: int = 4096,
        engine: Literal["auto", "ipsecmb", "openssl"] = "auto",
        block_version: int | None = None,
    ) -> None:
        """Expand ``key`` (exactly 32 bytes, any buffer) for ``engine``.

        ``block_size`` must be a power of two in [512, 1 MiB].  ``engine="auto"`` picks
        the first of ``engines()``.  Raises ``ValueError`` for a wrong key length, bad
        block size, unknown or unavailable engine.  The key bytes are not retained;
        only the engine's key schedule is, until ``wipe()``.
        """

    def encrypt_into(
        self,
        plaintext: Buffer,
        out: Buffer,
        aad_prefix: Buffer,
        first_block: int,
        nonces: Buffer | None = None,
    ) -> int:
        """Encrypt ``plaintext`` into ``out``; return bytes written (``L + nblocks*28``).

        ``out`` needs at least that many bytes (``ValueError`` otherwise); bytes beyond
        are untouched.  ``aad_prefix``: at most 256 bytes.  ``first_block``: absolute
        index of the first block, ``0 <= first_block`` and ``first_block + nblocks - 1
        < 2**64`` (``ValueError`` otherwise).

        ``nonces=None``: fresh random nonces, one getrandom(2) call per batch, never
        all-zero.  Otherwise exactly ``nblocks * 12`` bytes used in order (test vectors;
        never reuse a nonce with the same key).
        """
    def encrypt(
        self,
        plaintext: Buffer,
        aad_prefix: Buffer,
        first_block: int,
        nonces: Buffer | None = None,
    ) -> bytes:
        """Like ``encrypt_into`` but returns a new exact-size ``bytes``."""
    def decrypt_into(
        self,
        ciphertext: Buffer,
        out: Buffer,
        aad_prefix: Buffer,
        first_block: int,
        *,
        holes: bool = False,
    ) -> int:
        """Decrypt stored blocks into ``out``; return plaintext bytes written.

        ``ciphertext`` is cut into stored blocks of ``block_size + 28`` bytes; the last
        may be shorter but must be at least 29 bytes (``ValueError`` naming the absolute
        block otherwise).  ``out`` needs ``len(ciphertext) - nblocks*28`` bytes.

        On a tag failure raises ``IntegrityError("block N failed authentication",
        block=N)`` for the first failing absolute block N: blocks before it are
        decrypted in ``out``, and ``out`` is zeroed from block N's offset to the end of
        this call's plaintext region, so no unauthenticated plaintext is left behind.

        ``holes=True``: a stored block that is entirely zero bytes decrypts to
        ``len - 28`` zero bytes without a tag check (sparse file hole).
        """
    def decrypt(
        self,
        ciphertext: Buffer,
        aad_prefix: Buffer,
        first_block: int,
        *,
        holes: bool = False,
    ) -> bytes:
        """Like ``decrypt_into`` but returns a new exact-size ``bytes``."""
    def wipe(self) -> None:
        """Wipe (explicit_bzero/OPENSSL_cleanse) and free the key schedule.

        Idempotent.  Every later call raises ``ValueError("cipher wiped")``.  Calls
        already running in other threads finish first; the memory is freed when the
        last of them returns.
        """
    def _key_area(self) -> tuple[int, int] | None:
        """Test hook: ``(address, size)`` of the ipsec-mb key schedule, ``None`` for
        the OpenSSL engine or a wiped cipher."""
    def __enter__(self) -> "BlockCipher": ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...
