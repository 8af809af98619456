"""Scale: the guard point's fd use is bounded, whatever the number of inodes.

The engine identifies inodes by kernel file handles and keeps their O_PATH fds in a
bounded LRU (docs/guard-points.md, "Bounded fds").  These tests run tens of thousands
of files through a mount served with a small fd cache (``TAKAKRYPT_FD_CACHE``) and
sample the serving process's ``/proc/PID/fd`` the whole time: the count must stay
below the cache size + a margin (threads, open handles, Python's own fds).

Clients run in child processes (never in the serving process).  Environment:
``TK_SCALE_FILES`` (default 25000, more than the RLIMIT_NOFILE of 20000 that broke the
one-fd-per-inode engine) files for the create/stat/rename/delete test;
``TK_SCALE_UNTAR_ENTRIES`` (default 10000, 0 = all 65k) members of
``/var/tmp/tkbench/tree.tar`` to extract through the mount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuse_helpers import fuse_skip_reason, guard_mount  # noqa: E402

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

FD_CACHE = 512
FD_MARGIN = 200
TREE_TAR = Path("/var/tmp/tkbench/tree.tar")
NFILES = int(os.environ.get("TK_SCALE_FILES", "25000"))
UNTAR_ENTRIES = int(os.environ.get("TK_SCALE_UNTAR_ENTRIES", "10000"))


class FdMonitor:
    """Samples the number of open fds of a process until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = len(os.listdir(f"/proc/{self.pid}/fd"))
            except FileNotFoundError:
                return
            self.max = max(self.max, n)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> FdMonitor:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture
def small_fd_cache(monkeypatch):
    # guard_mount passes os.environ to the serving child
    monkeypatch.setenv("TAKAKRYPT_FD_CACHE", str(FD_CACHE))


def run_client(script: str, *args: str, timeout: float = 600) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"client failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# Runs in a CHILD: the whole life cycle of NFILES files, errors collected (not raised)
# so a failure reports how many operations failed and the first few errors.
CLIENT = r'''
import json, os, sys
mnt, n, ndirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errs = []
def err(op, path, e):
    errs.append(f"{op} {path}: {e!r}")
def content(i, gen):
    return (f"file {i} gen {gen} ".encode() * (1 + i % 7))
dirs = [os.path.join(mnt, f"d{k}") for k in range(ndirs)]
for d in dirs:
    os.mkdir(d)
def path(i):
    return os.path.join(dirs[i % ndirs], f"f{i:06d}")
W = os.O_WRONLY | os.O_CREAT | os.O_EXCL
# create
for i in range(n):
    p = path(i)
    try:
        fd = os.open(p, W, 0o644)
        try:
            os.write(fd, content(i, 0))
        finally:
            os.close(fd)
    except OSError as e:
        err("create", p, e)
# stat all
for i in range(n):
    p = path(i)
    try:
        st = os.stat(p)
        if st.st_size != len(content(i, 0)):
            err("size", p, st.st_size)
    except OSError as e:
        err("stat", p, e)
# listing
listed = sum(len(os.listdir(d)) for d in dirs)
if listed != n:
    err("listdir", mnt, listed)
# read a sample back (every 37th: spread over the whole range, long evicted)
for i in range(0, n, 37):
    p = path(i)
    try:
        with open(p, "rb") as f:
            if f.read() != content(i, 0):
                err("content", p, "mismatch")
    except OSError as e:
        err("read", p, e)
# rename every 10th into the next directory (handles survive renames)
renamed = {}
for i in range(0, n, 10):
    src = path(i)
    dst = os.path.join(dirs[(i + 1) % ndirs], f"r{i:06d}")
    try:
        os.rename(src, dst)
        renamed[i] = dst
    except OSError as e:
        err("rename", src, e)
for i, dst in list(renamed.items())[::13]:
    try:
        with open(dst, "rb") as f:
            if f.read() != content(i, 0):
                err("content-after-rename", dst, "mismatch")
    except OSError as e:
        err("read-after-rename", dst, e)
# an xattr and a truncate on a file whose fd was evicted long ago
p = renamed.get(0, path(0))
try:
    os.setxattr(p, "user.k", b"v")
    if os.getxattr(p, "user.k") != b"v":
        err("xattr", p, "mismatch")
    os.truncate(p, 3)
    with open(p, "rb") as f:
        if f.read() != content(0, 0)[:3]:
            err("truncate", p, "mismatch")
except OSError as e:
    err("xattr/truncate", p, e)
# delete everything
for i in range(n):
    p = renamed.get(i, path(i))
    try:
        os.unlink(p)
    except OSError as e:
        err("unlink", p, e)
# again, now that inode numbers are being reused: new objects must never be served
# through a deleted object's identity
m = min(n, 5000)
for i in range(m):
    p = path(i)
    try:
        fd = os.open(p, W, 0o644)
        try:
            os.write(fd, content(i, 1))
        finally:
            os.close(fd)
    except OSError as e:
        err("recreate", p, e)
for i in range(m):
    p = path(i)
    try:
        with open(p, "rb") as f:
            if f.read() != content(i, 1):
                err("content-recreated", p, "mismatch")
        os.unlink(p)
    except OSError as e:
        err("reread/unlink", p, e)
for d in dirs:
    try:
        os.rmdir(d)
    except OSError as e:
        err("rmdir", d, e)
left = os.listdir(mnt)
if left:
    err("leftover", mnt, left[:5])
print(json.dumps({"errors": len(errs), "first": errs[:10], "listed": listed,
                  "renamed": len(renamed)}))
'''


def test_many_files_bounded_fds(tmp_path, small_fd_cache):
    with guard_mount(tmp_path, threads=4) as g:
        pid = g.proc.pid
        base = len(os.listdir(f"/proc/{pid}/fd"))
        t0 = time.monotonic()
        with FdMonitor(pid) as mon:
            res = run_client(CLIENT, str(g.mnt), str(NFILES), "6")
        elapsed = time.monotonic() - t0
        after = len(os.listdir(f"/proc/{pid}/fd"))
        assert g.proc.poll() is None, "the server died"
        stats = g.stats()
    assert res["errors"] == 0, res["first"]
    assert res["listed"] == NFILES
    assert mon.samples > 10
    bound = FD_CACHE + FD_MARGIN
    assert mon.max < bound, f"server held {mon.max} fds (bound {bound}, at start {base})"
    assert after < bound
    # every file went through the plaintext view (encrypted at rest)
    assert stats["ops"]["create"] >= NFILES
    print(f"\n{NFILES} files: {elapsed:.1f} s, server fds: start {base}, "
          f"max {mon.max}, end {after}")


def _untar_members(limit: int) -> list[str] | None:
    """The first `limit` member names (None: all), parents before children."""
    if limit <= 0:
        return None
    names = []
    with tarfile.open(TREE_TAR) as tf:
        for m in tf:
            names.append(m.name)
            if len(names) >= limit:
                break
    return names


@pytest.mark.skipif(not TREE_TAR.exists(), reason=f"{TREE_TAR} is absent (benchmark tree)")
def test_untar_tree_bounded_fds(tmp_path, small_fd_cache):
    names = _untar_members(UNTAR_ENTRIES)
    sel = []
    if names is not None:
        lst = tmp_path / "members.txt"
        lst.write_text("".join(n + "\n" for n in names))
        sel = ["--no-recursion", "-T", str(lst)]
    with guard_mount(tmp_path, threads=4) as g:
        pid = g.proc.pid
        with FdMonitor(pid) as mon:
            t0 = time.monotonic()
            r = subprocess.run(["tar", "-C", str(g.mnt), "-xf", str(TREE_TAR), *sel],
                               capture_output=True, text=True, timeout=900)
            t_untar = time.monotonic() - t0
            assert r.returncode == 0, r.stderr[-2000:]
            # content, sizes, modes, mtimes, symlink targets against the archive
            d = subprocess.run(["tar", "-C", str(g.mnt), "-df", str(TREE_TAR), *sel],
                               capture_output=True, text=True, timeout=900)
            assert d.returncode == 0, (d.stdout + d.stderr)[-2000:]
            count = subprocess.run(["find", str(g.mnt), "-mindepth", "1"],
                                   capture_output=True, text=True, timeout=300)
        assert g.proc.poll() is None, "the server died"
    if names is None:
        with tarfile.open(TREE_TAR) as tf:
            expected = sum(1 for _ in tf)
    else:
        expected = len(names)
    assert len(count.stdout.splitlines()) == expected
    assert mon.max < FD_CACHE + FD_MARGIN, f"server held {mon.max} fds"
    print(f"\nuntar of {expected} entries: {t_untar:.1f} s, server fds max {mon.max}")
