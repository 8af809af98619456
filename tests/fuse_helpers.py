"""Helpers for the guard point mount tests.

The guard point is served by a CHILD process (``python tests/fuse_helpers.py
SPEC.json``), never by the test process: clients of a mount must not run in the
process serving it.  ``guard_mount()`` starts it, waits until the mount is live, and
always unmounts in ``finally`` (SIGTERM to the server, then ``fusermount3 -u``, then
lazy ``-uz`` if the mount is still there).  ``sweep_stale_mounts()`` removes takakrypt
mounts left under the temp directory by an earlier crashed run.

Policy for the child: a list of rules ``{"uid": int|None, "actions": [..]|None,
"prefix": str|None, "exe": str|None, "effects": [...], "ttl": float}`` (``exe``: the
caller's /proc/PID/exe; ``effects`` may include the caching hint "any_path"); the
first match decides, no match denies.  Audit events are appended to ``audit.jsonl`` as JSON lines.
The server gives the data path the policy hints these rules prove (``rules_hints``, the
same reasoning as ``Engine.metadata_hints``) unless ``hints=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")
SRC = HERE.parent / "src"


def fuse_skip_reason() -> str | None:
    """Why mount tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 is not installed (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "guard point tests mount as root (the daemon runs as root)"
    try:
        import takakrypt._fuse  # noqa: F401
    except ImportError as e:
        return f"takakrypt._fuse is not built ({e})"
    return None


def _mounts_under(root: str) -> list[str]:
    sys.path.insert(0, str(SRC))
    from takakrypt.guard import fuse_mounts
    return fuse_mounts(root)


def unmount_path(path: str) -> None:
    for args in (["-u"], ["-uz"]):
        if path not in _mounts_under(path):
            return
        subprocess.run(["fusermount3", *args, path], capture_output=True)


def sweep_stale_mounts(root: str | None = None) -> list[str]:
    """Unmount takakrypt mounts left behind: below ``root`` (a test's own directory)
    every one; with no root, those below the temp directory whose server is gone (an
    earlier run that crashed) -- never a live mount of another test run on the host."""
    sys.path.insert(0, str(SRC))
    from takakrypt.guard import is_stale
    own = root is not None
    done = []
    for mp in _mounts_under(root or tempfile.gettempdir()):
        if own or is_stale(mp):
            unmount_path(mp)
            done.append(mp)
    return done


class Guard:
    """A running guard point served by a child process."""

    def __init__(self, mnt: Path, backing: Path, key: bytes, workdir: Path,
                 proc: subprocess.Popen[bytes], store: subprocess.Popen[bytes] | None = None
                 ) -> None:
        self.mnt, self.backing, self.key, self.workdir, self.proc = mnt, backing, key, workdir, proc
        self.store = store

    def audit_events(self) -> list[dict]:
        p = self.workdir / "audit.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def server_pid(self) -> int:
        """The process serving the mount now (a handover replaces it)."""
        p = self.workdir / "server.pid"
        return int(p.read_text()) if p.exists() else self.proc.pid

    def handover(self, timeout: float = 60.0) -> int:
        """Hand the mount to a successor server (SIGUSR2: the server quiesces, starts
        one with the fds and state, and exits once it serves).  Returns the new pid;
        raises if the old server is still serving at the end."""
        old = self.server_pid()
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a wait, not a timed assertion
            new = self.server_pid()
            if new != old and not _alive(old):
                return new
            time.sleep(0.01)
        raise RuntimeError(f"handover did not complete: "
                           f"{(self.workdir / 'stderr').read_text(errors='replace')}")

    def kill_and_resume(self, timeout: float = 120.0) -> int:
        """SIGKILL the server (a watchdog's restart) and start a successor with the fds
        the server left in the "file descriptor store" and no state: it takes the
        connection over from the state kept in them.  The store is a keeper process
        (as systemd is): it kills and starts, never the test process, whose open files
        on the mount would each need the server at a fork (FLUSH).  Returns the pid."""
        assert self.store is not None
        self.store.stdin.write(b"kill-resume\n")
        self.store.stdin.flush()
        ready, _, _ = select.select([self.store.stdout], [], [], timeout)
        line = self.store.stdout.readline() if ready else b""
        if not line.startswith(b"ok "):
            raise RuntimeError(f"successor failed: {line!r} "
                               f"{(self.workdir / 'stderr').read_text(errors='replace')}")
        return int(line.split()[1])

    def stats(self) -> dict:
        """Ask the server for its counters (SIGUSR1 -> stats.json)."""
        p = self.workdir / "stats.json"
        p.unlink(missing_ok=True)
        os.kill(self.server_pid(), signal.SIGUSR1)
        for _ in range(3000):  # a wait (up to 30 s on a loaded machine), not a timed assertion
            if p.exists() and p.stat().st_size:
                try:
                    return json.loads(p.read_text())
                except json.JSONDecodeError:
                    pass
            time.sleep(0.01)
        pid = self.server_pid()
        raise RuntimeError(f"guard server {pid} ({'alive' if _alive(pid) else 'gone'}) did "
                           f"not write its stats: "
                           f"{(self.workdir / 'stderr').read_text(errors='replace')[-4000:]}")

    def keys(self):
        """Key lookup for takakrypt.cryptofile.TakaFile.open."""
        return lambda name, version: bytearray(self.key)


def _keeper(workdir: str) -> int:
    """The test's "file descriptor store" (``python fuse_helpers.py --keeper WORKDIR``):
    keeps the newest fds a server sent to WORKDIR/fdstore.sock (as systemd keeps
    FDSTORE=1 fds) and, on "kill-resume" from stdin, SIGKILLs the server and starts a
    successor with them.  Started before the test opens any file on the mount."""
    import socket
    wd = Path(workdir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(wd / "fdstore.sock"))
    fds: list[int] = []
    sys.stdout.write("keeper\n")
    sys.stdout.flush()
    while True:
        r, _, _ = select.select([sock, sys.stdin], [], [])
        if sock in r:
            _, new, _, _ = socket.recv_fds(sock, 16, 16)
            for fd in fds:
                os.close(fd)
            fds = new
            continue
        cmd = sys.stdin.readline().strip()
        if not cmd:
            return 0
        old = int((wd / "server.pid").read_text())
        os.kill(old, signal.SIGKILL)
        while _alive(old):
            time.sleep(0.005)
        sf = wd / "empty.state"
        sf.write_bytes(b"")
        env = dict(os.environ, PYTHONPATH=str(SRC), TK_TEST_RESUME_FDS=",".join(map(str, fds)),
                   TK_TEST_RESUME_STATE=str(sf))
        proc = subprocess.Popen([sys.executable, __file__, str(wd / "spec.json")], pass_fds=fds,
                                stdout=subprocess.PIPE, stderr=open(wd / "stderr", "ab"), env=env)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        sys.stdout.write(f"ok {proc.pid}\n" if line.startswith(b"ready") else f"err {line!r}\n")
        sys.stdout.flush()


@contextlib.contextmanager
def guard_mount(tmp: Path, *, rules: list[dict] | None = None, in_place: bool = False,
                path: Path | None = None, key: bytes | None = None, threads: int = 4,
                key_name: str = "guard", metadata_cache: float | None = None,
                policy_yaml: str | None = None, io_uring: bool | None = None, hints: bool = True,
                read_helpers: bool = True, keeper: bool = False):
    """Mount a guard point served by a child process; yields a :class:`Guard`.

    ``io_uring=None``: FUSE over io_uring unless TAKAKRYPT_TEST_IO_URING=0 (ci/asan.sh
    runs the data-path suite once more on the classic channel that way).  ``keeper``:
    the server leaves its persist_fds() with a keeper process (systemd's fd store for
    the test: :meth:`Guard.kill_and_resume`); its connection then outlives a killed
    server, so tests of dead connections leave it off."""
    if io_uring is None:
        io_uring = os.environ.get("TAKAKRYPT_TEST_IO_URING", "1") != "0"
    tmp = Path(tmp)
    workdir = Path(tempfile.mkdtemp(prefix="guard-", dir=tmp))
    if in_place:
        mnt = backing = Path(path or tmp / "data")
    else:
        backing = Path(path or tmp / "backing")
        mnt = tmp / "mnt"
        mnt.mkdir(exist_ok=True)
    backing.mkdir(exist_ok=True)
    key = key if key is not None else os.urandom(32)
    spec = {
        "mountpoint": str(mnt), "backing": None if in_place else str(backing),
        "key": key.hex(), "key_name": key_name, "threads": threads,
        "rules": rules if rules is not None else [{"effects": ["permit", "apply_key"]}],
        "audit_log": str(workdir / "audit.jsonl"), "stats_file": str(workdir / "stats.json"),
        "metadata_cache": metadata_cache, "policy_yaml": policy_yaml, "io_uring": io_uring,
        "hints": hints, "read_helpers": read_helpers,
    }
    store = None
    if keeper:
        store = subprocess.Popen([sys.executable, str(HERE / "fuse_helpers.py"), "--keeper",
                                  str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=str(SRC)))
        store.stdout.readline()  # bound
        spec["fdstore"] = str(workdir / "fdstore.sock")
    (workdir / "spec.json").write_text(json.dumps(spec))
    try:
        with serve_child(HERE / "fuse_helpers.py", workdir, mnt) as proc:
            yield Guard(mnt, backing, key, workdir, proc, store)
    finally:
        if store is not None:
            store.kill()
            store.wait()


@contextlib.contextmanager
def serve_child(script: Path, workdir: Path, mnt: Path):
    """Run ``script workdir/spec.json`` as the guard server; wait for its "ready" line;
    always stop it, unmount, and fail if its log holds a sanitizer report."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, str(script), str(workdir / "spec.json")],
                            stdout=subprocess.PIPE, stderr=open(workdir / "stderr", "wb"),
                            env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"guard server {script.name} failed to mount: {line!r} "
                               f"{(workdir / 'stderr').read_text()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pidf = workdir / "server.pid"  # a successor after a handover (not our child)
        succ = int(pidf.read_text()) if pidf.exists() else proc.pid
        if succ != proc.pid and _alive(succ):
            os.kill(succ, signal.SIGTERM)
            for _ in range(3000):
                if not _alive(succ):
                    break
                time.sleep(0.01)
            else:
                os.kill(succ, signal.SIGKILL)
        unmount_path(str(mnt))
        log = (workdir / "stderr").read_text(errors="replace")
        if any(m in log for m in SANITIZER_MARKS):  # ci/asan.sh: the server is sanitized too
            raise AssertionError(f"sanitizer report from the guard server:\n{log}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def raw_mount(path: Path) -> int:
    """Mount a ``fuse.takakrypt`` file system at ``path`` on a /dev/fuse descriptor that
    nobody reads (every request, INIT included, waits in the kernel): a connection that
    does not answer.  Returns the descriptor; closing its last copy ends the connection
    (then unmount it, e.g. ``guard.cleanup_stale``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"takakrypt:raw", str(path).encode(), b"fuse.takakrypt", 0, opts) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e), str(path))
    return fd


# ---------------------------------------------------------------------------------------
# clients as another user


def run_as(uid: int, gid: int, fn, *args):
    """Run ``fn(*args)`` in a forked child with the given uid/gid (no supplementary
    groups); return its result or re-raise its exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - shipped to the parent
            out = (False, e)
        try:
            data = pickle.dumps(out)
        except Exception as e:  # noqa: BLE001
            data = pickle.dumps((False, RuntimeError(repr(e))))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, val = pickle.loads(data)
    if not ok:
        raise val
    return val


def errno_of(fn, *args) -> int:
    """0 if fn(*args) succeeds, else the OSError's errno."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


# ---------------------------------------------------------------------------------------
# the server (child process)


def rules_hints(rules: list[dict]) -> tuple[bool, bool, bool]:
    """(plain_only, getattr_all, process_free) for a list of test rules, like
    Engine.metadata_hints and Engine.process_free (only ``exe`` looks at the process)."""
    view_actions = {"read", "write", "append", "truncate", "create", "getattr"}
    plain_only = all("apply_key" in r["effects"] for r in rules if "permit" in r["effects"]
                     and (r.get("actions") is None or view_actions & set(r["actions"])))
    getattr_all = False
    for r in rules:
        if r.get("actions") is not None and "getattr" not in r["actions"]:
            continue
        if "permit" not in r["effects"] or "audit" in r["effects"]:
            break
        if all(r.get(k) is None for k in ("uid", "prefix", "exe")):
            getattr_all = True
            break
    return plain_only, plain_only and getattr_all, all(r.get("exe") is None for r in rules)


def _serve(spec_path: str) -> int:
    sys.path.insert(0, str(SRC))
    resume = None
    if os.environ.get("TK_TEST_RESUME_FDS"):
        resume = ([int(x) for x in os.environ.pop("TK_TEST_RESUME_FDS").split(",")],
                  Path(os.environ.pop("TK_TEST_RESUME_STATE")).read_bytes())
    from takakrypt.guard import GuardPoint, effects_mask
    from takakrypt.sigflags import SignalFlags

    spec = json.loads(Path(spec_path).read_text())
    key = bytes.fromhex(spec["key"])
    rules = spec["rules"]
    lock = threading.Lock()
    audit_log = open(spec["audit_log"], "a", buffering=1)

    def decide(uid, gid, pid, path, action):
        for i, r in enumerate(rules):
            if r.get("uid") is not None and r["uid"] != uid:
                continue
            if r.get("actions") is not None and action not in r["actions"]:
                continue
            if r.get("prefix") is not None and not path.startswith(r["prefix"]):
                continue
            if r.get("exe") is not None:
                try:
                    if os.readlink(f"/proc/{pid}/exe") != r["exe"]:
                        continue
                except OSError:
                    continue
            return effects_mask(r["effects"]), i, 0, r.get("ttl", 60.0)
        return effects_mask(["deny"]), -1, 0, 60.0

    hints = rules_hints(rules)
    if spec.get("policy_yaml"):  # the real engine (policy "p") instead of the rules
        from takakrypt import config as tkconfig
        from takakrypt.guard import policy_decider
        from takakrypt.policy import Engine
        engine = Engine(tkconfig.loads(spec["policy_yaml"]))
        decide = policy_decider(engine, "p")
        hints = (*engine.metadata_hints("p"), engine.process_free("p"))

    def audit(kind, uid, gid, pid, path, action, effects, detail):
        with lock:
            audit_log.write(json.dumps({"kind": kind, "uid": uid, "gid": gid, "pid": pid,
                                        "path": path, "action": action, "effects": effects,
                                        "detail": detail}) + "\n")

    gp = GuardPoint(spec["mountpoint"], backing=spec["backing"], key_name=spec["key_name"],
                    get_key=lambda name, version: key, decide=decide, audit=audit,
                    threads=spec["threads"], io_uring=spec.get("io_uring", True),
                    read_helpers=spec.get("read_helpers", True),
                    debug=os.environ.get("TK_TEST_FUSE_DEBUG") == "1",
                    **({} if spec.get("metadata_cache") is None
                       else {"metadata_cache": spec["metadata_cache"]}))
    sigs = SignalFlags(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    if spec.get("hints", True):
        gp.set_policy_hints(*hints)
    workdir = Path(spec_path).parent
    if resume is not None:  # a successor: (fds, state) from the predecessor
        gp.resume(*resume)
        for fd in resume[0]:
            os.close(fd)
    else:
        gp.mount()
    if spec.get("fdstore"):  # like sd_notify FDSTORE=1: kept by the test process
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(spec["fdstore"])
        socket.send_fds(s, [b"fds"], gp.persist_fds())
        s.close()
    tmpf = workdir / "server.pid.tmp"
    tmpf.write_text(str(os.getpid()))
    os.rename(tmpf, workdir / "server.pid")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    handed = False
    try:
        while not sigs.seen(signal.SIGTERM, signal.SIGINT):
            sigs.sleep()
            if sigs.take(signal.SIGUSR1):
                tmpf = Path(spec["stats_file"] + ".tmp")
                tmpf.write_text(json.dumps(gp.stats()))
                os.rename(tmpf, spec["stats_file"])
            if sigs.take(signal.SIGUSR2):
                handed = _hand_over(gp, spec_path)
                if handed:
                    return 0
    finally:
        if not handed:
            gp.unmount()
    return 0


def _hand_over(gp, spec_path: str) -> bool:
    """Start a successor with this guard point's fds and state; True once it serves
    (we let go), False if it failed (we serve again)."""
    fds, state = gp.handover_begin()
    workdir = Path(spec_path).parent
    sf = workdir / f"handover-{os.getpid()}.state"
    sf.write_bytes(state)
    r, w = os.pipe()
    env = dict(os.environ, TK_TEST_RESUME_FDS=",".join(map(str, fds)),
               TK_TEST_RESUME_STATE=str(sf))
    succ = subprocess.Popen([sys.executable, __file__, spec_path], pass_fds=fds, stdout=w,
                            stderr=open(workdir / "stderr", "ab"), env=env)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    line = os.read(r, 64) if ready else b""
    os.close(r)
    if not line.startswith(b"ready"):
        gp.handover_abort()
        if succ.poll() is None:
            succ.kill()
        succ.wait()
        print(f"handover failed: successor said {line!r}", file=sys.stderr, flush=True)
        return False
    gp.handover_done()
    return True


if __name__ == "__main__":
    sys.exit(_keeper(sys.argv[2]) if sys.argv[1] == "--keeper" else _serve(sys.argv[1]))
