"""The FUSE engine's model test (tests/test_fuse_model.py) against takakryptfs: random
sequences of open/pread/pwrite/truncate/fsync/rename/unlink/link/symlink/xattr on the
kernel guard point and on a plain ext4 directory must agree step by step.  Two rules are
added for the kernel: stores through a shared writable mmap, and dropping the page
cache (so reads come back from the stored TAKA blocks, not from memory)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from types import SimpleNamespace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from test_fuse_model import NAMES, GuardModel
from tkfs_env import drop_caches


class KernelModel(GuardModel):
    @rule(name=st.sampled_from(NAMES), off=st.integers(0, 12000),
          data=st.binary(min_size=1, max_size=5000))
    def mmap_write(self, name, off, data):
        def op(r):
            fd = os.open(r / name, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if off + len(data) > size:     # mmap cannot grow a file: stay inside
                    return "short"
                with mmap.mmap(fd, size) as m:
                    m[off:off + len(data)] = data
                    m.flush()
                return "ok"
            finally:
                os.close(fd)
        self.both(op)

    @rule()
    def drop_page_cache(self):
        drop_caches()


def test_kernel_guard_point_matches_plain_directory(kenv):
    env = kenv
    plain = env.ext / "plain"
    plain.mkdir()
    KernelModel.guard = SimpleNamespace(mnt=env.kmnt)
    KernelModel.plain_root = plain
    run = KernelModel.TestCase
    run.settings = settings(max_examples=int(os.environ.get("TK_MODEL_EXAMPLES", "12")),
                            stateful_step_count=30, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()
    # whatever the examples did, the stored files are what the model says
    drop_caches()   # written back first (drop_caches syncs)
    for m in env.kmnt.glob("m[0-9]*"):
        for dirpath, _, files in os.walk(m):
            for f in files:
                p = os.path.join(dirpath, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    rel = os.path.relpath(p, env.kmnt)
                    assert env.decrypt(env.lower / rel) == Path(p).read_bytes(), rel
