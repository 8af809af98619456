"""Live rekey of a guard point: every file re-encrypted to its key's current version
while applications keep using it (docs/operations.md, "Rotating keys and live rekey").

One :class:`Rekey` per guard point runs in a thread of takakryptd.  It walks the
backing directory in a fixed order (names sorted byte-wise, depth first) and hands each
regular file to the data path's ``rekey_file`` (docs/guard-points.md, "Live rekey (data
path)"), which copies the file under its new per-file key beside the original and swaps
it in atomically, so a reader sees the whole old or the whole new file and open
descriptors follow.  This module owns what is around that: the run's state, the order,
the rate limit across files, pause/resume, retries of files that were busy, progress,
audit events and the state file that makes a run survive a restart of takakryptd.

The state file is ``.takakrypt-rekey.state`` in the backing directory (hidden by the
guard point like every ``.takakrypt-`` name; engine kernel: in takakryptd's state
directory): JSON, written atomically (temp + fsync + rename + fsync of the directory) at
most every second during the walk (SAVE_EVERY) and at every stop, pause and end, so a
SIGKILL loses at most the file being copied, whose copy the data path throws away (the
original is untouched until the atomic swap), and the record of the files finished in
the last second, which the resumed walk finds on the target version and passes over.
On restart takakryptd resumes every run the file says is ``running``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from .. import rekeyfile
from ..errors import RekeyError, UsageError

log = logging.getLogger("takakrypt.rekey")

STATE_NAME = ".takakrypt-rekey.state"
STATE_FORMAT = "takakrypt-rekey-state"
#: names the walk never hands to the data path (the guard point hides them)
HIDDEN_PREFIX = ".takakrypt-"
#: a file that stayed busy (renamed, raw-written) this many times is reported, not retried
MAX_BUSY = 20
#: files listed in the state's ``errors`` (the count goes on)
MAX_ERRORS_KEPT = 100
#: the walk's progress goes to the state file at most this often (seconds), and at every
#: stop: after a crash the files finished since are found current again, cheaply
SAVE_EVERY = 1.0
#: passes over the headers after the walk, each rekeying what is still on an older
#: version (a file renamed behind the walk); what is left after the last is reported
MAX_SWEEPS = 5

RUNNING, PAUSED, DONE, FAILED = "running", "paused", "done", "failed"
#: a full backing file system (or quota), or one that became read-only (ext4 does after
#: disk errors): not a file's fault, so the run pauses and nothing is counted as failed
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PAUSE_ERRNOS = (*NO_SPACE, errno.EROFS)


class _Unwritable(Exception):
    """The backing file system is full or read-only: the run pauses (``resume`` once it
    takes writes again)."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(what)
        self.what, self.errno = what, err


class RekeyState(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    guard: str
    key: str
    target_version: int
    state: str                      # running | paused | done | failed
    rate: int                       # bytes/s of ciphertext written, 0: unlimited
    started: float
    updated: float
    finished: float | None = None
    cursor: list[str] | None = None  # path components of the last file finished
    files_total: int = 0            # regular files seen by the counting walk
    bytes_total: int = 0            # their stored bytes
    files_rekeyed: int = 0
    files_current: int = 0          # already on the target version
    files_skipped: int = 0          # hard links, not regular
    files_failed: int = 0
    bytes_rekeyed: int = 0
    busy: dict[str, int] = {}       # relpath -> busy count, retried at the end of the walk
    phase: str = "walk"             # walk | sweep (the checks of the headers after the walk)
    sweeps: int = 0                 # sweeps begun
    files_swept: int = 0            # of files_rekeyed: found on an older version by a sweep
    errors: list[dict[str, str]] = []
    runs: int = 1                   # starts + resumes after a restart
    reason: str = ""                # why failed / paused

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self)
        d.pop("format"), d.pop("version")
        d["busy"] = len(self.busy)
        done = self.files_rekeyed + self.files_current + self.files_skipped + self.files_failed
        d["files_done"] = done
        d["progress"] = round(min(1.0, self.bytes_rekeyed / self.bytes_total), 4) \
            if self.bytes_total else (1.0 if self.state == DONE else 0.0)
        now = self.finished or time.time()
        el = max(now - self.started, 1e-6)
        d["rate_reached"] = round(self.bytes_rekeyed / el)
        return d


def load_state(dirfd: int) -> RekeyState | None:
    """The state file of a backing directory, None if there is none.  A damaged file
    raises UsageError naming it (never silently restarts a run)."""
    try:
        fd = os.open(STATE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    try:
        st = msgspec.json.decode(data, type=RekeyState)
    except msgspec.DecodeError as e:
        raise UsageError(f"{STATE_NAME}: damaged rekey state ({e}); remove it and start "
                         "the rekey again (files already rekeyed are skipped)") from None
    if st.format != STATE_FORMAT or st.version != 1 or st.state not in (
            RUNNING, PAUSED, DONE, FAILED):
        raise UsageError(f"{STATE_NAME}: not a version 1 rekey state")
    return st


def save_state(dirfd: int, st: RekeyState) -> None:
    st.updated = time.time()
    tmp = f"{STATE_NAME}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dirfd)
    try:
        try:
            data = msgspec.json.encode(st)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, STATE_NAME, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        # a full disk must not leave a half-written temporary behind (the old state
        # file, if any, is untouched)
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise
    os.fsync(dirfd)


def _state_error(guard_path: str, e: OSError) -> RekeyError:
    why = os.strerror(e.errno) if e.errno else str(e)
    hint = (": free space on the backing file system (a file being rekeyed also needs "
            "room for a whole copy of itself) and start again") if e.errno in NO_SPACE else (
        ": the backing file system takes no writes; start again once it does"
        if e.errno == errno.EROFS else "")
    return RekeyError(f"{guard_path}: the rekey state cannot be written in the backing "
                      f"directory ({why}){hint}")


def walk(dirfd: int, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], int]]:
    """Regular files below ``dirfd`` as (path components, stored size), names sorted
    byte-wise, depth first; ``.takakrypt-*`` names and other file systems skipped.  A
    directory that vanishes or cannot be read is passed over (the next run sees it)."""
    try:
        names = sorted(os.listdir(dirfd), key=os.fsencode)
    except OSError:
        return
    dev = os.fstat(dirfd).st_dev
    for name in names:
        if name.startswith(HIDDEN_PREFIX):
            continue
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield (*prefix, name), st.st_size
        elif stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dirfd)
            except OSError:
                continue
            try:
                yield from walk(sub, (*prefix, name))
            finally:
                os.close(sub)


def remove_leftovers(dirfd: int) -> int:
    """Remove what an interrupted rekey left below ``dirfd``: the data path's
    temporaries anywhere in the tree (:func:`takakrypt.rekeyfile.remove_leftovers`) and
    a half-written copy of the state file at the top (never the state file itself); the
    number removed.  Only while no rekey of the directory runs."""
    n = rekeyfile.remove_leftovers(dirfd)
    try:
        names = os.listdir(dirfd)
    except OSError:
        return n
    for name in names:
        if name.startswith(STATE_NAME + ".tmp-"):
            try:
                if stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=dirfd)
                    n += 1
            except OSError:
                pass
    return n


def _key(parts: tuple[str, ...] | list[str]) -> tuple[bytes, ...]:
    return tuple(os.fsencode(p) for p in parts)


class Pacer:
    """Token bucket over bytes: ``wait(n)`` sleeps so that the long-run rate stays at
    ``rate`` bytes/s (a burst of one second's worth is allowed).  ``rate`` 0: no limit."""

    def __init__(self, rate: int, sleep: Callable[[float], Any]) -> None:
        self.rate = rate
        self._sleep = sleep
        self._t = time.monotonic()
        self._tokens = float(rate)

    def wait(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


class Rekey:
    """The rekey of one guard point.  ``guard`` is the data path (a FUSE GuardPoint, or
    :class:`takakrypt.agent.krekey.KernelRekeyFiles`):
    ``rekey_file(relpath, version=, rate=) -> (outcome, bytes)``, ``rekey_cancel(bool)``,
    ``backing_fd()`` (a descriptor of the directory to walk) and optionally
    ``state_fd()`` (of the directory for the state file; default the walked one)."""

    def __init__(self, guard_path: str, key: str, guard: Any, *,
                 audit: Callable[[str, str, dict[str, Any], str], None],
                 current_version: Callable[[str], int]) -> None:
        self.guard_path = guard_path
        self.key = key
        self.guard = guard
        self._audit = audit
        self._current_version = current_version
        self._dirfd = guard.backing_fd()
        # where the state file lives: the backing directory (FUSE, which hides it), or
        # takakryptd's state directory (engine kernel: agent.krekey)
        self._statefd = guard.state_fd() if hasattr(guard, "state_fd") else self._dirfd
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False          # shutdown: leave the state as it is (resumed later)
        self._given_up: set[str] = set()  # failed or skipped in this process: not swept
        self._saved = 0.0                   # time.monotonic() of the walk's last save
        self.state: RekeyState | None = load_state(self._statefd)

    # control ------------------------------------------------------------------------------
    def start(self, rate: int, version: int = 0, *, restart: bool = False) -> dict[str, Any]:
        if restart:
            self._halt()            # a run still going ends before the new one begins
        with self._lock:
            st = self.state
            if st is not None and st.state in (RUNNING, PAUSED) and not restart:
                raise UsageError(f"a rekey of {self.guard_path} is already {st.state} "
                                 f"(to version {st.target_version}): use status, pause or "
                                 "resume")
            target = version or self._current_version(self.key)
            now = time.time()
            new = RekeyState(format=STATE_FORMAT, version=1, guard=self.guard_path,
                             key=self.key, target_version=target, state=RUNNING,
                             rate=rate, started=now, updated=now)
            try:
                save_state(self._statefd, new)
            except OSError as e:
                raise _state_error(self.guard_path, e) from None
            self._given_up.clear()
            self.state = new
        self._audit("rekey", f"rekey started: every file to {self.key} version {target}",
                    {"key": self.key, "target_version": target, "rate": rate}, self.guard_path)
        self._spawn()
        return self.status()

    def resume_after_restart(self) -> bool:
        """takakryptd started: continue a run its state file says is running."""
        with self._lock:
            st = self.state
            if st is None or st.state != RUNNING:
                return False
            st.runs += 1
            save_state(self._statefd, st)
        self._audit("rekey", "rekey resumed after a restart of takakryptd",
                    {"key": self.key, "target_version": st.target_version,
                     "files_done": st.as_dict()["files_done"]}, self.guard_path)
        self._spawn()
        return True

    def pause(self) -> dict[str, Any]:
        with self._lock:
            st = self._need()
            if st.state != RUNNING:
                raise UsageError(f"the rekey of {self.guard_path} is {st.state}, not running")
            st.state = PAUSED
            st.reason = "paused by the operator"
            try:
                save_state(self._statefd, st)
            except OSError as e:
                # paused all the same; the file still says running, so a restart of
                # takakryptd would resume the run: say so
                st.reason += f" (not saved: {os.strerror(e.errno or errno.EIO)})"
                log.warning("rekey of %s: pause not saved in the state file: %s",
                            self.guard_path, e)
            self.guard.rekey_cancel(True)  # the file being copied stops at its next chunk
        self._join()
        self.guard.rekey_cancel(False)
        self._audit("rekey", "rekey paused", {"files_done": st.as_dict()["files_done"]},
                    self.guard_path)
        return self.status()

    def resume(self, rate: int | None = None) -> dict[str, Any]:
        with self._lock:
            st = self._need()
            if st.state != PAUSED:
                raise UsageError(f"the rekey of {self.guard_path} is {st.state}, not paused")
            before = (st.state, st.reason, st.rate)
            st.state, st.reason = RUNNING, ""
            if rate is not None:
                st.rate = rate
            try:
                save_state(self._statefd, st)
            except OSError as e:
                st.state, st.reason, st.rate = before
                raise _state_error(self.guard_path, e) from None
        self._audit("rekey", "rekey resumed", {"rate": st.rate}, self.guard_path)
        self._spawn()
        return self.status()

    def status(self) -> dict[str, Any]:
        with self._lock:
            if self.state is None:
                return {"guard": self.guard_path, "state": "none"}
            return self.state.as_dict() | {"active": self.active}

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """takakryptd stops: end the thread, keep the state (a running rekey resumes
        at the next start)."""
        self._halt()
        for fd in {self._dirfd, self._statefd}:
            try:
                os.close(fd)
            except OSError:
                pass

    def _halt(self) -> None:
        """End the thread (the file being copied stops at its next chunk), leaving the
        state as it is."""
        self._stop = True
        if self.active:
            self.guard.rekey_cancel(True)
            self._wake.set()
            self._join()
            self.guard.rekey_cancel(False)

    def _need(self) -> RekeyState:
        if self.state is None:
            raise UsageError(f"no rekey of {self.guard_path} was started")
        return self.state

    def _spawn(self) -> None:
        self._join()
        self._stop = False
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name=f"rekey {self.guard_path}",
                                        daemon=True)
        self._thread.start()

    def _join(self) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    # the run ------------------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)

    def _running(self) -> bool:
        st = self.state
        return not self._stop and st is not None and st.state == RUNNING

    def _run(self) -> None:
        st = self.state
        assert st is not None
        try:
            if not st.files_total:
                total = nbytes = 0
                for _, size in walk(self._dirfd):
                    total += 1
                    nbytes += size
                with self._lock:
                    st.files_total, st.bytes_total = total, nbytes
            pacer = Pacer(st.rate, self._sleep)
            cursor = _key(st.cursor) if st.cursor else None
            for parts, _size in (walk(self._dirfd) if st.phase == "walk" else ()):
                if not self._running():
                    with self._lock:
                        save_state(self._statefd, st)  # the cursor as far as it got
                    return
                if cursor is not None and _key(parts) <= cursor:
                    continue
                self._one("/".join(parts), pacer)
                with self._lock:
                    st.cursor = list(parts)
                    now = time.monotonic()
                    if now - self._saved >= SAVE_EVERY:
                        save_state(self._statefd, st)
                        self._saved = now
            if not self._retry_busy(pacer):
                return
            if not self._sweep(pacer):
                return
            with self._lock:
                st.state = DONE
                st.finished = time.time()
                save_state(self._statefd, st)
            d = st.as_dict()
            self._audit("rekey", f"rekey finished: {d['files_rekeyed']} file(s) rekeyed to "
                        f"version {st.target_version}, {d['files_failed']} failed",
                        {k: d[k] for k in ("target_version", "files_rekeyed", "files_current",
                                           "files_skipped", "files_failed", "bytes_rekeyed",
                                           "rate_reached")}, self.guard_path)
            log.info("rekey of %s finished: %s", self.guard_path, d)
        except _Unwritable as e:
            self._pause_unwritable(e.what, e.errno)
        except OSError as e:
            if e.errno not in PAUSE_ERRNOS:
                self._fail(e)
            else:
                self._pause_unwritable("the rekey state", e.errno)
        except Exception as e:  # noqa: BLE001 - the run stops, says why, can be resumed
            self._fail(e)

    def _pause_unwritable(self, what: str, err: int) -> None:
        """The backing file system is full or read-only: pause (nothing counted as failed;
        the file whose copy did not fit is done again on resume) rather than fail file
        after file."""
        st = self.state
        assert st is not None
        with self._lock:
            st.state = PAUSED
            if err in NO_SPACE:
                st.reason = (f"no space left on the backing file system for {what}: free "
                             "space (each file being rekeyed needs room for a whole copy of "
                             f"itself), then run `takakrypt rekey resume {self.guard_path}`")
            else:
                st.reason = (f"the backing file system takes no writes ({os.strerror(err)}) "
                             f"for {what}: once it does, run `takakrypt rekey resume "
                             f"{self.guard_path}`")
            try:
                save_state(self._statefd, st)
            except OSError:
                pass  # the file says running: a restart resumes and pauses again if full
        log.warning("rekey of %s paused: %s", self.guard_path, st.reason)
        self._audit("rekey", f"rekey paused: {st.reason}",
                    {"errno": err, "files_done": st.as_dict()["files_done"]}, self.guard_path)

    def _fail(self, e: BaseException) -> None:
        """Anything else stops the run as failed (it can be started again)."""
        st = self.state
        assert st is not None
        log.exception("rekey of %s failed", self.guard_path)
        with self._lock:
            st.state, st.reason = FAILED, f"{type(e).__name__}: {e}"
            try:
                save_state(self._statefd, st)
            except OSError:
                pass
        self._audit("rekey", f"rekey failed: {st.reason}", {}, self.guard_path)

    def _retry_busy(self, pacer: Pacer) -> bool:
        """Files that were busy, again until none is or they gave up; False: stopped."""
        st = self.state
        assert st is not None
        while st.busy and self._running():
            for rel in sorted(st.busy):
                if not self._running():
                    return False
                self._one(rel, pacer, retry=True)
                with self._lock:
                    save_state(self._statefd, st)
            if st.busy:
                self._sleep(0.5)
        return self._running()

    def _sweep(self, pacer: Pacer) -> bool:
        """After the walk: read every header again and rekey what still names an older
        version of the key.  The walk lists a directory once, so a file renamed behind it
        (from a name not yet reached to one already passed, or into a directory already
        done: PostgreSQL recycles WAL segments that way) was never handed over; new files
        are created on the current version, so passes converge.  At most MAX_SWEEPS; what
        is still old after the last is reported as failed.  False: stopped."""
        st = self.state
        assert st is not None
        with self._lock:
            if st.phase != "sweep":
                st.phase = "sweep"
                save_state(self._statefd, st)
        while True:
            with self._lock:
                st.sweeps += 1
                save_state(self._statefd, st)
            given_up = self._given_up | {e["path"] for e in st.errors}
            old = [rel for rel, v in key_versions(self._dirfd, st.key)
                   if v < st.target_version and rel not in given_up]
            if not old:
                return self._running()
            if st.sweeps > MAX_SWEEPS:
                with self._lock:
                    st.files_failed += len(old)
                    for rel in old[:max(0, MAX_ERRORS_KEPT - len(st.errors))]:
                        st.errors.append({"path": rel, "error": "still on an older version "
                                          f"after {MAX_SWEEPS} sweeps (renamed during each)"})
                    save_state(self._statefd, st)
                return self._running()
            log.info("rekey of %s: sweep %d found %d file(s) on an older version",
                     self.guard_path, st.sweeps, len(old))
            for rel in old:
                if not self._running():
                    return False
                before = st.files_rekeyed
                self._one(rel, pacer)
                with self._lock:
                    st.files_swept += st.files_rekeyed - before
                    save_state(self._statefd, st)
            if not self._retry_busy(pacer):
                return False

    def _one(self, rel: str, pacer: Pacer, *, retry: bool = False) -> None:
        st = self.state
        assert st is not None
        try:
            outcome, nbytes = self.guard.rekey_file(rel, version=st.target_version,
                                                    rate=st.rate)
        except FileNotFoundError:
            outcome, nbytes = "gone", 0    # deleted since the walk saw it: nothing to do
        except OSError as e:
            if e.errno in PAUSE_ERRNOS:
                # not this file's fault: the run pauses and the file is done again on
                # resume (the walk's cursor has not passed it; a busy one stays listed)
                raise _Unwritable(f"a copy of {rel}", e.errno) from None
            with self._lock:
                st.busy.pop(rel, None)
                st.files_failed += 1
                self._given_up.add(rel)
                if len(st.errors) < MAX_ERRORS_KEPT:
                    st.errors.append({"path": rel, "error": os.strerror(e.errno or errno.EIO)
                                      + (f": {e.strerror}" if e.strerror and
                                         e.strerror != os.strerror(e.errno or 0) else "")})
            self._audit("rekey-file", f"rekey of a file failed: {e.strerror or e}",
                        {"outcome": "failed", "errno": e.errno or 0}, self._full(rel))
            return
        with self._lock:
            if outcome == "busy":
                n = st.busy.get(rel, 0) + 1
                if n >= MAX_BUSY:
                    st.busy.pop(rel, None)
                    st.files_failed += 1
                    self._given_up.add(rel)
                    if len(st.errors) < MAX_ERRORS_KEPT:
                        st.errors.append({"path": rel, "error": "busy: changed by raw writes "
                                          "or renamed during every attempt"})
                else:
                    st.busy[rel] = n
                return
            if outcome == "cancelled":
                if retry:
                    return
                st.busy[rel] = st.busy.get(rel, 0)  # pause/stop: done again on resume
                return
            st.busy.pop(rel, None)
            if outcome == "done":
                st.files_rekeyed += 1
                st.bytes_rekeyed += nbytes
            elif outcome in ("current", "gone"):
                st.files_current += 1
            else:
                st.files_skipped += 1
                self._given_up.add(rel)
                if len(st.errors) < MAX_ERRORS_KEPT:
                    st.errors.append({"path": rel, "error": outcome})
        if outcome == "done":
            self._audit("rekey-file", "file rekeyed",
                        {"outcome": outcome, "to_version": st.target_version,
                         "bytes": nbytes}, self._full(rel))
            pacer.wait(nbytes)
        elif outcome.startswith("skipped"):
            self._audit("rekey-file", f"file not rekeyed: {outcome}", {"outcome": outcome},
                        self._full(rel))

    def _full(self, rel: str) -> str:
        return os.path.join(self.guard_path, rel)


def _header_key(dirfd: int, rel: str) -> tuple[str, range, int] | None:
    """(key name, key versions) a backing file's header names and its link count; None
    if it cannot be read or parsed.  Parsed, not authenticated (that needs the key).
    The versions are one for a v1 file, [oldest, write version] for a v2 file."""
    from ..errors import FormatError
    from ..format import HEADER_SIZE, parse_header

    try:
        fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME,
                     dir_fd=dirfd)
    except PermissionError:
        try:
            fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError:
            return None
    except OSError:
        return None
    try:
        head = os.pread(fd, HEADER_SIZE, 0)
        nlink = os.fstat(fd).st_nlink
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        h = parse_header(head)
    except FormatError:
        return None
    return h.key_id, h.versions, nlink


def key_versions(dirfd: int, key: str) -> Iterator[tuple[str, int]]:
    """(relative path, oldest version) of every file below ``dirfd`` with one name whose
    header names ``key`` (hard-linked files are never rekeyed)."""
    for parts, _size in walk(dirfd):
        rel = "/".join(parts)
        hk = _header_key(dirfd, rel)
        if hk is not None and hk[0] == key and hk[2] == 1:
            yield rel, hk[1][0]


def usage(dirfd: int, key: str) -> dict[str, Any]:
    """Which versions of ``key`` the files below ``dirfd`` (a backing directory) name in
    their headers: ``{"versions": {version: files}, "other_keys": {name: files},
    "unreadable": files, "files": total, "examples": {version: first path}}``.  Headers
    are parsed, not authenticated (that needs the key): a forged header can only make
    a file count under a version it does not really use, which a rekey then finds.
    A v2 file counts under every version from its oldest to its write version (its
    blocks may use any of them; docs/file-format.md, "Version 2")."""
    versions: dict[int, int] = {}
    examples: dict[int, str] = {}
    others: dict[str, int] = {}
    unreadable = files = 0
    for parts, _size in walk(dirfd):
        files += 1
        rel = "/".join(parts)
        hk = _header_key(dirfd, rel)
        if hk is None:
            unreadable += 1
            continue
        name, used, _nlink = hk
        if name != key:
            others[name] = others.get(name, 0) + 1
            continue
        for version in used:
            versions[version] = versions.get(version, 0) + 1
            examples.setdefault(version, rel)
    return {"key": key, "files": files, "versions": dict(sorted(versions.items())),
            "other_keys": dict(sorted(others.items())), "unreadable": unreadable,
            "examples": dict(sorted(examples.items()))}
