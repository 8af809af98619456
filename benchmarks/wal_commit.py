#!/usr/bin/env python3
"""What one database commit costs on native ext4 and on a takakrypt guard point.

PostgreSQL's commit path is a chain no parallelism hides: write the WAL page
(8 KiB, pwrite), then fdatasync the WAL file, and only then may the next commit's
flush begin (pgbench's TPS follows it).  This times that chain in one process, on a
plain directory and on a guard point (--allow-all) over the same file system, in the
same run, and prints the mean latency of each step and the ratio of the totals.

  usage: benchmarks/wal_commit.py [--commits N] [--cpus LIST] [--user NAME] [--json]
                                                                         (run as root)
  BENCH_ROOT   where to work (default /var/tmp/tkbench)

--user NAME commits as that user, as a database server does (PostgreSQL runs as
postgres): a write by a caller without CAP_FSETID is one the kernel asks the server to
clear set-id bits for, so this is the path pgbench's writes take.

--cpus 0,1 repeats both targets with the committing process pinned to each CPU in turn
(as well as unpinned): on a VM whose disk interrupts all land on one CPU, an fdatasync
waited for on another CPU pays the wake-up of that halted vCPU, and a guard point's
worker always waits on the caller's CPU (FUSE over io_uring), where a native process is
free to be woken on the interrupt's CPU.

The difference per step is what a FUSE round trip adds on this machine (the WAL
segment is preallocated, as PostgreSQL does, so no step changes the file size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEGMENT = 16 << 20
PAGE = 8192


def commits(d: Path, n: int) -> dict[str, float]:
    p = d / "wal"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        zero = bytes(1 << 20)
        for _ in range(SEGMENT // len(zero)):
            os.write(fd, zero)
        os.fsync(fd)
        page = os.urandom(PAGE)
        w = s = 0.0
        for i in range(n):
            off = (i * PAGE) % SEGMENT
            a = time.perf_counter()
            os.pwrite(fd, page, off)
            b = time.perf_counter()
            os.fdatasync(fd)
            c = time.perf_counter()
            w += b - a
            s += c - b
        return {"write_us": w / n * 1e6, "fdatasync_us": s / n * 1e6,
                "commit_us": (w + s) / n * 1e6}
    finally:
        os.close(fd)
        p.unlink()


def as_user(user: str | None, fn, *a):
    """fn(*a) in a child running as user (None: in this process); its dict result."""
    if user is None:
        return fn(*a)
    import pwd
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user, run, send the result back
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.write(w, json.dumps(fn(*a)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status:
        raise SystemExit(f"wal_commit: the run as {user} failed")
    return json.loads(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=3000, help="commits per target (3000)")
    ap.add_argument("--cpus", default="", help="comma-separated CPUs to pin the committing "
                    "process to, one round each after the unpinned one (default: none)")
    ap.add_argument("--user", default=None, help="commit as this user (default: the caller)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    cpus = [int(c) for c in args.cpus.split(",") if c.strip()]
    root = Path(os.environ.get("BENCH_ROOT", "/var/tmp/tkbench"))
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tkwal.", dir=root) as w:
        work = Path(w)
        native, back, mnt = work / "native", work / "back", work / "mnt"
        for x in (native, back, mnt):
            x.mkdir()
        if args.user:
            os.chmod(work, 0o755)
            os.chmod(native, 0o777)
        mount = subprocess.run([str(HERE / "takakrypt-mount.sh"), str(back), str(mnt)],
                               env={**os.environ, "TAKAKRYPT_BENCH_KEY": str(work / "key")})
        if mount.returncode:
            return 1
        try:
            if args.user:
                os.chmod(mnt, 0o777)
            u = args.user
            out = {"native": as_user(u, commits, native, args.commits),
                   "takakrypt": as_user(u, commits, mnt, args.commits)}
            allowed = os.sched_getaffinity(0)
            for c in cpus:
                os.sched_setaffinity(0, {c})
                try:
                    out[f"native_cpu{c}"] = as_user(u, commits, native, args.commits)
                    out[f"takakrypt_cpu{c}"] = as_user(u, commits, mnt, args.commits)
                finally:
                    os.sched_setaffinity(0, allowed)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    out["ratio_commit_time"] = out["takakrypt"]["commit_us"] / out["native"]["commit_us"]
    if args.json:
        json.dump(out, sys.stdout)
        print()
    else:
        for t in [k for k in out if k.startswith(("native", "takakrypt"))]:
            r = out[t]
            print(f"{t:15s} write {r['write_us']:7.1f} us  fdatasync {r['fdatasync_us']:7.1f} us"
                  f"  commit {r['commit_us']:7.1f} us")
        print(f"commit time takakrypt/native: {out['ratio_commit_time']:.2f}x")
        for c in cpus:
            print(f"pinned to CPU {c}: takakrypt/native "
                  f"{out[f'takakrypt_cpu{c}']['commit_us'] / out[f'native_cpu{c}']['commit_us']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
