"""Which processes hold files under a directory: open descriptors, memory mappings,
working and root directories, from /proc.

Read with readlink and the maps text only: never a stat through the path, which for a
guard point would ask its own engine (the caller is the process serving it)."""

from __future__ import annotations

import os
from typing import NamedTuple


class Holder(NamedTuple):
    pid: int
    name: str
    path: str  # one of the files it holds (the first found)
    how: str  # "fd N", "mapped", "cwd", "root"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _held(pid: int, root: str) -> tuple[str, str] | None:
    base = f"/proc/{pid}"
    for how in ("cwd", "root"):
        try:
            target = os.readlink(f"{base}/{how}")
        except OSError:
            continue
        if how == "root" and target == "/":
            continue
        if _under(target, root):
            return target, how
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(f"{base}/fd/{fd}")
        except OSError:
            continue
        if _under(target.removesuffix(" (deleted)"), root):
            return target, f"fd {fd}"
    try:
        with open(f"{base}/maps", errors="surrogateescape") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and _under(parts[5].removesuffix(" (deleted)"), root):
                    return parts[5], "mapped"
    except OSError:
        pass
    return None


def holders(root: str, *, skip: tuple[int, ...] = ()) -> list[Holder]:
    """Processes holding anything under ``root`` (an absolute, normalised path)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        found = _held(int(entry), root)
        if found:
            out.append(Holder(int(entry), _comm(int(entry)), *found))
    return out


def describe(found: list[Holder], limit: int = 10) -> str:
    text = "; ".join(f"pid {h.pid} ({h.name}) {h.how}: {h.path}" for h in found[:limit])
    return text + (f"; and {len(found) - limit} more" if len(found) > limit else "")
