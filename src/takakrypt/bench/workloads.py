"""The workloads, in groups that share state: a group runs its workloads in order on
one target (write the file, then read it; untar the tree, list it, remove it) and
returns one figure per workload.

Every program a workload runs on a target is listed by :meth:`Group.programs`: the
realistic policy permits exactly those (by path and SHA-256), so a workload that
needed anything else would fail under it rather than measure a policy that does not
hold.  Set-up that is not measured (directories, ownership) is done in the target's
backing directory, never through the guard point.
"""

from __future__ import annotations

import glob
import io
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .targets import Target

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}


class WorkloadFailed(Exception):
    """A workload program failed (its message names the command and its stderr)."""


@dataclass(frozen=True)
class Sizes:
    seq_mib: int = 1024          # sequential file
    files: int = 20000           # entries of the untar tree
    fio_mib: int = 256           # fio file per job
    fio_seconds: int = 10
    pg_scale: int = 20
    pg_seconds: int = 20
    pg_clients: int = 4

    @classmethod
    def quick(cls) -> Sizes:
        return cls(seq_mib=64, files=1000, fio_mib=32, fio_seconds=1, pg_scale=1,
                   pg_seconds=2)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    higher_is_better: bool


@dataclass
class Context:
    sizes: Sizes
    private: Path                 # private temp directory: tar, logs, sockets
    directory: Path = Path("/")   # the user's directory (the work directory's parent)
    cold: bool = True             # drop the page cache before cold reads
    current: subprocess.Popen[Any] | None = field(default=None, repr=False)

    def run(self, cmd: list[str], *, what: str, user: str | None = None,
            session: bool = False, timeout: float | None = None) -> str:
        """Run one program; its stdout; WorkloadFailed on a non-zero exit."""
        kw: dict[str, Any] = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd="/")
        env = dict(ENV, HOME=pwd.getpwnam(user).pw_dir if user else "/root")
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               env=env, start_new_session=session, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise WorkloadFailed(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            raise WorkloadFailed(f"{what}: {os.path.basename(cmd[0])} exited with "
                                 f"{r.returncode}: {err[-1] if err else 'no message'}")
        return r.stdout

    def timed(self, cmd: list[str], *, what: str, sync: bool = False) -> float:
        t0 = time.perf_counter()
        self.run(cmd, what=what)
        if sync:
            os.sync()
        return time.perf_counter() - t0

    def drop_caches(self) -> None:
        """Cold reads: write back, then drop the page cache (all of the machine's)."""
        os.sync()
        if not self.cold:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        except OSError:
            self.cold = False  # reported in the settings: the reads were warm


def _which(name: str) -> str | None:
    p = shutil.which(name, path=ENV["PATH"])
    return os.path.realpath(p) if p else None


class Group:
    name = ""
    workloads: tuple[Workload, ...] = ()

    def unavailable(self, ctx: Context) -> str | None:
        """Why this group cannot run here (its rows say skipped), or None."""
        return None

    def programs(self) -> dict[str, str]:
        return {}

    def prepare(self, ctx: Context) -> None:
        """Once, before the first round."""

    def setup(self, ctx: Context, t: Target) -> None:
        """Once per target, before its first run (not measured)."""

    def run(self, ctx: Context, t: Target) -> dict[str, float]:
        raise NotImplementedError

    def teardown(self, ctx: Context, t: Target) -> None:
        """After the last run on a target (not measured)."""

    def abort(self, ctx: Context) -> None:
        """Stop anything still running (interrupt or failure); must not raise."""


def rotated(targets: list[Target], r: int) -> list[Target]:
    """Round r's order: the targets rotated by r (slow drifts of a shared machine fall
    on every target alike)."""
    return targets[r % len(targets):] + targets[:r % len(targets)]


class Rounds:
    """Runs groups on targets in rounds: a group is set up on a target before its first
    run and torn down after the last; a group that failed on a target is not run there
    again (``failed``: target -> group -> error)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.ready: set[tuple[str, str]] = set()
        self.failed: dict[str, dict[str, str]] = {}

    def run(self, g: Group, t: Target) -> dict[str, float] | None:
        """The group's figures on t, or None (failed now or before: see ``failed``)."""
        if g.name in self.failed.get(t.name, {}):
            return None
        try:
            if (g.name, t.name) not in self.ready:
                g.setup(self.ctx, t)
                self.ready.add((g.name, t.name))
            return g.run(self.ctx, t)
        except (WorkloadFailed, OSError) as e:
            self.failed.setdefault(t.name, {})[g.name] = str(e)
            return None

    def teardown(self, groups: list[Group], targets: list[Target]) -> dict[str, dict[str, str]]:
        """Tear down what was set up; returns the clean-up errors (target -> group)."""
        errors: dict[str, dict[str, str]] = {}
        for g in groups:
            for t in targets:
                if (g.name, t.name) in self.ready:
                    try:
                        g.teardown(self.ctx, t)
                    except (WorkloadFailed, OSError) as e:
                        errors.setdefault(t.name, {})[g.name] = f"clean-up: {e}"
        return errors


class Sequential(Group):
    name = "seq"

    def __init__(self, sizes: Sizes) -> None:
        mib = sizes.seq_mib
        self.workloads = (
            Workload("seq-write", f"sequential write {mib} MiB (dd bs=1M, fsync)", "MiB/s", True),
            Workload("seq-read", f"sequential read {mib} MiB, cold cache (dd bs=1M)",
                     "MiB/s", True))

    def programs(self) -> dict[str, str]:
        return {"dd": _which("dd") or "/usr/bin/dd", "rm": _which("rm") or "/usr/bin/rm"}

    def run(self, ctx: Context, t: Target) -> dict[str, float]:
        f, mib = t.path / "seq.bin", ctx.sizes.seq_mib
        w = ctx.timed(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib}",
                       "conv=fsync", "status=none"], what="seq-write")
        ctx.drop_caches()
        r = ctx.timed(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"],
                      what="seq-read")
        ctx.run(["rm", "-f", str(f)], what="seq clean-up")
        return {"seq-write": mib / w, "seq-read": mib / r}

    def teardown(self, ctx: Context, t: Target) -> None:
        ctx.run(["rm", "-f", str(t.path / "seq.bin")], what="seq clean-up")


def make_tree_tar(path: Path, files: int, seed: int = 17) -> int:
    """A tar of a source-like tree (``tree/``): ``files`` regular files, 40 to a
    directory, two levels deep, sizes mostly small (median ~2 KiB, up to 64 KiB), random
    content.  Deterministic for a given ``files``.  Returns the number of entries."""
    rnd = random.Random(seed)
    entries = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add_dir(name: str) -> None:
            nonlocal entries
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(ti)
            entries += 1
        add_dir("tree")
        for i in range(files):
            d1, d2 = divmod(i // 40, 25)
            if i % 40 == 0:
                if d2 == 0:
                    add_dir(f"tree/d{d1:03d}")
                add_dir(f"tree/d{d1:03d}/s{d2:02d}")
            size = min(int(rnd.lognormvariate(7.6, 1.2)), 65536)
            ti = tarfile.TarInfo(f"tree/d{d1:03d}/s{d2:02d}/f{i:06d}.txt")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
            tar.addfile(ti, io.BytesIO(rnd.randbytes(size)))
            entries += 1
    return entries


class Tree(Group):
    name = "tree"

    def __init__(self, sizes: Sizes) -> None:
        n = sizes.files
        self.workloads = (
            Workload("untar", f"small-file create: untar {n} files (tar -x, sync)", "s", False),
            Workload("ls-lR", "ls -lR of the tree, cold cache", "s", False),
            Workload("rm-rf", "rm -rf of the tree", "s", False))
        self.tar: Path | None = None
        self.entries = 0

    def programs(self) -> dict[str, str]:
        return {"tar": _which("tar") or "/usr/bin/tar", "ls": _which("ls") or "/usr/bin/ls",
                "rm": _which("rm") or "/usr/bin/rm"}

    def prepare(self, ctx: Context) -> None:
        self.tar = ctx.private / "tree.tar"
        self.entries = make_tree_tar(self.tar, ctx.sizes.files)

    def run(self, ctx: Context, t: Target) -> dict[str, float]:
        assert self.tar is not None
        u = ctx.timed(["tar", "-C", str(t.path), "-xf", str(self.tar)], what="untar",
                      sync=True)
        ctx.drop_caches()
        t0 = time.perf_counter()
        out = ctx.run(["ls", "-lR", str(t.path / "tree")], what="ls-lR")
        ls = time.perf_counter() - t0
        if out.count("\n") < ctx.sizes.files:
            raise WorkloadFailed(f"ls-lR: listed {out.count(chr(10))} lines, expected at "
                                 f"least {ctx.sizes.files}")
        rm = ctx.timed(["rm", "-rf", str(t.path / "tree")], what="rm-rf")
        return {"untar": u, "ls-lR": ls, "rm-rf": rm}

    def teardown(self, ctx: Context, t: Target) -> None:
        ctx.run(["rm", "-rf", str(t.path / "tree")], what="tree clean-up")


class Fio(Group):
    name = "fio"

    def __init__(self, sizes: Sizes) -> None:
        s = f"{sizes.fio_mib} MiB x 2 jobs, psync, {sizes.fio_seconds} s"
        self.workloads = (Workload("fio-randread", f"fio 4 KiB random read ({s})", "IOPS", True),
                          Workload("fio-randwrite", f"fio 4 KiB random write ({s})", "IOPS",
                                   True))

    def unavailable(self, ctx: Context) -> str | None:
        return None if _which("fio") else "fio is not installed (apt-get install fio)"

    def programs(self) -> dict[str, str]:
        return {"fio": _which("fio") or "/usr/bin/fio", "rm": _which("rm") or "/usr/bin/rm"}

    def _fio(self, ctx: Context, t: Target, rw: str, *extra: str) -> list[str]:
        return ["fio", "--name=tkbench", f"--directory={t.path / 'fio'}", f"--rw={rw}",
                "--bs=4k", f"--size={ctx.sizes.fio_mib}m", "--ioengine=psync",
                "--numjobs=2", "--group_reporting", "--output-format=json",
                f"--output={ctx.private / 'fio.json'}", *extra]

    def setup(self, ctx: Context, t: Target) -> None:
        (t.backing / "fio").mkdir()
        ctx.run(self._fio(ctx, t, "randread", "--create_only=1"), what="fio layout")

    def run(self, ctx: Context, t: Target) -> dict[str, float]:
        import json

        out = {}
        for rw in ("randread", "randwrite"):
            # every target starts cold: fio's own invalidation (posix_fadvise) drops a
            # guard point's plaintext pages but not its backing file's, which made the
            # guard point read from memory while native read from the disk
            ctx.drop_caches()
            ctx.run(self._fio(ctx, t, rw, "--time_based", f"--runtime={ctx.sizes.fio_seconds}"),
                    what=f"fio-{rw}")
            job = json.loads((ctx.private / "fio.json").read_text())["jobs"][0]
            iops = job["read"]["iops"] + job["write"]["iops"]
            if iops <= 0:
                raise WorkloadFailed(f"fio-{rw}: no I/O completed")
            out[f"fio-{rw}"] = iops
        return out

    def teardown(self, ctx: Context, t: Target) -> None:
        ctx.run(["rm", "-rf", str(t.path / "fio")], what="fio clean-up")


def _not_searchable(directory: Path, pw: pwd.struct_passwd) -> str | None:
    """The first directory from / down to ``directory`` that user ``pw`` may not search."""
    import grp
    import stat

    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    p = Path("/")
    for part in (directory.parts[1:] if directory.is_absolute() else directory.parts):
        p = p / part
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return str(p)
    return None


def postgres_bin() -> str | None:
    """The newest /usr/lib/postgresql/N/bin holding postgres, initdb, pg_ctl, pgbench."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(d, p), os.X_OK)
               for p in ("postgres", "initdb", "pg_ctl", "pgbench")):
            try:
                found.append((int(Path(d).parent.name), d))
            except ValueError:
                continue
    return max(found)[1] if found else None


class Pgbench(Group):
    name = "pgbench"

    def __init__(self, sizes: Sizes) -> None:
        self.workloads = (Workload(
            "pgbench", f"pgbench TPC-B, scale {sizes.pg_scale}, {sizes.pg_clients} clients, "
            f"{sizes.pg_seconds} s", "TPS", True),)
        self.bin = postgres_bin()
        self.running: dict[str, tuple[Path, int | None]] = {}  # target -> (data dir, pid)

    def unavailable(self, ctx: Context) -> str | None:
        if self.bin is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            return "there is no postgres user"
        blocked = _not_searchable(ctx.directory, pw)
        if blocked:
            return (f"the postgres user cannot reach {ctx.directory}: {blocked} is not "
                    f"searchable by it (chmod o+x {blocked})")
        return None

    def programs(self) -> dict[str, str]:
        if self.bin is None:
            return {}
        return {f"pg_{p}": os.path.realpath(os.path.join(self.bin, p))
                for p in ("postgres", "initdb", "pg_ctl")}

    def _sock(self, ctx: Context, t: Target) -> Path:
        return ctx.private / "pg" / t.name

    def setup(self, ctx: Context, t: Target) -> None:
        assert self.bin is not None
        pw = pwd.getpwnam("postgres")
        sock = self._sock(ctx, t)
        sock.mkdir(parents=True)
        os.chmod(ctx.private / "pg", 0o755)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
        (t.backing / "pg").mkdir(mode=0o700)
        os.chown(t.backing / "pg", pw.pw_uid, pw.pw_gid)
        data = t.path / "pg"
        b = self.bin
        ctx.run([f"{b}/initdb", "-D", str(data), "-A", "trust", "-N", "-E", "UTF8",
                 "--locale=C"], what="initdb", user="postgres")
        self.running[t.name] = (data, None)
        ctx.run([f"{b}/pg_ctl", "-D", str(data), "-w", "-t", "120", "-l", str(sock / "log"),
                 "-o", f"-k {sock} -c listen_addresses= -c shared_buffers=128MB", "start"],
                what="pg_ctl start", user="postgres", session=True)
        st = ctx.run([f"{b}/pg_ctl", "-D", str(data), "status"], what="pg_ctl status",
                     user="postgres")
        m = re.search(r"PID: (\d+)", st)
        self.running[t.name] = (data, int(m.group(1)) if m else None)
        ctx.run([f"{b}/pgbench", "-h", str(sock), "-i", "-q", "-s", str(ctx.sizes.pg_scale),
                 "postgres"], what="pgbench -i", user="postgres")

    def run(self, ctx: Context, t: Target) -> dict[str, float]:
        s = ctx.sizes
        out = ctx.run([f"{self.bin}/pgbench", "-h", str(self._sock(ctx, t)), "-c",
                       str(s.pg_clients), "-j", "2", "-T", str(s.pg_seconds), "postgres"],
                      what="pgbench", user="postgres")
        m = re.search(r"^tps = ([0-9.]+)", out, re.M)
        if not m:
            raise WorkloadFailed("pgbench: no tps line in its output")
        return {"pgbench": float(m.group(1))}

    def _stop(self, ctx: Context, name: str, mode: str) -> None:
        data, pid = self.running.pop(name)
        try:
            ctx.run([f"{self.bin}/pg_ctl", "-D", str(data), "-m", mode, "-w", "stop"],
                    what="pg_ctl stop", user="postgres", timeout=60)
        except WorkloadFailed:
            pass
        if pid is not None:
            _kill_wait(pid)

    def teardown(self, ctx: Context, t: Target) -> None:
        if t.name in self.running:
            self._stop(ctx, t.name, "fast")

    def abort(self, ctx: Context) -> None:
        for name in list(self.running):
            self._stop(ctx, name, "immediate")


def _kill_wait(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a postmaster left behind and wait until it is gone."""
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if stat.rsplit(")", 1)[1].split()[0] == "Z" or "(postgres)" not in stat:
                return  # gone, or the pid is someone else's by now
        except (OSError, IndexError):
            return
        if not sent:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            sent = True
        time.sleep(0.05)


def all_groups(sizes: Sizes) -> list[Group]:
    return [Sequential(sizes), Tree(sizes), Fio(sizes), Pgbench(sizes)]


WORKLOAD_NAMES = ("seq-write", "seq-read", "untar", "ls-lR", "rm-rf", "fio-randread",
                  "fio-randwrite", "pgbench")
GROUP_OF = {"seq-write": "seq", "seq-read": "seq", "untar": "tree", "ls-lR": "tree",
            "rm-rf": "tree", "fio-randread": "fio", "fio-randwrite": "fio",
            "pgbench": "pgbench"}
