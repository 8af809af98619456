"""Random access to TAKA files: read and write any byte range at any offset.

`TakaFile` works on a file descriptor with pread/pwrite and keeps only the header in
memory.  Block crypto is the native batched AES-256-GCM (`takakrypt._aesgcm`), by key
version through `filekeys.FileKeys`; this module only does the geometry.  The FUSE data
path implements the same rules in C.

Version 2 files (docs/file-format.md, "Version 2"): opened with ``write_version`` newer
than the header's, a writer moves the file to it before its first block encryption
(one header write); every block it rewrites from then on is sealed under the new
version, the others keep theirs.

Ordering rules that keep a crash from ever yielding wrong bytes (docs/file-format.md):
growing writes store the blocks first and the header (with the new size) last;
shrinking stores the header first.  Readers ignore stored bytes beyond the header's
size, and never use stale bytes past the size when they merge a partial block.
"""

from __future__ import annotations

import logging
import os
from . import format as fmt
from .errors import FormatError, IntegrityError, KeyUsageExhausted
from .filekeys import FileKeys, KeyLookup, single_key

__all__ = ["KeyLookup", "TakaFile"]
log = logging.getLogger(__name__)


class TakaFile:
    """An open TAKA file. Not thread-safe; one object per opener.

    Use :meth:`create` or :meth:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, fd: int, header: fmt.Header, keys: KeyLookup, *, owns_fd: bool,
                 writable: bool, write_version: int | None = None) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._writable = writable
        self.header = header
        self._keys: FileKeys | None = FileKeys(header, keys)
        self._bs = header.block_size
        self._sbs = header.stored_block_size
        # the whole lease in the header counts as used: it may have been, before a crash
        self._enc_used = header.encryptions
        # v2: the version to move the file to before its next block encryption
        self._move_to = (write_version if header.version == 2 and write_version
                         and write_version > header.key_version else None)

    # construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str] | int, key_id: str, key_version: int,
               data_key: bytearray, *, block_size: int = fmt.DEFAULT_BLOCK_SIZE,
               exclusive: bool = True, mode: int = 0o600,
               format_version: int = fmt.VERSION) -> TakaFile:
        """Create an empty TAKA file (``path`` may also be an open read-write fd)."""
        header = fmt.Header(key_id=key_id, key_version=key_version, block_size=block_size,
                            encryptions=fmt.NONCE_CHUNK, version=format_version)
        if isinstance(path, int):
            fd, owns = path, False
            os.ftruncate(fd, 0)
        else:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            flags |= os.O_EXCL if exclusive else os.O_TRUNC
            fd, owns = os.open(path, flags, mode), True
        try:
            f = cls(fd, header, single_key(key_id, key_version, data_key), owns_fd=owns,
                    writable=True)
            f._enc_used = 0  # a new file key: its first lease is unused
            f._write_header()
        except BaseException:
            if owns:
                os.close(fd)
            raise
        return f

    @classmethod
    def open(cls, path: str | os.PathLike[str] | int, keys: KeyLookup, *,
             writable: bool = False, write_version: int | None = None) -> TakaFile:
        """Open an existing TAKA file; ``keys(name, version)`` returns the data key.

        ``write_version`` (v2 files): the key's current version; if it is newer than the
        file's, blocks written from now on use it. Raises FormatError for a malformed
        header, IntegrityError when the header tag does not verify, and whatever
        ``keys`` raises for a missing key.
        """
        if isinstance(path, int):
            fd, owns = path, False
        else:
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            fd, owns = os.open(path, flags), True
        try:
            header = fmt.parse_header(os.pread(fd, fmt.HEADER_SIZE, 0))
            f = cls(fd, header, keys, owns_fd=owns, writable=writable,
                    write_version=write_version)
            try:
                header.verify(f._fk.mac_key)
            except BaseException:
                f._fk.wipe()  # the fd is closed below
                raise
        except BaseException:
            if owns:
                os.close(fd)
            raise
        return f

    @property
    def _fk(self) -> FileKeys:
        if self._keys is None:
            raise ValueError("TAKA file is closed")
        return self._keys

    def close(self) -> None:
        if self._keys is not None:
            self._keys.wipe()
            self._keys = None
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> TakaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # queries ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.header.plaintext_size

    def fileno(self) -> int:
        return self._fd

    # reading ------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset+length), clipped at the end of the file."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        first, last = offset // self._bs, (end - 1) // self._bs
        plain = self._read_blocks(first, last)
        start = offset - first * self._bs
        return bytes(plain[start:start + end - offset])

    def _read_blocks(self, first: int, last: int) -> bytearray:
        """Decrypt blocks first..last (inclusive; all below the size) into a bytearray."""
        size, bs = self.size, self._bs
        want_end = min((last + 1) * bs, size)  # plaintext end needed
        nfull = last - first  # blocks before the last one are always full
        last_plain = want_end - last * bs
        # The last block may be stored longer than the size implies (crash leftovers):
        # read up to a full stored block and ignore the excess.
        span = nfull * self._sbs + self._sbs
        raw = os.pread(self._fd, span, self.header.block_offset(first))
        need = nfull * self._sbs + last_plain + fmt.OVERHEAD
        if len(raw) < need:
            missing = first + len(raw) // self._sbs
            raise IntegrityError(f"file truncated: block {missing} is missing or short",
                                 block=missing)
        out = bytearray(nfull * bs + max(len(raw) - nfull * self._sbs - fmt.OVERHEAD,
                                         last_plain))
        try:
            self._fk.decrypt_into(memoryview(raw)[:need], out, first)
        except IntegrityError as e:
            # After a crash in the middle of a growing write, the last block may be
            # stored longer than the old size implies (header not yet updated): its
            # only other possible length is everything up to a full stored block.
            if e.block != last or len(raw) <= need:
                raise
            self._fk.decrypt_into(memoryview(raw)[nfull * self._sbs:],
                                  memoryview(out)[nfull * bs:], last)
        del out[nfull * bs + last_plain:]
        return out

    # writing ------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (any offset; a gap past the end reads as zeros)."""
        self._check_writable()
        data = memoryview(data).cast("B")
        n = len(data)
        if offset < 0:
            raise ValueError("negative offset")
        if n == 0:
            return 0
        end = offset + n
        if end > fmt.MAX_PLAINTEXT_SIZE:
            raise FormatError("write beyond the maximum file size")
        bs, old = self._bs, self.size
        first, last = offset // bs, (end - 1) // bs
        # A partial last block before a gap must be zero-extended to the block end first.
        old_last = (old - 1) // bs if old else -1
        extend = bool(old % bs) and old_last < first
        self._reserve(last - first + 1 + extend)  # before anything changes
        if end > old:
            self._drop_stale_tail()
        if extend:
            self._rewrite_block(old_last, bs)
        block_end = min((last + 1) * bs, max(old, end))
        buf = bytearray(block_end - first * bs)
        # Merge existing plaintext at the partial edges; never bytes past the old size.
        head = offset % bs != 0 and first * bs < old
        if head:
            plain = self._read_blocks(first, first)
            buf[:len(plain)] = plain
        if end < min((last + 1) * bs, old) and not (head and last == first):
            plain = self._read_blocks(last, last)
            base = (last - first) * bs
            buf[base:base + len(plain)] = plain
        buf[offset - first * bs:end - first * bs] = data
        self._store_blocks(first, buf)
        if end >= old:  # the last block was rewritten: cut any longer stale copy of it
            want = fmt.stored_size(end, bs)
            if self._physical_size() > want:
                os.ftruncate(self._fd, want)
        if end > old:
            self.header.plaintext_size = end
            self._write_header()
        return n

    def truncate(self, size: int) -> None:
        """Set the plaintext size; growing adds zeros (a hole), shrinking drops data."""
        self._check_writable()
        if size < 0 or size > fmt.MAX_PLAINTEXT_SIZE:
            raise ValueError(f"invalid size {size}")
        old, bs = self.size, self._bs
        if size == old:
            return
        if (size < old and size % bs) or (size > old and old % bs):
            self._reserve(1)  # the new (or old) partial last block is re-encrypted
        if size < old:
            self.header.plaintext_size = size  # header first when shrinking
            if size == 0:  # no block is left: none of an older version either
                self.header.oldest_version = self.header.key_version
            self._write_header()
            if size % bs:
                k = size // bs
                keep = self._read_blocks_at_size(k, old, size)
                self._store_blocks(k, keep)
            os.ftruncate(self._fd, fmt.stored_size(size, bs))
        else:
            self._drop_stale_tail()
            if old % bs:
                k = (old - 1) // bs
                self._rewrite_block(k, min(bs, size - k * bs))
            # the rest is a hole: extend the stored length without writing anything
            os.ftruncate(self._fd, fmt.stored_size(size, bs))
            self.header.plaintext_size = size
            self._write_header()

    def _drop_stale_tail(self) -> None:
        """Cut stored bytes past the size (left by a crash) before the file grows, so
        stale blocks can never reappear as data inside the new size."""
        phys = self._physical_size()
        if self.size == 0:
            want = fmt.HEADER_SIZE
        else:  # keep the last block whole even if it is stored longer than the size needs
            start = self.header.block_offset((self.size - 1) // self._bs)
            want = start + min(max(phys - start, 0), self._sbs)
        if phys > want:
            os.ftruncate(self._fd, want)

    def _read_blocks_at_size(self, k: int, old: int, size: int) -> bytearray:
        saved = self.header.plaintext_size
        self.header.plaintext_size = old
        try:
            plain = self._read_blocks(k, k)
        finally:
            self.header.plaintext_size = saved
        return plain[: size - k * self._bs]

    def _rewrite_block(self, k: int, new_len: int) -> None:
        """Re-encrypt block k zero-extended to ``new_len`` plaintext bytes."""
        plain = self._read_blocks(k, k)
        plain.extend(bytes(new_len - len(plain)))
        self._store_blocks(k, plain)

    def _reserve(self, n: int) -> None:
        """Count n block encryptions against the header's lease, writing a new lease
        first when it is used up; refuse past the hard limit (docs/file-format.md).
        A v2 file due to move to a newer key version moves here: a new file key, so a
        new count, and the header (under the new version's MAC key) goes first."""
        if self._move_to is not None:
            self._move_version(self._move_to)
        if self._enc_used + n <= self.header.encryptions:
            self._enc_used += n
            return
        if self._enc_used + n > fmt.NONCE_HARD_LIMIT:
            raise KeyUsageExhausted(f"file key used up ({self._enc_used} block encryptions, "
                                    f"limit {fmt.NONCE_HARD_LIMIT}): copy the file to re-key it")
        lease = self.header.encryptions
        self.header.encryptions = min(self._enc_used + n + fmt.NONCE_CHUNK, fmt.NONCE_HARD_LIMIT)
        try:
            self._write_header()
        except BaseException:
            self.header.encryptions = lease
            raise
        if self.header.encryptions > fmt.NONCE_SOFT_LIMIT:
            log.warning("TAKA file %s: %d block encryptions under its key, limit %d: copy the "
                        "file to re-key it", self.header.file_id.hex(), self._enc_used,
                        fmt.NONCE_HARD_LIMIT)
        self._enc_used += n

    def _move_version(self, version: int) -> None:
        h = self.header
        saved = (h.key_version, h.encryptions, h.oldest_version)
        if h.plaintext_size == 0:
            h.oldest_version = version
        self._fk.set_write_version(version)
        h.encryptions = fmt.NONCE_CHUNK
        try:
            self._write_header()
        except BaseException:
            h.key_version, h.encryptions, h.oldest_version = saved
            raise
        self._move_to = None
        self._enc_used = 0

    def _store_blocks(self, first: int, plain: bytearray) -> None:
        """Encrypt and store; the caller reserved the encryptions before any change."""
        nb = fmt.blocks_for(len(plain), self._bs)
        out = bytearray(len(plain) + nb * fmt.OVERHEAD)
        self._fk.encrypt_into(plain, out, first)
        _pwrite_all(self._fd, out, self.header.block_offset(first))

    def _write_header(self) -> None:
        _pwrite_all(self._fd, self.header.pack(self._fk.mac_key), 0)

    def _physical_size(self) -> int:
        return os.fstat(self._fd).st_size

    def _check_writable(self) -> None:
        if not self._writable:
            raise PermissionError("TAKA file opened read-only")

    def sync(self) -> None:
        os.fsync(self._fd)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

