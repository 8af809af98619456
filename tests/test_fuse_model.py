"""Model test: random operation sequences on a guard point and on a plain directory
must give the same results (data, sizes, errno) step by step.

The guard point is mounted once for the module (served by a child process); every
hypothesis example works in a fresh pair of subdirectories.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fuse_helpers import fuse_skip_reason, guard_mount, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

NAMES = ["a", "b", "c", "d/x", "d/y"]
DIRS = ["d", "e"]
_counter = itertools.count()


@pytest.fixture(scope="module", params=["io_uring", "classic"])
def mounted(request):
    """The same model against both transports: FUSE over io_uring (where the kernel
    offers it) and the classic /dev/fuse channel."""
    sweep_stale_mounts()
    base = Path(tempfile.mkdtemp(prefix="tkmodel-"))
    (base / "plain").mkdir()
    try:
        with guard_mount(base, io_uring=request.param == "io_uring") as g:
            yield g, base / "plain"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def outcome(fn, *args):
    """('ok', value) or ('err', errno name): what both trees must agree on."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


class GuardModel(RuleBasedStateMachine):
    """Each rule runs the same operation in both roots and compares outcomes."""

    guard = None
    plain_root: Path | None = None

    @initialize()
    def setup(self):
        n = next(_counter)
        self.roots = [Path(self.guard.mnt) / f"m{n}", Path(self.plain_root) / f"m{n}"]
        for r in self.roots:
            r.mkdir()
            (r / "d").mkdir()
        self.fds: list[list[int]] = [[], []]  # open handles, pairwise

    def teardown(self):
        for side in getattr(self, "fds", [[], []]):
            for fd in side:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def both(self, fn):
        res = [outcome(fn, r) for r in self.roots]
        assert res[0] == res[1], res
        return res[0]

    # --- data ---
    @rule(name=st.sampled_from(NAMES), off=st.integers(0, 20000),
          data=st.binary(min_size=1, max_size=9000))
    def write(self, name, off, data):
        def op(r):
            fd = os.open(r / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(name=st.sampled_from(NAMES), data=st.binary(min_size=1, max_size=5000))
    def append(self, name, data):
        def op(r):
            fd = os.open(r / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(op)

    @rule(name=st.sampled_from(NAMES), off=st.integers(0, 25000), n=st.integers(0, 10000))
    def read(self, name, off, n):
        def op(r):
            fd = os.open(r / name, os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(name=st.sampled_from(NAMES), size=st.integers(0, 25000))
    def truncate(self, name, size):
        self.both(lambda r: os.truncate(r / name, size))

    @rule(name=st.sampled_from(NAMES))
    def open_trunc(self, name):
        self.both(lambda r: os.close(os.open(r / name, os.O_WRONLY | os.O_TRUNC)))

    @rule(name=st.sampled_from(NAMES))
    def fsync(self, name):
        def op(r):
            fd = os.open(r / name, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.both(op)

    # --- handles kept open across steps ("reopen") ---
    @rule(name=st.sampled_from(NAMES))
    def open_handle(self, name):
        res = [outcome(os.open, r / name, os.O_RDWR) for r in self.roots]
        assert (res[0][0], res[1][0]) in (("ok", "ok"), ("err", "err")), res
        if res[0][0] == "ok":
            self.fds[0].append(res[0][1])
            self.fds[1].append(res[1][1])
        else:
            assert res[0] == res[1]

    @rule(i=st.integers(0, 3), off=st.integers(0, 20000),
          data=st.binary(min_size=1, max_size=6000))
    def handle_write(self, i, off, data):
        if not self.fds[0]:
            return
        k = i % len(self.fds[0])
        res = [outcome(os.pwrite, self.fds[s][k], data, off) for s in (0, 1)]
        assert res[0] == res[1]

    @rule(i=st.integers(0, 3), off=st.integers(0, 25000), n=st.integers(0, 8000))
    def handle_read(self, i, off, n):
        if not self.fds[0]:
            return
        k = i % len(self.fds[0])
        res = [outcome(os.pread, self.fds[s][k], n, off) for s in (0, 1)]
        assert res[0] == res[1]
        res = [outcome(lambda fd: os.fstat(fd).st_size, self.fds[s][k]) for s in (0, 1)]
        assert res[0] == res[1]

    @rule(i=st.integers(0, 3))
    def handle_close(self, i):
        if not self.fds[0]:
            return
        k = i % len(self.fds[0])
        for s in (0, 1):
            os.close(self.fds[s].pop(k))

    # --- namespace ---
    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def rename(self, a, b):
        self.both(lambda r: os.rename(r / a, r / b))

    @rule(name=st.sampled_from(NAMES))
    def unlink(self, name):
        self.both(lambda r: os.unlink(r / name))

    @rule(d=st.sampled_from(DIRS))
    def mkdir(self, d):
        self.both(lambda r: os.mkdir(r / d))

    @rule(d=st.sampled_from(DIRS))
    def rmdir(self, d):
        self.both(lambda r: os.rmdir(r / d))

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def link(self, a, b):
        self.both(lambda r: os.link(r / a, r / b))

    @rule(dest=st.sampled_from(["a", "b", "nowhere"]), name=st.sampled_from(NAMES))
    def symlink(self, dest, name):
        self.both(lambda r: os.symlink(dest, r / name))

    @rule(name=st.sampled_from(NAMES), mode=st.sampled_from([0o600, 0o644, 0o400, 0o755]))
    def chmod(self, name, mode):
        self.both(lambda r: os.chmod(r / name, mode, follow_symlinks=False)
                  if not os.path.islink(r / name) else os.chmod(r / name, mode))

    @rule(name=st.sampled_from(NAMES), key=st.sampled_from(["user.a", "user.b"]),
          value=st.binary(max_size=40))
    def setxattr(self, name, key, value):
        self.both(lambda r: os.setxattr(r / name, key, value))

    @rule(name=st.sampled_from(NAMES), key=st.sampled_from(["user.a", "user.b"]))
    def getxattr(self, name, key):
        self.both(lambda r: os.getxattr(r / name, key))

    # --- invariants ---
    @invariant()
    def same_tree(self):
        if not hasattr(self, "roots"):
            return

        def snapshot(r: Path):
            out = {}
            for dirpath, dirnames, filenames in os.walk(r):
                for n in sorted(dirnames + filenames):
                    p = Path(dirpath) / n
                    rel = str(p.relative_to(r))
                    st_ = os.lstat(p)
                    kind = stat.S_IFMT(st_.st_mode)
                    entry = [kind, stat.S_IMODE(st_.st_mode), st_.st_nlink if not
                             stat.S_ISDIR(kind) else None]
                    if stat.S_ISREG(kind):
                        entry += [st_.st_size, outcome(lambda q: q.read_bytes(), p)]
                        entry += [sorted(os.listxattr(p))]
                    elif stat.S_ISLNK(kind):
                        entry.append(os.readlink(p))
                    out[rel] = entry
            return out

        a, b = snapshot(self.roots[0]), snapshot(self.roots[1])
        assert a == b


def test_guard_point_matches_plain_directory(mounted):
    g, plain = mounted
    GuardModel.guard = g
    GuardModel.plain_root = plain
    run = GuardModel.TestCase
    run.settings = settings(max_examples=int(os.environ.get("TK_MODEL_EXAMPLES", "40")),
                            stateful_step_count=30, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()
    s = g.stats()
    # the random sequences wrote and read; whether they renamed an existing name is up
    # to chance, so one rename over an existing file is checked here in any case
    assert s["ops"]["write"] > 0 and s["ops"]["read"] > 0
    for root in (g.mnt, plain):
        (root / "last-a").write_bytes(b"a")
        (root / "last-b").write_bytes(b"b")
        os.rename(root / "last-a", root / "last-b")
    assert (g.mnt / "last-b").read_bytes() == (plain / "last-b").read_bytes() == b"a"
    assert not (g.mnt / "last-a").exists()
    assert g.stats()["ops"]["rename"] > 0
