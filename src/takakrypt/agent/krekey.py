"""Live rekey on ``engine: kernel`` guard points (docs/kernel.md, "Live rekey").

The module seals a TAKA v2 file's blocks again in place, a range at a time, when
takakryptd asks with the ioctls of ``kernel/include/uapi/takakrypt_ioctl.h`` (this module
is its Python twin; ``tests/test_krekey.py`` compares the two).  A v2 block
carries its key version, so no copy and no swap of lower files is needed: every block is
old or new at any instant, and both read.  :class:`KernelRekeyFiles` is what
:class:`takakrypt.agent.rekey.Rekey` drives for such a guard point: the same
``rekey_file`` / ``rekey_cancel`` / ``backing_fd`` as the FUSE data path, plus
``state_fd`` (the run's state lives in takakryptd's state directory, not in the guard
point, whose names the module does not hide).

takakryptd opens the files through the mount; the module gives the registered agent the
stored bytes of every file (docs/kernel.md, "Views"), so the header is read here, and
the ioctls are refused (EPERM) to any other process.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import FormatError, IntegrityError
from ..format import HEADER_SIZE, parse_header

log = logging.getLogger("takakrypt.rekey")

#: blocks per REKEY_RANGE call at most (the module's TAKAKRYPT_REKEY_MAX_BLOCKS)
MAX_BLOCKS = 4096
#: stored bytes of one full block (4 KiB of plaintext + nonce + tag [+ version])
STORED_BLOCK = 4096 + 28
#: a raw write between the blocks and the header check: ranges done again this often
FINISH_TRIES = 3
#: the journal of the range being sealed again (in the guard point's state directory)
JOURNAL_NAME = "journal"
JOURNAL_MAGIC = b"TKRJ"
#: a journal larger than this is not one of ours (4096 blocks + its description)
JOURNAL_MAX = MAX_BLOCKS * STORED_BLOCK + 65536


class RekeyRange(ctypes.Structure):
    """struct takakrypt_rekey_range"""

    _fields_ = [("start", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("version", ctypes.c_uint32), ("next", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("rewritten", ctypes.c_uint64),
                ("write_version", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class RekeyFinish(ctypes.Structure):
    """struct takakrypt_rekey_finish"""

    _fields_ = [("version", ctypes.c_uint32), ("oldest", ctypes.c_uint32),
                ("stale", ctypes.c_uint64)]


def _iowr(typ: str, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir (read|write = 3) << 30 | size << 16 | type << 8 | nr
    return (3 << 30) | (size << 16) | (ord(typ) << 8) | nr


IOC_REKEY_RANGE = _iowr("T", 0x70, ctypes.sizeof(RekeyRange))
IOC_REKEY_FINISH = _iowr("T", 0x71, ctypes.sizeof(RekeyFinish))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    """ioctl(2) with a struct in and out; the GIL is released during the call (ctypes),
    which matters: the module may ask takakryptd's loop for a key meanwhile."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def state_dir_for(state_dir: str, guard_path: str) -> str:
    """The directory holding the rekey state of a kernel guard point: one per guard
    point path below ``state_dir`` (``rekey/<16 hex digits of its SHA-256>``)."""
    h = hashlib.sha256(os.fsencode(os.path.normpath(guard_path))).hexdigest()[:16]
    return os.path.join(state_dir, "rekey", h)


def _valid_rel(relpath: str) -> None:
    parts = relpath.split("/")
    if (not relpath or relpath.startswith("/") or "\0" in relpath
            or any(p in ("", ".", "..") for p in parts)):
        raise OSError(errno.EINVAL, f"rekey_file: {relpath!r} is not a path relative to "
                      "the guard point (no leading '/', no '.', '..' or empty components)")


class KernelRekeyFiles:
    """The data path of a live rekey on a mounted ``engine: kernel`` guard point."""

    def __init__(self, mountpoint: str, state_dir: str, guard_path: str, key: str) -> None:
        self.mountpoint = mountpoint
        self.key = key
        self.state_path = state_dir_for(state_dir, guard_path)
        self.journal_path = os.path.join(self.state_path, JOURNAL_NAME)
        self._cancel = threading.Event()

    # what rekey.Rekey calls ----------------------------------------------------------
    def backing_fd(self) -> int:
        """The guard point's directory through the mount (the walk and the headers)."""
        return os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def state_fd(self) -> int:
        """The directory of this guard point's rekey state (made 0700 if missing)."""
        os.makedirs(self.state_path, mode=0o700, exist_ok=True)
        return os.open(self.state_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def rekey_cancel(self, on: bool = True) -> None:
        """Make running and new :meth:`rekey_file` calls stop at their next range."""
        if on:
            self._cancel.set()
        else:
            self._cancel.clear()

    def rekey_file(self, relpath: str, *, version: int = 0, rate: int = 0,
                   chunk_blocks: int = 64) -> tuple[str, int]:
        """Seal every block of ``relpath`` (relative to the guard point) under an older
        version than ``version`` again, then raise its header's oldest version:
        ``(outcome, stored bytes written)``.  Outcomes as the FUSE data path's, and
        ``skipped-v1`` (a TAKA v1 file: its one version is in every block's tag, so it
        cannot change in place; a rekey on ``engine: fuse`` converts it) and
        ``skipped-other-key``.  ``cancelled`` leaves the file readable, part of its
        blocks on the new version (they stay there).  Raises OSError: EIO (a block or
        header that does not verify), ENOKEY, ENOENT (gone), EPERM (this process is not
        the agent the module registered).  ``chunk_blocks``: blocks per call into the
        module; applications' writes to the file wait for at most one such range."""
        _valid_rel(relpath)
        if not 1 <= version < 2 ** 32:
            raise ValueError(f"version must be in [1, 2**32), got {version}")
        chunk = max(1, min(int(chunk_blocks), MAX_BLOCKS))
        if self._cancel.is_set():
            return "cancelled", 0
        root = self.backing_fd()
        try:
            fd = os.open(relpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=root)
        finally:
            os.close(root)
        try:
            return self._file(fd, relpath, version, rate, chunk)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------------
    def _file(self, fd: int, rel: str, version: int, rate: int,
              chunk: int) -> tuple[str, int]:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "skipped-not-regular", 0
        head = os.pread(fd, HEADER_SIZE, 0)
        if not head:
            return "current", 0          # nothing stored yet: its header comes with its data
        try:
            h = parse_header(head)
        except FormatError as e:
            raise OSError(errno.EIO, f"header: {e}") from None
        if h.key_id != self.key:
            return "skipped-other-key", 0
        if h.version == 1:
            return "skipped-v1", 0
        if h.oldest_version >= version:
            return "current", 0
        written = 0
        try:
            for _ in range(FINISH_TRIES):
                n = self._ranges(fd, rel, h.file_id, version, rate, chunk)
                if n is None:
                    return "cancelled", written
                written += n
                fin = RekeyFinish(version=version)
                try:
                    ioctl(fd, IOC_REKEY_FINISH, fin)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue         # a raw write came in between: its blocks again
                    raise
                return "done", written
        except OSError as e:
            # the header changed under us (a raw restore of another file)
            if e.errno == errno.EOPNOTSUPP:
                return "skipped-v1", written
            if e.errno == errno.EXDEV:
                return "skipped-other-key", written
            if e.errno == errno.EPERM:
                raise OSError(errno.EPERM, "the module does not take this process for the "
                              "registered takakryptd") from None
            raise
        return "busy", written

    def _ranges(self, fd: int, rel: str, file_id: bytes, version: int, rate: int,
                chunk: int) -> int | None:
        """Every range of the file once: stored bytes written, None if cancelled.  The
        stored bytes of a range with a block to seal again go to the journal first."""
        start = written = 0
        t0 = time.monotonic()
        while True:
            if self._cancel.is_set():
                return None
            r = RekeyRange(start=start, count=chunk, version=version)
            old = os.pread(fd, chunk * STORED_BLOCK, HEADER_SIZE + start * STORED_BLOCK)
            journaled = _has_old_block(old, version)
            if journaled:
                self._journal_write(rel, file_id, start, old)
            ioctl(fd, IOC_REKEY_RANGE, r)
            if journaled:
                self._journal_clear()
            written += r.rewritten * STORED_BLOCK
            if rate > 0 and r.rewritten:
                # the rate across the file: sleep until the bytes so far fit it
                ahead = written / rate - (time.monotonic() - t0)
                if ahead > 0:
                    if self._cancel.wait(ahead):
                        return None
            if r.next >= r.blocks or r.next <= start:
                return written
            start = r.next

    # the journal ---------------------------------------------------------------------
    # A stored block is 4,124 bytes and spans two pages of the lower file: a power cut
    # while the module writes it again can leave it torn (half new, half old), which
    # reads as EIO, and the application never wrote that block.  So the stored bytes of
    # each range go to a journal first (written and fsynced), the module seals the range
    # again and makes it durable, and the journal is emptied.  After a crash, replay()
    # puts back every block of the range that does not verify from its journaled copy.
    def _journal_write(self, rel: str, file_id: bytes, start: int, data: bytes) -> None:
        desc = json.dumps({"path": rel, "file_id": file_id.hex(), "start": start,
                           "length": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}).encode()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        try:
            blob = JOURNAL_MAGIC + struct.pack("<I", len(desc)) + desc + data
            if os.write(fd, blob) != len(blob):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _journal_clear(self) -> None:
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replay(self, keys: Callable[[str, int], bytearray]) -> int:
        """After a crash (takakryptd starting, before its rekey resumes): the blocks of
        the journaled range that do not verify get their journaled copy back; returns how
        many.  A journal that is not complete (torn itself: the module never started on
        its range) or names a file that is gone or was replaced is dropped."""
        from ..filekeys import FileKeys

        try:
            with open(self.journal_path, "rb") as f:
                blob = f.read(JOURNAL_MAX + 1)
        except FileNotFoundError:
            return 0
        j = _parse_journal(blob)
        if j is None:
            if blob:
                log.warning("%s: incomplete rekey journal dropped (its range was not "
                            "written)", self.journal_path)
            self._journal_clear()
            return 0
        desc, data = j
        root = self.backing_fd()
        try:
            fd = os.open(desc["path"], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except FileNotFoundError:
            self._journal_clear()
            return 0
        finally:
            os.close(root)
        restored = 0
        try:
            h = parse_header(os.pread(fd, HEADER_SIZE, 0))
            if h.file_id.hex() != desc["file_id"]:
                self._journal_clear()
                return 0
            fk = FileKeys(h, keys)
            out = bytearray(h.block_size)
            try:
                for k in range(len(data) // STORED_BLOCK + 1):
                    index = desc["start"] + k
                    n = min(h.block_size, h.plaintext_size - index * h.block_size)
                    if n <= 0:
                        break
                    off = HEADER_SIZE + index * STORED_BLOCK
                    mine = data[k * STORED_BLOCK:k * STORED_BLOCK + n + 28]
                    if len(mine) < n + 28:
                        break
                    if _verifies(fk, os.pread(fd, n + 28, off), out, index):
                        continue
                    if not _verifies(fk, mine, out, index):
                        continue   # neither copy verifies: not a torn rekey write
                    os.pwrite(fd, mine, off)
                    restored += 1
                if restored:
                    os.fsync(fd)
            finally:
                fk.wipe()
                out[:] = bytes(len(out))
        finally:
            os.close(fd)
        self._journal_clear()
        return restored

    def describe(self) -> dict[str, Any]:
        return {"engine": "kernel", "mountpoint": self.mountpoint,
                "state": self.state_path}


def _has_old_block(stored: bytes, version: int) -> bool:
    """Whether the stored bytes of a range (full blocks, the last one maybe short) hold a
    block under a version older than ``version`` (holes do not count)."""
    for i in range(0, len(stored), STORED_BLOCK):
        blk = stored[i:i + STORED_BLOCK]
        if len(blk) > 28 and any(blk) and int.from_bytes(blk[-4:], "little") < version:
            return True
    return False


def _parse_journal(blob: bytes) -> tuple[dict[str, Any], bytes] | None:
    if len(blob) < 8 or blob[:4] != JOURNAL_MAGIC or len(blob) > JOURNAL_MAX:
        return None
    (n,) = struct.unpack_from("<I", blob, 4)
    if not 0 < n <= 65536 or 8 + n > len(blob):
        return None
    try:
        desc = json.loads(blob[8:8 + n])
    except ValueError:
        return None
    data = blob[8 + n:]
    if not (isinstance(desc, dict) and isinstance(desc.get("path"), str)
            and isinstance(desc.get("file_id"), str) and isinstance(desc.get("start"), int)
            and desc.get("length") == len(data)
            and desc.get("sha256") == hashlib.sha256(data).hexdigest()):
        return None
    try:
        _valid_rel(desc["path"])
    except OSError:
        return None
    return desc, data


def _verifies(fk: Any, stored: bytes, out: bytearray, index: int) -> bool:
    try:
        fk.decrypt_into(stored, out, index, holes=True)
    except IntegrityError:
        return False
    return True
