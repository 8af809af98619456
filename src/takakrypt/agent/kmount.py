"""Kernel guard points (``engine: kernel``): takakryptfs mounted in place by takakryptd.

What takakryptd does for such a guard point, once its generic-netlink transport has
registered and the module acknowledged the CONFIG_UPDATE (agent.daemon)::

    mount("PATH", "PATH", "takakryptfs", MS_NOSUID|MS_NODEV, "key=KEY,gp=ID")  # mount(2)

``PATH`` is both the lower directory and the mount point (in place, as the FUSE engine's
in-place guard points); with ``backing`` set, the lower directory is the backing one.
``ID`` is the guard point id of CONFIG_UPDATE (1-based index in ``guard_points``); with
it the module asks POLICY_CHECK of this agent for every access and serves keys only for
that guard point's key.  ``decide=none`` (a test-only option of the module) is never
used, and a mount that carries it is never reused.

Contract (each function here is synchronous and may block: the daemon calls it off its
event loop; nothing here stats or opens the mount, whose requests the agent answers):

- **reuse, never twice**: a takakryptfs mount already on top of PATH with the same lower
  directory, key and id (left by a takakryptd that was killed, or kept for its
  successor) is taken as it is (:meth:`KernelGuard.mount` returns ``"reused"``); one with
  other options is unmounted first, never lazily: if it is busy the guard point fails.
  Found in ``/proc/self/mountinfo``, never by a stat.
- **unmount**: ``umount2(PATH, 0)``, which writes every dirty page back while the agent
  still serves keys; if a process still uses the mount (``EBUSY``) it is detached lazily
  (``MNT_DETACH``), like a FUSE guard point: new opens of PATH reach the lower directory,
  open files keep the detached mount until closed (their keys go with the CONFIG_UPDATE
  that no longer enables the guard point, or the empty one at stop).  Only the guard
  point's own mount, on top of PATH, is ever unmounted there.
- :func:`module_state` says whether the module is loaded, loadable or absent, for
  ``takakrypt config check`` and for the error of a guard point that cannot start.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
from typing import Any, NamedTuple

from ..config import KERNEL_KEY_NAME

FSTYPE = "takakryptfs"
MODULE = "takakryptfs"
MNT_DETACH = 2
#: mount flags: nosuid,nodev, as libfuse mounts the FUSE engine's guard points
MS_NOSUID, MS_NODEV = 2, 4
LOAD_HINT = ("load it with `modprobe takakryptfs` (at boot: a line `takakryptfs` in "
             "/etc/modules-load.d/takakryptfs.conf), then `takakrypt reload`")
NO_FALLBACK = ("takakryptd refuses to start this guard point: it never falls back to FUSE "
               "or to an unprotected directory")


class KernelGuardError(OSError):
    """A kernel guard point could not be mounted, reused or unmounted."""

    def __str__(self) -> str:  # the message alone, no "[Errno N]"
        return str(self.strerror if self.strerror is not None else super().__str__())


class MountEntry(NamedTuple):
    """One line of /proc/PID/mountinfo (escapes undone)."""

    mount_id: int
    parent_id: int
    dev: str          # "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str      # super options, e.g. "rw,key=k1,gp=1"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(pid: str = "self") -> list[MountEntry]:
    """Every mount of ``pid``'s mount namespace, in mount order; OSError if unreadable."""
    out = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, rest = left.split(" "), right.split(" ")
            if not sep or len(fields) < 5 or len(rest) < 3:
                continue
            out.append(MountEntry(int(fields[0]), int(fields[1]), fields[2],
                                  _unescape(fields[4]), rest[0], _unescape(rest[1]),
                                  _unescape(rest[2])))
    return out


def mounts_at(path: str, pid: str = "self") -> list[MountEntry]:
    """The mounts at ``path``, bottom first (the last one is what applications see)."""
    try:
        return [m for m in mounts(pid) if m.mountpoint == path]
    except OSError:
        return []


def options(entry: MountEntry) -> dict[str, str]:
    """The super options of a mount as a dict ("rw" -> "")."""
    out = {}
    for opt in entry.options.split(","):
        name, _, value = opt.partition("=")
        if name:
            out[name] = value
    return out


def mount_data(key: str, gp_id: int, grace: int = 0, fmt: int = 1) -> str:
    """The mount options takakryptd gives a kernel guard point (``grace=`` only when the
    guard point's ``key_grace`` is not the module's default 0, ``format=`` only when its
    ``format`` is not the module's default 1)."""
    if not KERNEL_KEY_NAME.fullmatch(key):  # a comma would smuggle in another option
        raise KernelGuardError(errno.EINVAL, f"key name {key!r} cannot be a takakryptfs "
                               "key= option (1..63 of [A-Za-z0-9._-], not starting with . or -)")
    if gp_id < 1:
        raise KernelGuardError(errno.EINVAL, f"guard point id {gp_id} must be >= 1")
    if not 0 <= grace <= 86400:
        raise KernelGuardError(errno.EINVAL, f"key_grace {grace} is not 0..86400 seconds")
    if fmt not in (1, 2):
        raise KernelGuardError(errno.EINVAL, f"format {fmt} is not 1 or 2")
    return (f"key={key},gp={gp_id}" + (f",grace={grace}" if grace else "")
            + (f",format={fmt}" if fmt != 1 else ""))


_libc: Any = None


def _libc_call(name: str, *args: Any) -> int:
    """``libc.name(*args)``: 0, or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    rc = getattr(_libc, name)(*args)
    return ctypes.get_errno() if rc else 0


class KernelGuard:
    """One ``engine: kernel`` guard point of the agent (what ``agent.guards`` holds for a
    FUSE one).  ``gp_id``: its id in CONFIG_UPDATE."""

    engine = "kernel"

    def __init__(self, spec: Any, gp_id: int) -> None:
        self.spec = spec
        self.gp_id = gp_id
        self.path = os.path.normpath(spec.path)
        self.source = os.path.normpath(spec.backing) if spec.backing else self.path
        self.data = mount_data(spec.key, gp_id, spec.key_grace, spec.format)
        self.reused = False   # the mount was there already (a killed predecessor's)
        self.last_unmount = ""

    @property
    def mount_args(self) -> tuple[str, str, str]:
        """What the mount is made of: a change of any of these needs a new mount."""
        return self.path, self.source, self.data

    def matches(self, m: MountEntry) -> bool:
        """``m`` is this guard point's mount: takakryptfs, same lower directory, key and
        id, and decisions by the agent (``decide=agent``, the module's default), never
        its test-only ``decide=none``."""
        if m.fstype != FSTYPE or os.path.normpath(m.source) != self.source:
            return False
        opts = options(m)
        return (opts.get("key") == self.spec.key and opts.get("gp") == str(self.gp_id)
                and opts.get("grace", "0") == str(self.spec.key_grace)
                and opts.get("format", "1") == str(self.spec.format)
                and opts.get("decide", "agent") == "agent")

    def _top(self) -> MountEntry | None:
        at = mounts_at(self.path)
        return at[-1] if at else None

    # lifecycle ------------------------------------------------------------------------
    def mount(self) -> str:
        """Mount, or reuse the mount already there: ``"mounted"`` or ``"reused"``."""
        for _ in range(8):  # a stack of stale takakryptfs mounts, one at a time
            top = self._top()
            if top is None or top.fstype != FSTYPE:
                break
            if self.matches(top):
                self.reused = True
                return "reused"
            err = _libc_call("umount2", self.path.encode(), 0)
            if err:
                raise KernelGuardError(err, (
                    f"{self.path}: a takakryptfs mount with other options ({top.source} "
                    f"{top.options}) is there and cannot be unmounted: {os.strerror(err)}; "
                    f"stop the processes using it, `umount {self.path}`, then `takakrypt "
                    "reload`"))
        if top is not None and top.fstype.startswith("fuse.takakrypt"):
            raise KernelGuardError(errno.EBUSY, f"{self.path}: a FUSE guard point "
                                   "(fuse.takakrypt) is mounted there")
        for d, what in ((self.path, "guard point"), (self.source, "backing directory")):
            if not os.path.isdir(d):
                raise KernelGuardError(errno.ENOTDIR, f"{what} {d} is not a directory"
                                       if os.path.exists(d) else f"{what} {d} does not exist")
        err = _libc_call("mount", self.source.encode(), self.path.encode(), FSTYPE.encode(),
                         ctypes.c_ulong(MS_NOSUID | MS_NODEV), self.data.encode())
        if err == errno.ENODEV:
            raise KernelGuardError(err, f"cannot mount {FSTYPE} on {self.path}: the kernel "
                                   f"has no {FSTYPE} file system (module not loaded): "
                                   f"{LOAD_HINT}")
        if err:
            raise KernelGuardError(err, f"cannot mount {FSTYPE} on {self.path} (-o "
                                   f"{self.data}): {os.strerror(err)} (the kernel log says "
                                   "why: dmesg)")
        top = self._top()
        if top is None or not self.matches(top):
            shown = f"{top.fstype} {top.source} {top.options}" if top else "nothing"
            if top is not None and top.fstype == FSTYPE:  # ours, not as asked: not kept
                if _libc_call("umount2", self.path.encode(), 0):
                    _libc_call("umount2", self.path.encode(), MNT_DETACH)
            raise KernelGuardError(errno.EIO, f"{self.path}: mounted with -o {self.data}, "
                                   f"but the mount table shows {shown}: unmounted again")
        self.reused = False
        return "mounted"

    def unmount(self) -> str:
        """``"unmounted"``, ``"detached"`` (busy: lazily) or ``"not mounted"`` (this guard
        point's mount is not on top of the path: nothing is touched)."""
        top = self._top()
        if top is None or not self.matches(top):
            self.last_unmount = "not mounted"
            return self.last_unmount
        err = _libc_call("umount2", self.path.encode(), 0)
        if err == errno.EBUSY:
            err = _libc_call("umount2", self.path.encode(), MNT_DETACH)
            if not err:
                self.last_unmount = "detached"
                return self.last_unmount
        if err:
            raise KernelGuardError(err, f"cannot unmount {self.path}: {os.strerror(err)}")
        self.last_unmount = "unmounted"
        return self.last_unmount

    # state ------------------------------------------------------------------------------
    @property
    def is_mounted(self) -> bool:
        top = self._top()
        return top is not None and self.matches(top)

    def mount_problem(self) -> str:
        """Why the path is not served by this guard point's mount ("" if it is)."""
        at = mounts_at(self.path)
        ours = [m for m in at if m.fstype == FSTYPE]
        if not ours:
            return "not mounted"
        top = at[-1]
        if top.fstype != FSTYPE:
            return (f"another file system ({top.fstype}) is mounted over the guard point: "
                    "applications reach it, not takakryptfs")
        if not self.matches(top):
            return (f"the takakryptfs mount has other options ({top.source} {top.options}) "
                    f"than {self.source} {self.data}")
        if len(ours) > 1:
            return f"{len(ours)} takakryptfs mounts stacked on {self.path}"
        return ""

    def visible_to_init(self) -> bool | None:
        """Whether PID 1's mount namespace (host processes) has this mount; None when it
        cannot be told (no mount, /proc/1 unreadable)."""
        top = self._top()
        if top is None or top.fstype != FSTYPE:
            return None
        try:
            return any(m.dev == top.dev and m.fstype == FSTYPE for m in mounts("1"))
        except OSError:
            return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "options": self.data, "reused": self.reused}


def unmount_all(path: str) -> int:
    """Unmount the takakryptfs mounts on top of ``path`` (a kernel guard point's, left
    there when the guard point changed to engine fuse), never lazily: a FUSE mount over a
    busy one would encrypt what takakryptfs encrypts again.  KernelGuardError if one is
    busy; returns how many were unmounted."""
    n = 0
    for _ in range(8):
        at = mounts_at(path)
        if not at or at[-1].fstype != FSTYPE:
            break
        err = _libc_call("umount2", path.encode(), 0)
        if err:
            raise KernelGuardError(err, (
                f"{path}: a takakryptfs mount (engine kernel) is still there and cannot be "
                f"unmounted: {os.strerror(err)}; stop the processes using it, `umount "
                f"{path}`, then `takakrypt reload`"))
        n += 1
    return n


# ---------------------------------------------------------------------------------------
# is the module usable here?

class ModuleState(NamedTuple):
    state: str    # "loaded" | "loadable" | "absent"
    detail: str   # where it was found, or where it was looked for

    def consequence(self) -> str:
        """What takakryptd does with a kernel guard point in this state."""
        if self.state == "loaded":
            return ("takakryptd mounts it in place (mount -t takakryptfs -o key=KEY,gp=ID "
                    "PATH PATH) once it has registered with the module")
        if self.state == "loadable":
            return f"not loaded: {LOAD_HINT}; until then {NO_FALLBACK}"
        return (f"{NO_FALLBACK}; build and install the module (docs/kernel.md) and "
                "`modprobe takakryptfs`, or set engine: fuse")


def _modinfo() -> str | None:
    for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"):
        if d and shutil.which("modinfo", path=d):
            return shutil.which("modinfo", path=d)
    return None


def module_state(*, sys_module: str = "/sys/module", modules_dir: str = "/lib/modules",
                 release: str | None = None, use_modinfo: bool = True) -> ModuleState:
    """Loaded (``/sys/module/takakryptfs``), loadable (``modinfo takakryptfs`` finds it,
    or ``modules.dep`` of the running kernel lists it: what ``modprobe`` uses) or
    absent."""
    if os.path.isdir(os.path.join(sys_module, MODULE)):
        return ModuleState("loaded", os.path.join(sys_module, MODULE))
    release = release or os.uname().release
    exe = _modinfo() if use_modinfo else None
    if exe:
        try:
            r = subprocess.run([exe, "-k", release, "-n", MODULE], capture_output=True,
                               text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                return ModuleState("loadable", r.stdout.strip().splitlines()[0])
        except (OSError, subprocess.TimeoutExpired):
            pass
    base = os.path.join(modules_dir, release)
    try:
        with open(os.path.join(base, "modules.dep"), encoding="utf-8",
                  errors="surrogateescape") as f:
            for line in f:
                rel = line.split(":", 1)[0]
                if os.path.basename(rel).split(".ko", 1)[0] == MODULE and ".ko" in rel:
                    return ModuleState("loadable", os.path.join(base, rel))
    except OSError:
        pass
    return ModuleState("absent", f"no {MODULE} module for kernel {release} in "
                       f"{base}/modules.dep")
