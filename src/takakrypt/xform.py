"""Initial encryption of a directory in place (`takakrypt xform`), and its reverse.

Before a directory becomes a guard point, its existing files are converted to TAKA
files under a key; ``--decrypt`` converts back.  A first walk, before anything is
converted, refuses the tree if it holds a file Takakrypt itself needs (keystore, its
lock, unlock files, configuration, state directories, audit files: ownfiles.py) or,
when encrypting, a TAKA file under another key (unless ``allow_taka_input``: that is
key rotation's job), and groups the names of each hard-linked inode.  Then for every
inode:

1. write the converted copy to a temporary file in the same directory (O_EXCL, 0600),
   fsync it;
2. verify it: read it back through the reverse transformation and compare the SHA-256
   with the source's (computed while converting);
3. copy ownership, timestamps and ``user.*`` xattrs;
4. rename it over the original, then set the original's mode (a temporary is never
   more readable than 0600), fsync the directory;
5. re-point the inode's other names below the root to the new file (link beside each,
   rename over it).  An inode with names outside the root is left as it is and reported
   as failed: converting only some names would split it.

A journal (``.takakrypt-xform.journal`` in the directory, JSON lines, fsync'd) records
the run's direction and key and each file begun (with its other names) and done, so a
run interrupted at any point (power loss included) is resumed by running the same
command again: leftover temporaries are removed (when decrypting they hold plaintext,
so they are overwritten with zeros first), names of a hard-linked file not yet
re-pointed are re-pointed, files already converted are recognised (a TAKA header that
verifies under the key) and skipped.  A run that ends, even with failures, removes its
journal (every file is then converted or as it was); ``abandon()`` (``--abandon``)
removes an interrupted run's temporaries and journal without converting more.  A
directory that is a mount point, or contains one (a mounted guard point), is refused.

The rename frees the original's blocks without overwriting them: the plaintext stays
on the device until the file system reuses them.  ``wipe=True`` (``--wipe``) keeps the
original open, and after the rename overwrites its blocks in place with random bytes
and fsyncs before the last reference goes — best effort, and only on file systems
that overwrite in place (ext2/3/4, xfs, jfs, FAT): refused up front on any other
(btrfs, zfs, bcachefs, f2fs, nilfs2, overlay, network and FUSE file systems), and not
done for a file whose blocks are shared (reflinks, FIEMAP) or that still has another
name (one it gained during the run: names below the root are re-pointed first).  Flash
translation layers, snapshots and the journal in ``data=journal`` mode
may still hold copies; docs/operations.md "Encrypting existing data" says what to do
about them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from . import ownfiles
from .errors import Error, FormatError, IntegrityError, UsageError, XformError
from .filekeys import FileKeys, single_key
from .keys.secret import wipe as zero_key
from .stream import open_cipher, plaintext_chunks

JOURNAL = ".takakrypt-xform.journal"
TMP_SUFFIX = ".takakrypt-xform-tmp"
CHUNK_BLOCKS = 256

KeyLookup = Callable[[str, int], bytearray]


@dataclass
class Summary:
    direction: str
    converted: int = 0
    already: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    bytes: int = 0
    resumed: bool = False
    cleaned_temporaries: int = 0
    wiped: int = 0
    linked: int = 0
    abandoned: bool = False
    not_wiped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    root = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == root or mp.startswith(root.rstrip("/") + "/"):
                out.append(mp)
    return out


#: file systems where a write over an existing block goes to that block
IN_PLACE_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "jfs", "vfat", "msdos", "exfat"})


def fs_type(path: str) -> str:
    """Type of the file system holding ``path`` (from /proc/self/mountinfo), or ""."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                found = fields[fields.index("-") + 1]  # the last mount of the device wins
    return found


def check_wipe(root: str) -> None:
    """UsageError unless ``root`` is on a file system that overwrites in place."""
    kind = fs_type(root)
    if kind not in IN_PLACE_FS:
        raise UsageError(
            f"{root}: --wipe cannot overwrite in place on {kind or 'an unknown'} file system "
            f"(copy-on-write, log-structured or remote: old blocks stay); supported: "
            f"{', '.join(sorted(IN_PLACE_FS))}. Encrypt into a fresh file system and swap "
            "instead (docs/operations.md, \"Encrypting existing data\")")


_FIEMAP = 0xC020660B                # _IOWR('f', 11, struct fiemap)
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
_EXTENT_LAST, _EXTENT_SHARED = 0x1, 0x2000


def _shares_blocks(fd: int) -> bool | None:
    """Whether any extent of the file is shared with another file (reflink, dedupe);
    None if the file system cannot say."""
    start, n = 0, 64
    while True:
        buf = bytearray(_FIEMAP_HEAD.pack(start, (1 << 64) - 1 - start, 0, 0, n, 0)
                        + bytes(n * _FIEMAP_EXTENT.size))
        try:
            fcntl.ioctl(fd, _FIEMAP, buf)
        except OSError:
            return None
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if not mapped:
            return False
        for i in range(mapped):
            logical, _phys, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            if flags & _EXTENT_SHARED:
                return True
            if flags & _EXTENT_LAST:
                return False
            start = logical + length


def _overwrite(fd: int, rel: str, summary: "Summary") -> None:
    """Overwrite the (already renamed-over) original's blocks with random bytes and
    fsync, unless that would hit another file's data."""
    st = os.fstat(fd)
    if st.st_nlink > 0:
        summary.not_wiped.append({"path": rel, "reason": "other hard links still use it"})
        return
    if _shares_blocks(fd):
        summary.not_wiped.append({"path": rel, "reason": "shares blocks with another file "
                                                         "(reflink)"})
        return
    noise = os.urandom(1 << 20)  # random, not zeros: a compressing device stores zeros as
    off = 0                      # nothing and keeps the old cells
    while off < st.st_size:      # the data extents only: filling holes would allocate
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after off
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), st.st_size)
        while start < end:
            start += os.pwrite(fd, noise[: min(len(noise), end - start)], start)
        off = end
    os.fsync(fd)
    summary.wiped += 1


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name == JOURNAL or name.endswith(TMP_SUFFIX):
                continue
            p = os.path.join(dirpath, name)
            yield p, os.lstat(p)


class _Journal:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, JOURNAL)
        self.f: Any = None

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a torn last line from a crash
        return out

    def open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.f = os.fdopen(fd, "ab", buffering=0)

    def write(self, **rec: Any) -> None:
        self.f.write(json.dumps(rec).encode() + b"\n")
        os.fsync(self.f.fileno())

    def finish(self) -> None:
        if self.f is not None:
            self.f.close()
        os.unlink(self.path)
        _fsync_dir(os.path.dirname(self.path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_header(path: str) -> fmt.Header | None:
    try:
        with open(path, "rb") as f:
            return fmt.parse_header(f.read(fmt.HEADER_SIZE))
    except FormatError:
        return None


def _is_taka_under(path: str, keys: KeyLookup, key_name: str | None) -> bool:
    h = _read_header(path)
    if h is None or (key_name is not None and h.key_id != key_name):
        return False
    data_key = keys(h.key_id, h.key_version)
    try:
        _enc, mac = fmt.derive_file_keys(data_key, h.file_id, info=h.hkdf_info)
        zero_key(_enc)
        try:
            h.verify(mac)
        finally:
            zero_key(mac)
    except IntegrityError:
        return False
    finally:
        zero_key(data_key)
    return True


def _copy_metadata(src_fd: int, dst_fd: int) -> None:
    st = os.fstat(src_fd)
    os.fchown(dst_fd, st.st_uid, st.st_gid)  # the mode is set after the rename
    try:
        for name in os.listxattr(src_fd):
            if name.startswith("user."):
                os.setxattr(dst_fd, name, os.getxattr(src_fd, name))
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _wipe_and_remove(path: str) -> None:
    """Overwrite a leftover temporary with zeros before unlinking (it may hold plaintext
    from an interrupted --decrypt).  Best effort: the filesystem may keep old blocks."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        st = os.fstat(fd)
        # another link of a converted file (a hard link being re-pointed): keep its data
        size = st.st_size if st.st_nlink == 1 else 0
        zeros = bytes(1 << 20)
        off = 0
        while off < size:
            off += os.pwrite(fd, zeros[: min(len(zeros), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def _encrypt_to(src_fd: int, dst_fd: int, key_name: str, key_version: int,
                data_key: bytearray, progress: Callable[[int], None],
                format_version: int = fmt.VERSION) -> tuple[str, fmt.Header]:
    header = fmt.Header(key_id=key_name, key_version=key_version, version=format_version)
    fk = FileKeys(header, single_key(key_name, key_version, data_key))
    h = hashlib.sha256()
    bs = header.block_size
    plain = bytearray(CHUNK_BLOCKS * bs)
    out = bytearray(CHUNK_BLOCKS * (bs + fmt.OVERHEAD))
    try:
        os.pwrite(dst_fd, header.pack(fk.mac_key), 0)
        pos, opos, block = 0, fmt.HEADER_SIZE, 0
        while True:
            n = _pread_full(src_fd, plain, pos)
            if n == 0:
                break
            h.update(memoryview(plain)[:n])
            m = fk.encrypt_into(memoryview(plain)[:n], out, block)
            _pwrite_full(dst_fd, memoryview(out)[:m], opos)
            pos, opos, block = pos + n, opos + m, block + fmt.blocks_for(n, bs)
            progress(n)
            if n < len(plain):
                break
        header.plaintext_size = pos
        header.encryptions = block  # the file key's count (docs/file-format.md)
        os.pwrite(dst_fd, header.pack(fk.mac_key), 0)
        os.fsync(dst_fd)
    finally:
        fk.wipe()
        plain[:] = bytes(len(plain))
    return h.hexdigest(), header


def _decrypt_hash(fd: int, keys: KeyLookup, sink_fd: int | None = None,
                  progress: Callable[[int], None] | None = None) -> str:
    """SHA-256 of a TAKA file's plaintext (every block verified); optionally write it."""
    h = hashlib.sha256()
    header = fmt.parse_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    cipher = open_cipher(header, keys)
    pos = [fmt.HEADER_SIZE]

    def read(view: memoryview) -> int:
        n = _pread_full(fd, view, pos[0])
        pos[0] += n
        return n

    try:
        done = 0
        for chunk in plaintext_chunks(read, header, cipher, CHUNK_BLOCKS):
            h.update(chunk)
            if sink_fd is not None:
                _pwrite_full(sink_fd, chunk, done)
                if progress:
                    progress(len(chunk))
            done += len(chunk)
        if sink_fd is not None:
            os.fsync(sink_fd)
    finally:
        cipher.wipe()
    return h.hexdigest()


def _pread_full(fd: int, buf: bytearray | memoryview, offset: int) -> int:
    view, got = memoryview(buf), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    pos = 0
    while n := _pread_full(fd, buf, pos):
        h.update(memoryview(buf)[:n])
        pos += n
        if n < len(buf):
            break
    return h.hexdigest()


@dataclass
class _Item:
    """One inode to convert: its first name below the root and its other names."""
    path: str
    st: os.stat_result
    links: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    items: list[_Item] = field(default_factory=list)
    total: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    outside_links: list[dict[str, str]] = field(default_factory=list)
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (rel, "key K vN")


def _foreign_key(path: str, keys: KeyLookup, key_name: str) -> str | None:
    """For encryption under ``key_name``: "key K vN" if ``path`` is a TAKA file that is not
    one of ours already (another key, or a header that does not verify), else None."""
    try:
        h = _read_header(path)
    except OSError:
        return None  # unreadable: its conversion fails and is reported
    if h is None:
        return None
    if h.key_id == key_name:
        try:
            if _is_taka_under(path, keys, key_name):
                return None
        except Error:
            pass
        return f"key {h.key_id} v{h.key_version}, header not verified by this keystore"
    return f"key {h.key_id} v{h.key_version}"


def _plan(root: str, own: list[ownfiles.Own], keys: KeyLookup, key_name: str | None,
          check_foreign: bool) -> _Plan:
    """Walk once before converting anything: refuse Takakrypt's own files, group hard
    links, find TAKA files under another key, add up the bytes."""
    hits = ownfiles.found_inside(root, own)
    if hits:
        raise ownfiles.refusal(root, hits)
    ids = ownfiles.identities(own)
    plan, groups = _Plan(), {}  # type: ignore[var-annotated]
    for path, st in _walk(root):
        rel = os.path.relpath(path, root)
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                plan.skipped.append({"path": rel, "reason": "not a regular file"})
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in ids:
            raise ownfiles.refusal(root, [(path, f"a hard link to {ids[ident]}")])
        if st.st_nlink > 1 and ident in groups:
            groups[ident].links.append(path)
            continue
        item = _Item(path, st)
        if st.st_nlink > 1:
            groups[ident] = item
        plan.items.append(item)
        plan.total += st.st_size
        if check_foreign and key_name:
            other = _foreign_key(path, keys, key_name)
            if other:
                plan.foreign.append((rel, other))
    for item in list(groups.values()):
        names = [item.path, *item.links]
        if len(names) < item.st.st_nlink:
            plan.items.remove(item)
            plan.total -= item.st.st_size
            outside = item.st.st_nlink - len(names)
            for p in names:
                plan.outside_links.append({
                    "path": os.path.relpath(p, root),
                    "reason": f"hard-linked to {outside} name(s) outside {root}: left as "
                              "it was (converting only these names would split the file)"})
    return plan


def _foreign_refusal(root: str, foreign: list[tuple[str, str]]) -> UsageError:
    return UsageError(
        f"{root}: {len(foreign)} file(s) are already TAKA files under another key: "
        f"{ownfiles.listing(foreign)}. Nothing was converted. Encrypting them again would nest one TAKA "
        "file in another; changing a tree's key is key rotation. Decrypt them first "
        "(takakrypt xform --decrypt), or pass --allow-taka-input to encrypt them again "
        "anyway")


def abandon(root: str) -> Summary:
    """Give up an interrupted run: remove its temporaries (plaintext ones overwritten
    first) and its journal.  Files already converted stay converted, the others stay as
    they were; any later xform may then run."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory")
    journal = _Journal(root)
    previous = journal.read()
    summary = Summary(direction=str(previous[0].get("direction")) if previous else "none")
    summary.cleaned_temporaries = _clean_temporaries(root)
    if os.path.lexists(journal.path):
        journal.finish()
        summary.abandoned = True
    return summary


def _clean_temporaries(root: str) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                _wipe_and_remove(os.path.join(dirpath, name))
                n += 1
    return n


def _finish_begun(root: str, previous: list[dict[str, Any]]) -> None:
    """After a crash between renaming a file's converted copy into place and the end of
    its conversion: give it its mode (the copy was 0600), re-point its other names still
    on the original inode."""
    done = {r["done"] for r in previous if "done" in r}
    for rec in previous:
        if "begin" not in rec or "ino" not in rec or rec["begin"] in done:
            continue
        first = os.path.join(root, rec["begin"])
        try:
            st = os.lstat(first)
        except FileNotFoundError:
            continue
        if (st.st_ino, st.st_dev) == (rec["ino"], rec["dev"]) or not stat.S_ISREG(st.st_mode):
            continue  # not renamed yet: the plan redoes it all
        os.chmod(first, rec["mode"])
        for rel in rec["links"]:
            p = os.path.join(root, rel)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_dev) == (rec["ino"], rec["dev"]):
                _relink(first, p)


def _relink(target: str, name: str) -> None:
    """Make ``name`` another link of ``target``, atomically (link beside it, rename)."""
    tmp = os.path.join(os.path.dirname(name), f".{os.path.basename(name)}{TMP_SUFFIX}")
    os.link(target, tmp)
    try:
        os.rename(tmp, name)
    finally:
        if os.path.lexists(tmp):  # rename of two links of one inode does nothing
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(name))


def run(root: str, *, keys: KeyLookup, key_name: str | None, key_version: int | None,
        decrypt: bool, progress: Callable[[int], None] = lambda n: None,
        on_file: Callable[[str], None] | None = None, wipe: bool = False,
        own: list[ownfiles.Own] | None = None, allow_taka_input: bool = False,
        on_total: Callable[[int], None] | None = None,
        format_version: int = fmt.VERSION) -> Summary:
    """Convert every regular file below ``root``.  See the module docstring.  ``wipe``:
    overwrite the originals' blocks after the rename.  ``own``: Takakrypt's own files
    (ownfiles.collect), refused when below ``root``.  ``allow_taka_input``: encrypt TAKA
    files under another key again (else refused).  ``on_total``: told the bytes to do.
    ``format_version``: the TAKA version of the files made (docs/file-format.md)."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory")
    if wipe and decrypt:
        raise UsageError("--wipe overwrites plaintext originals; with --decrypt the "
                         "originals are ciphertext")
    if wipe:
        check_wipe(root)
    busy = mounts_under(root)
    if busy:
        raise UsageError(f"{root}: refusing to transform a mounted guard point or a tree "
                         f"containing mount points ({', '.join(busy[:3])}); unmount first")
    direction = "decrypt" if decrypt else "encrypt"
    journal = _Journal(root)
    previous = journal.read()
    summary = Summary(direction=direction, resumed=bool(previous))
    if previous:
        head = previous[0]
        if head.get("direction") != direction or (not decrypt and head.get("key") != key_name):
            was = ("--decrypt" if head.get("direction") == "decrypt"
                   else f"--key {head.get('key')}")
            raise UsageError(f"{root}: an interrupted `takakrypt xform {was}` must be finished "
                             f"first: run it again with the same arguments, or give it up "
                             f"with `takakrypt xform "
                             f"--abandon {root}` (converted files stay converted)")
        key_version = head.get("version", key_version)
    plan = _plan(root, list(own or ()), keys, key_name, not decrypt and not allow_taka_input)
    if plan.foreign:
        raise _foreign_refusal(root, plan.foreign)
    if on_total:
        on_total(plan.total)
    # leftovers of an interrupted run: never plaintext copies left lying around
    summary.cleaned_temporaries = _clean_temporaries(root)
    if previous:
        _finish_begun(root, previous)
    summary.skipped = plan.skipped
    summary.failed = list(plan.outside_links)
    data_key = keys(key_name, key_version) if not decrypt and key_name else None
    try:
        journal.open()
        if not previous:
            journal.write(direction=direction, key=key_name, version=key_version)
        for item in plan.items:
            rel = os.path.relpath(item.path, root)
            try:
                done = _convert_one(item, root, decrypt, keys, key_name, key_version,
                                    data_key, journal, progress, summary if wipe else None,
                                    format_version)
            except (Error, OSError) as e:
                reason = str(e) if isinstance(e, Error) else (e.strerror or str(e))
                names = [p for p in (item.path, *item.links)
                         if decrypt or _read_header(p) is None] or [item.path]
                summary.failed += [{"path": os.path.relpath(p, root), "reason": reason}
                                   for p in names]
                continue
            if done is None:
                summary.already += 1
            else:
                summary.converted += 1
                summary.bytes += done
                summary.linked += len(item.links)
            if on_file:
                on_file(rel)
    finally:
        if data_key is not None:
            zero_key(data_key)
    # every file is now converted or as it was, no temporaries: nothing to resume
    journal.finish()
    if summary.failed:
        raise XformError(f"{len(summary.failed)} file(s) not converted, first: "
                         f"{summary.failed[0]['path']}: {summary.failed[0]['reason']}",
                         summary)
    return summary


def _convert_one(item: _Item, root: str, decrypt: bool, keys: KeyLookup,
                 key_name: str | None, key_version: int | None, data_key: bytearray | None,
                 journal: _Journal, progress: Callable[[int], None],
                 wipe_into: Summary | None = None,
                 format_version: int = fmt.VERSION) -> int | None:
    """Convert one inode (then re-point its other names); None if it was already in the
    target form.  With ``wipe_into``, the original's blocks are overwritten after the
    renames (never before: a crash must not leave neither copy)."""
    path, st = item.path, item.st
    rel = os.path.relpath(path, root)
    is_taka = _is_taka_under(path, keys, None if decrypt else key_name)
    if decrypt and not is_taka:
        if _read_header(path) is not None:
            raise IntegrityError(f"{rel}: TAKA header does not verify under its key")
        return None  # plaintext already
    if not decrypt and is_taka:
        return None
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_SUFFIX}")
    journal.write(begin=rel, links=[os.path.relpath(p, root) for p in item.links],
                  ino=st.st_ino, dev=st.st_dev, mode=stat.S_IMODE(st.st_mode))
    src = os.open(path, (os.O_RDWR if wipe_into is not None else os.O_RDONLY)
                  | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        # 0600 until renamed: a temporary may hold plaintext (--decrypt)
        dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if decrypt:
                src_hash = _decrypt_hash(src, keys, sink_fd=dst, progress=progress)
                check = _sha256_fd(dst)
            else:
                assert data_key is not None and key_name is not None and key_version
                src_hash, _h = _encrypt_to(src, dst, key_name, key_version, data_key, progress,
                                           format_version)
                check = _decrypt_hash(dst, keys)
            if check != src_hash:
                raise IntegrityError(f"{rel}: verification after writing failed")
            _copy_metadata(src, dst)
            os.rename(tmp, path)
        except BaseException:
            os.close(dst)
            _wipe_and_remove(tmp)
            raise
        try:
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
        finally:
            os.close(dst)
        _fsync_dir(os.path.dirname(path))
        for other in item.links:
            _relink(path, other)
        journal.write(done=rel)
        if wipe_into is not None:
            try:
                _overwrite(src, rel, wipe_into)
            except OSError as e:  # the file is converted; only the wipe failed
                wipe_into.not_wiped.append({"path": rel, "reason": e.strerror or str(e)})
    finally:
        os.close(src)
    return st.st_size
