"""Guard points: mount a directory through the C data path (``takakrypt._fuse``).

A guard point serves a backing directory at a mount point.  By default it is *in
place*: the directory is opened first and then mounted over at the same path, so
applications keep their paths while the engine reaches the files underneath through
the descriptor it opened.  Every operation is decided by policy (``decide``); regular
files are served as plaintext (effects permit+apply_key), as the raw TAKA bytes
(permit) or not at all (deny).  See docs/guard-points.md.

Decisions come from the engine's decision cache; a miss asks, in this order:

* ``ring`` (a :class:`takakrypt._ring.Ring` whose consumer is the agent's event loop,
  e.g. ``ringserver.attach(loop, ring, handler.handle_ring)``): the C engine sends a
  TAKA POLICY_CHECK v2 request (absolute path = mount path + "/" + relative path,
  pid = thread group id, process = executable path, start time, exe dev/ino) and waits
  up to ``ring_timeout_ms`` (default 5000, the protocol's timeout) without the GIL.
  No answer, a closed ring, a non-SUCCESS status or a malformed answer deny and are
  audited (``"agent unavailable"``, ``"agent error: REASON"`` for a non-SUCCESS answer
  with a reason, ``"malformed agent answer"``).  rename and link
  check both paths, each request carrying the destination as ``target``.
* otherwise ``decide``.

Callbacks (called from the engine's threads with the GIL; each must be thread-safe
and must never touch the guard point's own mount, which would deadlock):

``decide(uid, gid, pid, path, action) -> (effects, rule, key_version, ttl_seconds)``
    ``pid`` is the caller's thread id, ``path`` is relative to the guard point ("" =
    its root), ``action`` one of :data:`ACTIONS`.  ``effects`` is a bitmask of
    :data:`PERMIT`, :data:`DENY`, :data:`APPLY_KEY`, :data:`AUDIT`, :data:`WOULD_DENY`
    (or an iterable of effect names), plus the caching hint :data:`ANY_PATH` (the
    answer holds for every path of the guard point for this caller and action: it
    is cached once for all of them).  ``ttl_seconds <= 0`` disables caching of this
    answer.  An exception denies.
``get_key(name, version) -> bytes``
    The 32-byte data key; ``version`` is an int >= 1.  Fetched once per (name,
    version) and kept until :meth:`GuardPoint.drop_keys` or the unmount, which wipe it.
``audit(kind, uid, gid, pid, path, action, effects, detail)``
    ``kind`` is ``"access"`` (deny, audit or would-deny decisions, cache hits too) or
    ``"integrity"`` (header or block authentication failures).  Exceptions are ignored.
    With ``audit_decisions=True`` it also receives ``rule`` (the decision's rule index,
    -1: none), ``key_version`` (the key version the decision names, 0: none) and
    ``latency_ns`` (how long the decision took; 0 for events that are not decisions).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable
from typing import Any

from . import _fuse, fuseconn
from ._ring import Ring

PERMIT = _fuse.PERMIT
DENY = _fuse.DENY
APPLY_KEY = _fuse.APPLY_KEY
AUDIT = _fuse.AUDIT
WOULD_DENY = _fuse.WOULD_DENY
ANY_PATH = _fuse.ANY_PATH
#: seconds the kernel may cache directory entries and permitted attributes
#: (docs/guard-points.md, "Kernel caching"); 0 asks the engine on every access
DEFAULT_METADATA_CACHE = 1.0
ACTIONS: tuple[str, ...] = _fuse.ACTIONS
#: action name -> TAKA protocol action code (what ring requests carry)
PROTOCOL_ACTIONS: dict[str, int] = _fuse.PROTOCOL_ACTIONS
_EFFECT_BITS = {"permit": PERMIT, "deny": DENY, "apply_key": APPLY_KEY, "audit": AUDIT,
                "would_deny": WOULD_DENY, "any_path": ANY_PATH}

Decide = Callable[[int, int, int, str, str], tuple[Any, int, int, float]]
GetKey = Callable[[str, int], bytes | bytearray]
Audit = Callable[[str, int, int, int, str, str, int, str], None]


class GuardError(OSError):
    """A guard point could not be mounted or cleaned up."""


def effects_mask(effects: int | Iterable[str]) -> int:
    """Effects as the engine's bitmask (accepts a mask or effect names)."""
    if isinstance(effects, int):
        return effects
    mask = 0
    for e in effects:
        mask |= _EFFECT_BITS[e.replace("-", "_")]
    return mask


# ---------------------------------------------------------------------------------------
# mount table helpers


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _takakrypt_mounts(pid: str = "self") -> list[tuple[str, str]]:
    """(mount point, "major:minor") of every ``fuse.takakrypt`` mount in the mount
    namespace of ``pid``, in mount order; raises OSError if it cannot be read."""
    found = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] != "fuse.takakrypt":
                continue
            fields = left.split(" ")
            found.append((_unescape(fields[4]), fields[2]))
    return found


def fuse_mounts(under: str | None = None) -> list[str]:
    """Mount points of takakrypt FUSE mounts (``fuse.takakrypt``), optionally below a
    directory, deepest first (the order to unmount them in)."""
    try:
        mounts = _takakrypt_mounts()
    except OSError:
        return []
    found = [mp for mp, _dev in mounts
             if under is None or mp == under or mp.startswith(under.rstrip("/") + "/")]
    return sorted(set(found), key=len, reverse=True)


def mount_device(path: str) -> str | None:
    """"major:minor" of the topmost takakrypt mount at ``path``, read from the mount
    table: never from a stat of the mount, which a serving process must not do (its
    own engine would have to answer, and if the process is being killed meanwhile the
    stat waits for ever, in D state)."""
    try:
        devs = [dev for mp, dev in _takakrypt_mounts() if mp == path]
    except OSError:
        return None
    return devs[-1] if devs else None


def visible_to_init(dev: str) -> bool | None:
    """Whether the takakrypt mount ``dev`` ("major:minor") is in PID 1's mount
    namespace, i.e. what host processes see (a service's private namespace, or one
    without propagation towards the host, hides it: they would read the backing files).
    None when /proc/1/mountinfo cannot be read (no verdict)."""
    try:
        return any(d == dev for _mp, d in _takakrypt_mounts("1"))
    except OSError:
        return None


#: seconds a stale-mount probe waits for a mount's server before calling it hung
STAT_TIMEOUT = 5.0


def connection_state(path: str, timeout: float = STAT_TIMEOUT,
                     stores: Collection[int] = (1,)) -> fuseconn.State | None:
    """The state of the FUSE connection of the topmost takakrypt mount at ``path`` (see
    :mod:`takakrypt.fuseconn`: live, dead, hung, held), asked of the connection itself
    and never of a stat, which the kernel answers from its attribute cache; None if no
    takakrypt mount is there.  ``stores``: pids that keep connections without serving
    them (systemd's fd store: PID 1).  The caller decides what a state means to it."""
    for _ in range(3):  # the mount changed between the mount table and the probe
        dev = mount_device(path)
        if dev is None:
            return None
        state = fuseconn.probe(path, dev, timeout, stores)
        if state is not None:
            return state
    return None


def is_stale(path: str, timeout: float = STAT_TIMEOUT) -> bool:
    """True if ``path`` is a takakrypt mount whose connection is dead (its server is
    gone: the kernel refuses requests with ENOTCONN, ECONNABORTED or ECANCELED) or hung
    (no answer within ``timeout`` seconds while a process holds the connection).  A
    connection held without a server (systemd's fd store, a handover) is not stale."""
    state = connection_state(path, timeout)
    return state is not None and state.state in (fuseconn.DEAD, fuseconn.HUNG)


#: seconds a health check waits for a guard point's answer
HEALTH_TIMEOUT = 2.0


def mount_problem(path: str, timeout: float = HEALTH_TIMEOUT) -> str:
    """Why the takakrypt mount at ``path`` does not serve ("" when it does), by a real
    request through it (:func:`connection_state`): its connection is not live, or
    several takakrypt mounts are stacked there (the lower ones are hidden, and an
    in-place guard point on top reaches its files through the one below)."""
    try:
        stacked = sum(1 for mp, _dev in _takakrypt_mounts() if mp == path)
    except OSError as e:
        return f"cannot read the mount table: {e}"
    if stacked > 1:
        return f"{stacked} takakrypt mounts stacked on {path}"
    state = connection_state(path, timeout)
    if state is None:
        return "not mounted"
    if state.state != fuseconn.LIVE:
        return f"the mount does not serve: {state}"
    return ""


FUSECTL = "/sys/fs/fuse/connections"


def _mount_fusectl() -> None:
    """Mount the fusectl file system at FUSECTL, as systemd does at boot
    (sys-fs-fuse-connections.mount); containers and minimal systems may lack it.  As the
    engine's own abort does (tk_fs_abort); a failure is the caller's missing file."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", ctypes.c_ulong(0), None)


def abort_connection(dev: str) -> bool:
    """Abort the FUSE connection of the mount ``dev`` ("major:minor"): every waiter,
    and the server, gets ECONNABORTED (/sys/fs/fuse/connections/N/abort; fusectl is
    mounted there first if it is not)."""
    try:
        name = f"{FUSECTL}/{dev.split(':')[1]}/abort"
    except IndexError:
        return False
    for attempt in (0, 1):
        try:
            with open(name, "w") as f:
                f.write("1")
            return True
        except FileNotFoundError:
            if attempt or os.path.ismount(FUSECTL):
                return False
            _mount_fusectl()
        except OSError:
            return False
    return False


def force_unmount(path: str) -> None:
    """``fusermount3 -u``, then lazy ``-uz``; raises GuardError if both fail."""
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    cmds = [[exe, "-u", path], [exe, "-uz", path]] if exe else []
    cmds += [["umount", path], ["umount", "-l", path]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
    raise GuardError(errno.EBUSY, f"cannot unmount {path}")


def cleanup_stale(path: str) -> bool:
    """Unmount stale (dead or hung) takakrypt mounts at ``path``; a served one is left
    alone.  Returns True if something was unmounted.  Raises GuardError for a connection
    held without a server: it is someone's to pick up, and a mount stacked on it would
    reach its files through a connection nobody answers."""
    path = os.path.abspath(path)
    done = False
    while (state := connection_state(path)) is not None:
        if state.state == fuseconn.HELD:
            raise GuardError(errno.EBUSY, f"{path}: {state}; serve or release it first")
        if state.state not in (fuseconn.DEAD, fuseconn.HUNG):
            break
        dev = mount_device(path)
        if dev is not None:
            abort_connection(dev)  # a hung server: waiters and our probe get ECONNABORTED
        force_unmount(path)
        done = True
    return done


# ---------------------------------------------------------------------------------------
# the guard point


def raise_nofile_limit() -> int:
    """The engine keeps an O_PATH descriptor per inode the kernel remembers (like a
    low-level passthrough filesystem), so a tree of many files needs many descriptors.
    Raise RLIMIT_NOFILE as far as allowed (root: up to fs.nr_open); returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = max(hard, min(int(f.read()), 1 << 20))
        except (OSError, ValueError):
            pass
    for target in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft


class GuardPoint:
    """One guard point.  ``mount()`` returns when the mount is live; the engine runs in
    C threads (``threads`` workers) with the GIL released between callbacks."""

    def __init__(self, path: str | os.PathLike[str], *, backing: str | os.PathLike[str] | None
                 = None, key_name: str, get_key: GetKey, decide: Decide | None = None,
                 audit: Audit | None = None, threads: int = 4, cache: int | None = None,
                 current_version: int | Callable[[str], int] = 1, debug: bool = False,
                 ring: Ring | None = None, ring_timeout_ms: int = _fuse.RING_TIMEOUT_MS,
                 metadata_cache: float = DEFAULT_METADATA_CACHE,
                 io_uring: bool = True, read_helpers: bool = True,
                 audit_decisions: bool = False, format_version: int = 1) -> None:
        if decide is None and ring is None:
            raise ValueError("a guard point needs decide or ring")
        # the parent resolved, not the path itself: a stat of the mountpoint is a
        # request to the guard point, which a successor must not send before it
        # serves (resume) -- it would wait for itself
        p = os.path.normpath(os.path.abspath(os.fspath(path)))
        self.path = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        self.backing = os.path.realpath(os.fspath(backing)) if backing is not None else None
        self.key_name = key_name
        self._get_key = get_key
        self._decide = decide
        self._audit = audit
        self._audit_nargs = 11 if audit_decisions else 8
        self._current = current_version
        self.ring = ring
        self._m = _fuse.Mount(self.path, self.backing, key_name,
                              self._decide_cb if decide is not None else None,
                              self._key_cb, self._audit_cb if audit else None,
                              threads=threads, cache_entries=cache or 0, debug=debug,
                              ring=ring, ring_timeout_ms=ring_timeout_ms,
                              meta_timeout=metadata_cache, io_uring=io_uring,
                              read_helpers=read_helpers, format_version=format_version)
        self.io_uring = io_uring
        self.read_ahead_kb: int | None = None  # set by mount()

    # callbacks (engine threads) --------------------------------------------------------
    def _decide_cb(self, uid: int, gid: int, pid: int, path: str, action: str) -> tuple:
        assert self._decide is not None
        effects, rule, key_version, ttl = self._decide(uid, gid, pid, path, action)
        return effects_mask(effects), int(rule), int(key_version), float(ttl)

    def _key_cb(self, name: str, version: int | None) -> tuple[int, bytearray]:
        if version is None:
            version = self._current(name) if callable(self._current) else int(self._current)
        raw = self._get_key(name, version)
        key = raw if isinstance(raw, bytearray) else bytearray(raw)
        return version, key

    def _audit_cb(self, *args: Any) -> None:
        assert self._audit is not None
        self._audit(*args[:self._audit_nargs])

    # lifecycle ---------------------------------------------------------------------------
    def mount(self) -> None:
        if self.is_mounted:
            raise GuardError(errno.EBUSY, f"{self.path} is already mounted by this guard point")
        cleanup_stale(self.path)
        raise_nofile_limit()
        if self.io_uring:
            enable_fuse_io_uring()
        if not os.path.isdir(self.path):
            raise GuardError(errno.ENOTDIR, f"{self.path} is not a directory")
        if self.backing is not None and not os.path.isdir(self.backing):
            raise GuardError(errno.ENOTDIR, f"backing {self.backing} is not a directory")
        try:
            self._m.mount()
        except OSError as e:
            raise GuardError(e.errno, f"cannot mount guard point {self.path}: {e.strerror}") \
                from None
        self.read_ahead_kb = set_read_ahead(self.path, READ_AHEAD_KB)

    def unmount(self) -> None:
        self._m.unmount()

    # handover to a successor process (docs/guard-points.md, "Restarts without
    # unmounting") --------------------------------------------------------------------------
    def handover_begin(self) -> tuple[list[int], bytes]:
        """Stop taking requests (they wait in the kernel), finish the ones in progress,
        and return ``(fds, state)`` for a successor's :meth:`resume`.  The fds stay
        ours (send copies; ``fds[0]`` is the /dev/fuse fd).  Nothing is served until
        :meth:`handover_abort` or :meth:`handover_done`."""
        try:
            return self._m.handover_begin()
        except OSError as e:
            raise GuardError(e.errno, f"cannot hand {self.path} over: {e.strerror}") from None

    def persist_fds(self) -> list[int]:
        """The fds to keep outside this process (systemd's file descriptor store) so a
        successor can take the guard point over even after this one is killed:
        ``resume(fds, b"")``.  Ours: keep copies.  Empty if not mounted."""
        return self._m.persist_fds()

    def handover_abort(self) -> None:
        """The successor failed: serve again."""
        self._m.handover_abort()

    def handover_done(self) -> None:
        """The successor serves: let go for good, never unmounting."""
        self._m.handover_done()

    def resume(self, fds: list[int], state: bytes) -> None:
        """Instead of :meth:`mount`: take a predecessor's connection over.  The fds are
        duplicated (close yours after).  Raises GuardError if it cannot; the
        predecessor then goes on serving (or the requests keep waiting in the kernel
        for the next successor) -- the path is never uncovered."""
        if self.is_mounted:
            raise GuardError(errno.EBUSY, f"{self.path} is already mounted by this guard point")
        raise_nofile_limit()
        try:
            self._m.resume(list(fds), state)
        except (OSError, ValueError) as e:
            raise GuardError(getattr(e, "errno", None) or errno.EINVAL,
                             f"cannot take guard point {self.path} over: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        self.read_ahead_kb = set_read_ahead(self.path, READ_AHEAD_KB)

    @property
    def is_mounted(self) -> bool:
        return self._m.is_mounted

    def mount_problem(self) -> str:
        """Why this guard point's mount does not serve, "" if it does (a real request
        through it: :func:`mount_problem`)."""
        return mount_problem(self.path)

    def bump_generation(self) -> int:
        """Policy reload: hide every cached decision."""
        return self._m.bump_generation()

    def invalidate(self) -> None:
        """Drop cached decisions and per-file header state."""
        self._m.invalidate()

    def drop_keys(self) -> None:
        """Wipe the data keys the engine holds (key cache expiry, docs/keys.md): each
        file's keys are fetched again through ``get_key`` at its next use."""
        self._m.drop_keys()

    # live rekey (docs/guard-points.md, "Live rekey (data path)") --------------------------
    def rekey_file(self, relpath: str, *, version: int = 0, rate: int = 0,
                   chunk_blocks: int = 256) -> tuple[str, int]:
        """Re-encrypt one file (``relpath`` relative to the backing directory) to
        ``version`` of its key (0: the current one) while applications keep using it;
        ``(outcome, bytes_written)``, outcome one of ``_fuse.REKEY_OUTCOMES``.  Blocks
        (without the GIL); raises OSError (EIO: does not verify, ENOKEY: no key,
        ENOENT: gone).  See :meth:`takakrypt._fuse.Mount.rekey_file`."""
        return self._m.rekey_file(relpath, version=version, rate=rate,
                                  chunk_blocks=chunk_blocks)

    def rekey_cancel(self, on: bool = True) -> None:
        """Make running and new :meth:`rekey_file` calls stop ("cancelled", the
        original untouched) until called with ``False``."""
        self._m.rekey_cancel(on)

    def backing_fd(self) -> int:
        """A new descriptor of the backing directory (the caller closes it); it reaches
        the files under an in-place mount too."""
        return self._m.backing_fd()

    def set_policy_hints(self, plain_only: bool, getattr_all: bool,
                         process_free: bool = False) -> None:
        """What the policy engine proved for every caller and path
        (:meth:`takakrypt.policy.Engine.metadata_hints`): lets the kernel keep regular
        files' entries (``plain_only``) and attributes (``getattr_all`` too);
        ``process_free`` (:meth:`takakrypt.policy.Engine.process_free`): decisions
        depend on the caller's uid and gid only, so checks read nothing from /proc.
        Call again after every policy reload; the default is none."""
        self._m.set_hints((_fuse.HINT_PLAIN_ONLY if plain_only else 0)
                          | (_fuse.HINT_GETATTR_ALL if plain_only and getattr_all else 0)
                          | (_fuse.HINT_NO_PROCESS if process_free else 0))

    def stats(self) -> dict[str, Any]:
        s = self._m.stats()
        s["last_callback_error"] = self._m.last_callback_error
        s["read_ahead_kb"] = self.read_ahead_kb
        return s

    def __enter__(self) -> GuardPoint:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


FUSE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
#: kernel readahead for a guard point (KiB): two FUSE read requests of the largest size
#: the engine negotiates (1 MiB) instead of the default 128 KiB, so a sequential read is
#: 8x fewer round trips, decrypts in larger batches and keeps two requests in flight
#: (one would leave the engine idle while the kernel asks for the next; readahead.sh)
READ_AHEAD_KB = 2048


def set_read_ahead(mountpoint: str, kb: int) -> int | None:
    """Set the readahead of the FUSE mount at ``mountpoint`` (its bdi in sysfs; FUSE
    cannot raise it through INIT).  Returns the value in force, or None where it cannot
    be read or set (not root, no sysfs): the kernel's default stays."""
    dev = mount_device(os.path.realpath(mountpoint))
    if dev is None:
        return None
    try:
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(int(kb)))
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def enable_fuse_io_uring(param: str = FUSE_URING_PARAM) -> bool:
    """Let FUSE servers use io_uring (kernel >= 6.14; the module parameter is off by
    default).  It only allows servers that ask for it; others are unaffected.  True if
    it is on afterwards; False where the kernel has no such parameter or we may not
    set it (the guard point then uses the classic /dev/fuse channel)."""
    try:
        with open(param) as f:
            if f.read().strip() in ("Y", "1"):
                return True
        with open(param, "w") as f:
            f.write("Y")
        with open(param) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def allow_all(uid: int, gid: int, pid: int, path: str, action: str) -> tuple[int, int, int, float]:
    """Everyone gets plaintext (tests and benchmarks only)."""
    return PERMIT | APPLY_KEY | ANY_PATH, 0, 1, 3600.0


def policy_decider(engine: Any, policy: str, *, default_ttl: float = 60.0) -> Decide:
    """A ``decide`` callback on top of :class:`takakrypt.policy.Engine`."""
    from .policy import Request
    from .procinfo import ProcessGone, inspect

    def decide(uid: int, gid: int, pid: int, path: str, action: str) -> tuple:
        try:
            proc = inspect(pid)
        except ProcessGone:
            return DENY, -1, 0, 0.0
        d = engine.evaluate(policy, Request(uid=uid, gid=gid, groups=proc.groups,
                                            process=proc, path=path, action=action))
        mask = (PERMIT if d.permit else DENY) | (APPLY_KEY if d.apply_key else 0)
        mask |= (AUDIT if d.audit else 0) | (WOULD_DENY if d.would_deny else 0)
        mask |= ANY_PATH if d.any_path else 0
        ttl = default_ttl if d.cache_ttl is None else min(default_ttl, d.cache_ttl)
        return mask, d.rule, 0, ttl

    return decide


# ---------------------------------------------------------------------------------------
# python -m takakrypt.guard


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m takakrypt.guard",
        description="Serve one guard point in the foreground (tests and benchmarks).")
    ap.add_argument("--mountpoint", required=True)
    ap.add_argument("--backing", help="separate backing directory (default: in place)")
    ap.add_argument("--key-file", required=True, help="file holding a 32-byte raw key")
    ap.add_argument("--key-name", default="guard")
    ap.add_argument("--allow-all", action="store_true", required=True,
                    help="permit+apply_key for everyone (the only policy offered here)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--metadata-cache", type=float, default=DEFAULT_METADATA_CACHE,
                    metavar="SECONDS", help="kernel caching of directory entries and "
                    "attributes (docs/guard-points.md); 0: none")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--no-io-uring", dest="io_uring", action="store_false",
                    help="serve over the classic /dev/fuse channel only")
    ap.add_argument("--no-read-helpers", dest="read_helpers", action="store_false",
                    help="decrypt large reads on the serving thread alone, not on helper "
                    "threads pinned to the other CPUs")
    ap.add_argument("--stats-file", help="write the guard point's counters (JSON) here on "
                    "SIGUSR1 and at exit")
    ap.add_argument("--format", type=int, choices=(1, 2), default=1,
                    help="TAKA version of the files it creates (docs/file-format.md)")
    a = ap.parse_args(argv)
    from .cli import harden_process
    from .sigflags import SignalFlags

    harden_process()  # no core file, no ptrace: this process holds the key
    with open(a.key_file, "rb") as f:
        key = f.read()
    if len(key) != 32:
        print(f"takakrypt.guard: {a.key_file} must hold exactly 32 bytes", file=sys.stderr)
        return 2
    gp = GuardPoint(a.mountpoint, backing=a.backing, key_name=a.key_name,
                    get_key=lambda name, version: key, decide=allow_all,
                    threads=a.threads, debug=a.debug, metadata_cache=a.metadata_cache,
                    io_uring=a.io_uring, read_helpers=a.read_helpers,
                    format_version=a.format)
    gp.set_policy_hints(plain_only=True, getattr_all=True,  # what allow_all decides
                        process_free=True)
    sigs = SignalFlags(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def write_stats() -> None:
        if a.stats_file:
            tmp = a.stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(gp.stats(), f, indent=1, default=str)
            os.replace(tmp, a.stats_file)
    try:
        gp.mount()
    except GuardError as e:
        print(f"takakrypt.guard: {e}", file=sys.stderr)
        return 1
    print(f"mounted {gp.path}", flush=True)
    try:
        while not sigs.seen(signal.SIGTERM, signal.SIGINT):
            sigs.sleep()
            if sigs.take(signal.SIGUSR1):
                write_stats()
            if not gp.is_mounted:  # unmounted from outside
                break
    finally:
        write_stats()
        gp.unmount()
    return 0


if __name__ == "__main__":
    sys.exit(main())
