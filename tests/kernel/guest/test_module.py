"""Loading and unloading takakryptfs: rmmod refuses while a mount is up (EBUSY) and the
mount keeps working; after the unmount it unloads, and mount/IO/unmount cycles leave no
slab objects behind.

Leak check: Debian's 6.1 kernel is built without kmemleak (CONFIG_DEBUG_KMEMLEAK is not
set; CONFIG_HAVE_DEBUG_KMEMLEAK only says the architecture could), so this compares the
kmalloc caches' active object counts in /proc/slabinfo before and after N cycles.  SLUB
counts the objects of per-CPU slabs as active, so each cache's count may move by up to a
slab per CPU without any leak: that much is allowed; a leak of one object per cycle in a
cache of at most N/2 objects per slab shows.  The module's own caches are destroyed at
rmmod, where SLUB reports leftovers itself ("Objects remaining", a BUG line the host's
kernel-log scan fails on)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from conftest import delete_module, insmod, loaded, mount, our_mounts, umount

N = 64


def _slab() -> dict[str, tuple[int, int]]:
    """kmalloc caches: name -> (active objects, objects per slab)."""
    out = {}
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        f = line.split()
        if f[0].startswith("kmalloc"):
            out[f[0]] = (int(f[1]), int(f[4]))
    return out


def _settle() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(1)  # RCU-deferred frees


@pytest.mark.usefixtures("needs_fs")
def test_rmmod_refused_while_mounted(scratch):
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()
    (lower / "sub").mkdir()
    mount(lower, mnt, "key=k1,decide=none")
    try:
        # in use: the kernel refuses with EWOULDBLOCK (rmmod: "is in use"), changes nothing
        assert delete_module() in (errno.EWOULDBLOCK, errno.EBUSY)
        assert loaded() and str(mnt) in our_mounts()
        assert os.listdir(mnt) == ["sub"] and os.path.isdir(mnt / "sub")
        os.mkdir(mnt / "made-after")
        assert sorted(os.listdir(lower)) == ["made-after", "sub"]
    finally:
        umount(mnt)
    assert delete_module() == 0 and not loaded()
    insmod()
    assert loaded()


@pytest.mark.usefixtures("needs_fs")
def test_mount_cycles_leave_no_slab_objects(scratch):
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()

    def cycle(i: int) -> None:
        mount(lower, mnt, "key=k1,decide=none")
        try:
            d = mnt / f"d{i % 4}"
            d.mkdir(exist_ok=True)
            os.listdir(mnt)
            os.stat(d)
            os.rmdir(d)
        finally:
            umount(mnt)

    for i in range(8):   # warm-up: caches and dentries that stay for good
        cycle(i)
    ncpu = os.cpu_count() or 1

    def batch() -> dict[str, int]:
        """kmalloc caches that grew by N/2 objects or more (beyond a slab per CPU) over
        N mount cycles."""
        _settle()
        before = _slab()
        for i in range(N):
            cycle(i)
        # a super block is freed after an RCU grace period and a work item (its dentry
        # and inode LRUs are two kmalloc-96 objects): slow under TCG, so wait for frees
        # that are only late, as long as they come; a leak stays.  Growth that stopped
        # falling for 10 s is not waited for any longer (another process's allocations:
        # the next batch tells)
        deadline = time.monotonic() + 60
        lowest: dict[str, int] = {}
        fell = time.monotonic()
        while True:
            _settle()
            after = _slab()
            grown = {k: after[k][0] - before[k][0] for k in after if k in before}
            leaks = {k: g for k, g in grown.items() if g - before[k][1] * ncpu >= N // 2}
            now = time.monotonic()
            if any(g < lowest.get(k, g + 1) for k, g in leaks.items()):
                fell = now
            lowest = {k: min(g, lowest.get(k, g)) for k, g in leaks.items()}
            if not leaks or now > deadline or now - fell > 10:
                print("slab growth over", N, "cycles:", {k: g for k, g in grown.items() if g})
                return leaks

    # a leak grows with every batch; another process's allocations (a daemon of an
    # earlier test exiting, kernel work) show in one batch at most
    first, second = batch(), batch()
    leaks = {k: (first[k], second[k]) for k in first if k in second}
    assert not leaks, f"kmalloc objects that grew in two batches of {N} cycles: {leaks}"
