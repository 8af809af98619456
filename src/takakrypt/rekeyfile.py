"""Leftovers of the data path's live rekey (docs/guard-points.md, "Live rekey (data
path)").

``GuardPoint.rekey_file`` copies a file into a temporary beside it, named
``.takakrypt-rekey.tmp.<16 hex digits>``, and swaps the copy in with
``renameat2(RENAME_EXCHANGE)``; the temporary name then holds the old file until it is
unlinked.  A crash (or a SIGKILL of the serving process) can leave such a temporary:
it is only ever a temporary -- the file's own name holds the complete old or the
complete new file at every instant -- so removing it is always safe, but only while no
rekey of that directory tree runs (takakryptd calls :func:`remove_leftovers` when it
mounts or takes over a guard point, before any rekey starts).  The guard point hides
every ``.takakrypt-rekey.`` name (readdir, lookup, create), so applications never see
them; the rekey manager's state file ``.takakrypt-rekey.state`` shares that prefix but
is not a temporary and is kept.
"""

from __future__ import annotations

import os
import stat

#: what every name the guard point hides starts with
HIDDEN_PREFIX = ".takakrypt-rekey."
#: the data path's temporaries (fuse_rekey.c)
TEMP_PREFIX = HIDDEN_PREFIX + "tmp."


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the data path's temporaries."""
    tail = name[len(TEMP_PREFIX):]
    return (name.startswith(TEMP_PREFIX) and len(tail) == 16
            and all(c in "0123456789abcdef" for c in tail))


def remove_leftovers(backing_dir: str | os.PathLike[str] | int) -> int:
    """Remove the temporaries an interrupted rekey left anywhere below ``backing_dir``
    (a path, or a directory descriptor such as ``GuardPoint.backing_fd()``, which also
    reaches a directory an in-place guard point covers; the descriptor stays open).
    Does not follow symlinks or leave the file system.  Returns how many were
    removed.  MUST NOT run while a rekey of the tree runs."""
    if isinstance(backing_dir, int):
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=backing_dir)
    else:
        fd = os.open(backing_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _clean(fd, os.fstat(fd).st_dev)
    finally:
        os.close(fd)


def _clean(dirfd: int, dev: int) -> int:
    removed = 0
    try:
        names = os.listdir(dirfd)
    except OSError:
        return 0
    for name in names:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and is_temp_name(name):
            try:
                os.unlink(name, dir_fd=dirfd)
                removed += 1
            except FileNotFoundError:
                pass
        elif stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dirfd)
            except OSError:
                continue
            try:
                removed += _clean(sub, dev)
            finally:
                os.close(sub)
    return removed
