"""Whole-file streaming: encrypt a plain file into TAKA, decrypt one back, inspect one.

Memory is bounded by ``chunk_blocks`` blocks whatever the file size.  Used by the CLI
and by `takakrypt xform` later.  Output goes to a temporary file beside the target that
is renamed into place only when everything verified, so a failure never leaves a
half-written or unauthenticated output behind; a target that is a device node or a FIFO
(or stdout) is written directly instead, never replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from . import format as fmt
from .errors import FormatError, IntegrityError, UsageError
from .filekeys import FileKeys, single_key

DEFAULT_CHUNK_BLOCKS = 1024  # 4 MiB of plaintext per native call with 4 KiB blocks
Progress = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


@contextmanager
def atomic_output(path: str, *, force: bool, mode: int = 0o600,
                  seekable: bool = False) -> Iterator[BinaryIO]:
    """Yield a file that becomes ``path`` only if the block completes without error.

    An existing ``path`` that is not a regular file or a directory (a device node, a
    FIFO, a socket, ``/dev/stdout``), after following symlinks, is written directly,
    like ``-``: renaming over it would replace the node with a regular file.  Such
    output is not atomic (what was written before an error stays written).
    ``seekable``: the caller seeks back (refused for a FIFO, a terminal)."""
    if path == "-":
        yield os.fdopen(os.dup(1), "wb", buffering=0)
        return
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path}: already exists (use --force to overwrite)")
    direct = _open_special(path, seekable)
    if direct is not None:
        with direct:
            yield direct
        return
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.takakrypt-tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:  # name the file the user asked for, not our temporary
        raise OSError(e.errno, e.strerror, path) from None
    f = os.fdopen(fd, "wb", buffering=0)
    try:
        yield f
        f.flush()
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException as exc:
        f.close()
        os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise


def is_stdout(path: str) -> bool:
    """``-``, or a path that names this process's stdout (``/dev/stdout``, or the same
    FIFO or device)."""
    if path == "-":
        return True
    try:
        st, out = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def _open_special(path: str, seekable: bool) -> BinaryIO | None:
    """``path`` opened for writing if it exists and is neither a regular file nor a
    directory (those take the temporary-and-rename way: None)."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # absent, or a dangling symlink: replaced by a new file
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    unseekable = UsageError(f"{path}: cannot seek (a FIFO or a terminal); encrypt writes "
                            "the header last")
    if seekable and stat.S_ISFIFO(st.st_mode):
        raise unseekable  # before the open, which would wait for a reader
    # a FIFO blocks here until it has a reader, as a shell's `> fifo` does
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    f = os.fdopen(fd, "wb", buffering=0)
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISREG(kind) or stat.S_ISDIR(kind):  # replaced since the stat
            f.close()
            return None
        if seekable:
            os.lseek(fd, 0, os.SEEK_CUR)
    except OSError as e:
        f.close()
        if e.errno == errno.ESPIPE:
            raise unseekable from None
        raise
    return f


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        return os.fdopen(os.dup(0), "rb", buffering=0)
    try:
        return open(path, "rb", buffering=0)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None


def _readfull(f: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _write_all(f: BinaryIO | _NullSink, data: memoryview) -> None:
    while data:
        n = f.write(data)
        data = data[n:]


def encrypt_file(src: str, dst: str, key_id: str, key_version: int, data_key: bytearray, *,
                 block_size: int = fmt.DEFAULT_BLOCK_SIZE, force: bool = False,
                 chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
                 progress: Progress = _noop, allow_taka_input: bool = False,
                 format_version: int = fmt.VERSION) -> fmt.Header:
    """Encrypt ``src`` (``-`` = stdin) into a new TAKA file ``dst``; returns its header.
    A ``src`` that is already a TAKA file is refused (UsageError) unless
    ``allow_taka_input``: nesting one in another is not how a file changes key."""
    if dst == "-":
        raise UsageError("encrypt needs a seekable output file, not stdout")
    header = fmt.Header(key_id=key_id, key_version=key_version, block_size=block_size,
                        version=format_version)
    fk = FileKeys(header, single_key(key_id, key_version, data_key))
    plain = bytearray(chunk_blocks * block_size)
    sealed = bytearray(chunk_blocks * (block_size + fmt.OVERHEAD))
    pview, sview = memoryview(plain), memoryview(sealed)
    try:
        with _open_input(src) as fin, atomic_output(dst, force=force, seekable=True) as fout:
            _write_all(fout, memoryview(header.pack(fk.mac_key)))  # placeholder, size 0
            total, block = 0, 0
            while True:
                n = _readfull(fin, pview)
                if n == 0:
                    break
                if block == 0 and not allow_taka_input:
                    _refuse_taka(src, pview[:n])
                m = fk.encrypt_into(pview[:n], sview, block)
                _write_all(fout, sview[:m])
                total += n
                block += fmt.blocks_for(n, block_size)
                progress(n)
                if n < len(pview):
                    break
            header.plaintext_size = total
            header.encryptions = block  # exact: one encryption per block written
            fout.seek(0)
            _write_all(fout, memoryview(header.pack(fk.mac_key)))
    finally:
        fk.wipe()
        plain[:] = bytes(len(plain))
    return header


def _refuse_taka(src: str, head: memoryview) -> None:
    try:
        h = fmt.parse_header(bytes(head[:fmt.HEADER_SIZE]))
    except FormatError:
        return
    raise UsageError(f"{src}: already a TAKA file (key {h.key_id} v{h.key_version}); "
                     "encrypting it again would nest one TAKA file in another. Decrypt it "
                     "first, or pass --allow-taka-input to encrypt it anyway")


def read_header(f: BinaryIO, name: str) -> fmt.Header:
    raw = f.read(fmt.HEADER_SIZE)
    try:
        return fmt.parse_header(raw or b"")
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None


class _NullSink:
    def write(self, data: memoryview) -> int:
        return len(data)


@contextmanager
def _null_output() -> Iterator[_NullSink]:
    yield _NullSink()


def decrypt_file(src: str, dst: str | None, keys: Callable[[str, int], bytearray], *,
                 force: bool = False, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
                 progress: Progress = _noop,
                 on_header: Callable[[fmt.Header], None] | None = None) -> fmt.Header:
    """Decrypt TAKA file ``src`` into ``dst`` (``-`` = stdout, None = verify only),
    checking the header tag and every block.

    Raises FormatError / IntegrityError naming the first failing block; the output file
    is then not created.
    """
    with _open_input(src) as fin:
        header = read_header(fin, src)
        if on_header is not None:
            on_header(header)
        try:
            cipher = open_cipher(header, keys)
        except IntegrityError as e:
            raise IntegrityError(f"{src}: {e}") from None
        try:
            out = _null_output() if dst is None else atomic_output(dst, force=force)
            with out as fout:
                try:
                    for chunk in plaintext_chunks(lambda v: _readfull(fin, v), header, cipher,
                                                  chunk_blocks):
                        _write_all(fout, chunk)
                        progress(len(chunk))
                except IntegrityError as e:
                    raise IntegrityError(f"{src}: {e}", block=e.block) from None
        finally:
            cipher.wipe()
    return header


def open_cipher(header: fmt.Header, keys: Callable[[str, int], bytearray]) -> FileKeys:
    """The block keys of a file after checking its header tag (``wipe()`` them after)."""
    fk = FileKeys(header, keys)
    try:
        header.verify(fk.mac_key)
    except BaseException:
        fk.wipe()
        raise
    return fk


def plaintext_chunks(read: Callable[[memoryview], int], header: fmt.Header,
                     cipher: FileKeys,
                     chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> Iterator[memoryview]:
    """Verified plaintext of a TAKA file, chunk by chunk.  ``read(view)`` fills ``view``
    with the stored bytes that follow the header, sequentially, and returns the count.
    A missing block raises IntegrityError("file truncated ..."), a failing one
    IntegrityError("block N failed authentication (tampered or corrupt)").  The chunk
    buffer is reused between yields and wiped at the end."""
    sbs = header.stored_block_size
    sealed = bytearray(chunk_blocks * sbs)
    plain = bytearray(chunk_blocks * header.block_size)
    sview, pview = memoryview(sealed), memoryview(plain)
    size, block, done = header.plaintext_size, 0, 0
    try:
        while done < size:
            remaining_blocks = header.nblocks - block
            want = min(chunk_blocks, remaining_blocks)
            # the last block of the file may be shorter than a full stored block
            last_len = size - (header.nblocks - 1) * header.block_size + fmt.OVERHEAD
            nbytes = (want - 1) * sbs + (last_len if want == remaining_blocks else sbs)
            n = read(sview[:nbytes])
            if n < nbytes:
                missing = block + n // sbs
                raise IntegrityError(f"file truncated: block {missing} is missing or short",
                                     block=missing)
            try:
                try:
                    m = cipher.decrypt_into(sview[:n], pview, block)
                except IntegrityError as e:
                    if want != remaining_blocks or e.block != header.nblocks - 1:
                        raise
                    m = _longer_last_block(read, sview, pview, n, want, header, cipher, block,
                                           e)
            except IntegrityError as e:
                raise IntegrityError(f"{e} (tampered or corrupt)", block=e.block) from None
            m = min(m, size - done)
            yield pview[:m]
            done += m
            block += want
    finally:
        plain[:] = bytes(len(plain))


def _longer_last_block(read: Callable[[memoryview], int], sview: memoryview,
                       pview: memoryview, n: int, want: int, header: fmt.Header,
                       cipher: FileKeys, block: int, err: IntegrityError) -> int:
    """The last block's only other valid form (docs/file-format.md, "The last block"):
    stored longer than the size implies, up to a full block, after an interrupted
    write. ``sview[:n]`` holds the chunk read so far, the last block at its implied
    length; read what follows it up to a full stored block and verify it at that length.
    Returns the plaintext bytes decrypted into ``pview`` (the caller trims to the size)."""
    sbs, bs = header.stored_block_size, header.block_size
    head = (want - 1) * sbs
    extra = read(sview[n:head + sbs])
    if extra == 0:
        raise err
    if want > 1:
        cipher.decrypt_into(sview[:head], pview, block)
    return (want - 1) * bs + cipher.decrypt_into(sview[head:n + extra], pview[(want - 1) * bs:],
                                                 block + want - 1)


def inspect_file(path: str) -> dict[str, object]:
    """Header fields and layout facts of a TAKA file; never any key material."""
    with _open_input(path) as f:
        header = read_header(f, path)
        actual = os.fstat(f.fileno()).st_size
    expected = header.stored_size
    layout = "ok" if actual == expected else ("truncated" if actual < expected else "trailing")
    return {
        "path": path,
        "magic": fmt.MAGIC.decode(),
        "version": header.version,
        "algorithm": header.algorithm,
        "algorithm_name": fmt.ALGORITHMS[header.algorithm],
        "flags": header.flags,
        "block_size": header.block_size,
        "key_id": header.key_id,
        "key_version": header.key_version,
        "oldest_key_version": header.oldest_version,
        "file_id": header.file_id.hex(),
        "plaintext_size": header.plaintext_size,
        "blocks": header.nblocks,
        "header_size": fmt.HEADER_SIZE,
        "stored_size_expected": expected,
        "stored_size_actual": actual,
        "layout": layout,
        "header_tag": header.tag.hex(),
    }
