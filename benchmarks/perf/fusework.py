"""Work per operation on the FUSE data path, counted rather than timed.

A guard point (``python -m takakrypt.guard --allow-all``, the tree under test on
PYTHONPATH) over a fresh backing directory; a fixed tree made here from a seed (tar
entries, sizes and contents are the same on every machine); these phases:

    untar      tar -xf of the tree, then sync
    lsR_cold   ls -lR on a fresh mount of the same backing store (kernel caches empty)
    lsR_warm   ls -lR again
    rmrf       rm -rf of the tree
    pgbench    PG_TRANSACTIONS pgbench transactions (TPC-B like), one client, fixed
               seed, PostgreSQL 15 with its data directory on a fresh guard point
               (scale 1, set up and checkpointed before counting; entries and
               attributes cached for the whole phase: PG_METADATA_CACHE)

For each phase: the FUSE requests the kernel sent to this mount (tracepoint
``fuse:fuse_request_send`` in a tracefs instance of our own, filtered on this mount's
connection, so other mounts and other tracers are not counted), per tree entry (per
transaction for pgbench); and the engine's system calls (``strace -f`` on the serving
process: every thread but the Python main loop's) per request.  Needs root,
/dev/fuse, tracefs with the fuse events, strace; pgbench also PostgreSQL 15.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
PHASES = ("untar", "lsR_cold", "lsR_warm", "rmrf")
PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
PG_TRANSACTIONS = 300
PG_METADATA_CACHE = 3600  # seconds: no entry or attribute expires during the pgbench phase
# background work that follows the clock, not the transactions, turned off or pushed
# past the run: autovacuum, the background writer, timed checkpoints, the WAL writer
PG_OPTIONS = ("-c listen_addresses= -c shared_buffers=64MB -c autovacuum=off "
              "-c bgwriter_lru_maxpages=0 -c checkpoint_timeout=1h -c max_wal_size=1GB "
              "-c wal_writer_delay=10s -c wal_writer_flush_after=0")

# 12 directories of 24 files (sizes cycling over edge cases of the 4 KiB block and a
# few larger files), one symlink and one empty subdirectory per directory
SIZES = (0, 1, 100, 4095, 4096, 4097, 12000, 65536, 70000, 1000, 2048, 200000)


class FuseWorkError(Exception):
    """The FUSE counts cannot be taken on this machine (message says why)."""


def make_tree(path: Path) -> int:
    """Write the fixed tree as a tar at ``path``; return its number of entries."""
    rnd = random.Random(17)
    entries = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", link: str = "") -> None:
            nonlocal entries
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.uid, ti.gid = kind, 1_700_000_000, 0, 0
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            ti.linkname, ti.size = link, len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)
            entries += 1
        add("tree", tarfile.DIRTYPE)
        for d in range(12):
            add(f"tree/d{d:02d}", tarfile.DIRTYPE)
            add(f"tree/d{d:02d}/empty", tarfile.DIRTYPE)
            for f in range(24):
                n = SIZES[(d + f) % len(SIZES)]
                add(f"tree/d{d:02d}/f{f:02d}.dat", tarfile.REGTYPE, rnd.randbytes(n))
            add(f"tree/d{d:02d}/link", tarfile.SYMTYPE, link="f00.dat")
    return entries


def check_machine() -> None:
    """Raise FuseWorkError unless every tool the counts need is here."""
    if os.geteuid() != 0:
        raise FuseWorkError("needs root (tracefs, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        raise FuseWorkError("no /dev/fuse")
    for tool in ("strace", "tar", "fusermount3"):
        if shutil.which(tool) is None:
            raise FuseWorkError(f"needs {tool}")
    if not (TRACEFS / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False,
                       capture_output=True)
    if not (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir():
        raise FuseWorkError("no fuse:fuse_request_send tracepoint in this kernel")


class Tracer:
    """fuse_request_send events of one connection, in a tracefs instance of our own."""

    def __init__(self) -> None:
        self.dir = TRACEFS / "instances" / f"takakrypt-perf-{os.getpid()}"
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text("16384")
        self.event = self.dir / "events" / "fuse" / "fuse_request_send"

    def start(self, connection: int) -> None:
        (self.event / "filter").write_text(f"connection == {connection}")
        (self.dir / "trace").write_text("")
        (self.event / "enable").write_text("1")

    def counts(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for m in re.finditer(r"\(FUSE_([A-Z_0-9]+)\)", (self.dir / "trace").read_text()):
            kinds[m.group(1)] = kinds.get(m.group(1), 0) + 1
        return kinds

    def stop(self) -> dict[str, int]:
        (self.event / "enable").write_text("0")
        lost = sum(int(m.group(1)) for m in re.finditer(
            r"^overrun: (\d+)", "".join(p.read_text() for p in
                                        (self.dir / "per_cpu").glob("cpu*/stats")), re.M))
        if lost:
            raise FuseWorkError(f"tracefs lost {lost} events")
        return self.counts()

    def close(self) -> None:
        try:
            (self.event / "enable").write_text("0")
        finally:
            self.dir.rmdir()


def _connection(mnt: Path) -> int:
    st = os.stat(mnt)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev)  # the kernel's dev_t


class Strace:
    """``strace -f`` attached to every thread of the engine; counts system calls by name.

    The process's main thread is left out: it runs the Python loop of
    ``python -m takakrypt.guard`` (signals, a mount check every 0.2 s), whose calls
    depend on how long a phase takes, not on the requests served."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.err = out.with_suffix(".err")
        with open(self.err, "wb") as e:
            self.proc = subprocess.Popen(["strace", "-f", "-p", str(pid), "-o", str(out)],
                                         stdout=subprocess.DEVNULL, stderr=e)
        for _ in range(2000):  # a wait for the attach, not a timed assertion
            if " attached" in self.err.read_text():  # "Process N attached with M threads"
                break
            time.sleep(0.01)
        else:
            self.proc.kill()
            raise FuseWorkError("strace did not attach to the engine's threads")

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        calls: dict[str, int] = {}
        call = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")
        with open(self.out, errors="replace") as f:
            for line in f:
                m = call.match(line)  # "<... x resumed>", "+++ exited", "--- SIG" do not match
                if m and int(m.group(1)) != self.pid:
                    calls[m.group(2)] = calls.get(m.group(2), 0) + 1
        return calls


class Guard:
    """A guard point served by ``python -m takakrypt.guard`` from ``src``."""

    def __init__(self, python: str, src: Path, back: Path, mnt: Path, key: Path,
                 log: Path, extra: tuple[str, ...] = ()) -> None:
        self.mnt = mnt
        env = dict(os.environ, PYTHONPATH=str(src))
        with open(log, "ab") as lf:
            self.proc = subprocess.Popen(
                [python, "-m", "takakrypt.guard", "--backing", str(back), "--mountpoint",
                 str(mnt), "--key-file", str(key), "--allow-all", "--threads", "4", *extra],
                env=env, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                start_new_session=True)
        for _ in range(3000):  # a wait for the mount (slow on a loaded machine)
            if os.path.ismount(mnt):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.close()
        raise FuseWorkError(f"guard point did not mount; log:\n{log.read_text()}")

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _phase(guard: Guard, tracer: Tracer, work: Path, name: str, argv: list[str],
           settle=None) -> dict[str, object]:
    st = Strace(guard.proc.pid, work / f"strace.{name}")
    try:
        tracer.start(_connection(guard.mnt))
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if name == "untar":
            os.sync()
        if settle is not None:
            settle()
        kinds = tracer.stop()
    finally:
        calls = st.stop()
    return {"requests": kinds, "syscalls": calls}


def _su_pg(cmd: str) -> None:
    subprocess.run(["su", "postgres", "-c", cmd], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def pg_available() -> bool:
    return (PGBIN / "initdb").exists() and shutil.which("pgbench") is not None and \
        subprocess.run(["id", "postgres"], capture_output=True).returncode == 0


def _backends(postmaster: int) -> bool:
    """Whether a client backend of our own server (a child of ``postmaster``) runs."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == postmaster and (p / "cmdline").read_bytes().startswith(
                    b"postgres: postgres postgres"):
                return True
        except (OSError, ValueError, IndexError):
            pass
    return False


def _backends_gone(tracer: Tracer, data: Path) -> None:
    """Wait until our server's client backend is gone and every file opened during the
    run is released: pgbench returns before its backend has exited, and the kernel sends
    the RELEASEs of an exiting process's files later, from a work queue (they belong to
    the run: the backend opened those files in it)."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    for _ in range(3000):  # a wait (30 s at most), not a timed assertion
        if not _backends(postmaster):
            break
        time.sleep(0.01)
    else:
        raise FuseWorkError("the pgbench backend did not exit")
    for _ in range(1000):  # a wait (10 s at most) for the deferred RELEASEs
        k = tracer.counts()
        if k.get("RELEASE", 0) >= k.get("OPEN", 0) + k.get("CREATE", 0):
            return
        time.sleep(0.01)


def _pgbench(guard: Guard, tracer: Tracer, work: Path) -> dict[str, object]:
    """Set PostgreSQL up on the guard point, count PG_TRANSACTIONS transactions."""
    mnt = guard.mnt
    data, sock = mnt / "pg", work / "pgsock"
    mnt.chmod(0o777)
    sock.mkdir()
    shutil.chown(sock, "postgres")
    work.chmod(0o755)
    try:
        _su_pg(f"{PGBIN}/initdb -N -D {data} -A trust")
        _su_pg(f"{PGBIN}/pg_ctl -D {data} -w -l {sock}/pg.log "
               f"-o '-k {sock} {PG_OPTIONS}' start")
        _su_pg(f"pgbench -h {sock} -i -q -s 1 postgres")
        _su_pg(f"psql -h {sock} -q -c checkpoint postgres")
        return _phase(guard, tracer, work, "pgbench", [
            "su", "postgres", "-c", f"pgbench -h {sock} -n -c 1 -t {PG_TRANSACTIONS} "
            f"--random-seed=17 postgres"], settle=lambda: _backends_gone(tracer, data))
    finally:
        subprocess.run(["su", "postgres", "-c", f"{PGBIN}/pg_ctl -D {data} -w -m fast stop"],
                       capture_output=True)


def collect(python: str, src: Path, *, keep: Path | None = None,
            pgbench: bool = True) -> dict[str, object]:
    """Run the phases once; return ``{"entries": N, "transactions": T, "phases": {phase:
    {"requests": {KIND: n}, "syscalls": {NAME: n}}}}``."""
    check_machine()
    work = Path(tempfile.mkdtemp(prefix="takakrypt-perf-fuse."))
    tracer = Tracer()
    guard: Guard | None = None
    try:
        tar = work / "tree.tar"
        entries = make_tree(tar)
        back, mnt, key = work / "back", work / "mnt", work / "key"
        back.mkdir()
        mnt.mkdir()
        key.write_bytes(bytes(range(32)))
        key.chmod(0o600)
        log = work / "guard.log"
        phases: dict[str, object] = {}
        guard = Guard(python, src, back, mnt, key, log)
        phases["untar"] = _phase(guard, tracer, work, "untar",
                                 ["tar", "-C", str(mnt), "-xf", str(tar)])
        guard.close()
        guard = Guard(python, src, back, mnt, key, log)  # cold kernel caches
        lsr = ["ls", "-lR", str(mnt)]
        phases["lsR_cold"] = _phase(guard, tracer, work, "lsR_cold", lsr)
        phases["lsR_warm"] = _phase(guard, tracer, work, "lsR_warm", lsr)
        phases["rmrf"] = _phase(guard, tracer, work, "rmrf", ["rm", "-rf", str(mnt / "tree")])
        guard.close()
        if pgbench:
            if not pg_available():
                raise FuseWorkError(f"pgbench phase: needs PostgreSQL 15 ({PGBIN}, pgbench, "
                                    "user postgres)")
            back2 = work / "back2"
            back2.mkdir()
            # entries and attributes kept for the whole run: with the default second,
            # how many expire (each a LOOKUP again) follows how long the 300
            # transactions take, i.e. the machine's load, not the code (+0.1 LOOKUP per
            # transaction seen on a busy machine, twice the tolerance)
            guard = Guard(python, src, back2, mnt, key, log,
                          extra=("--metadata-cache", str(PG_METADATA_CACHE)))
            phases["pgbench"] = _pgbench(guard, tracer, work)
        return {"entries": entries, "transactions": PG_TRANSACTIONS, "phases": phases}
    finally:
        if guard is not None:
            guard.close()
        tracer.close()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
