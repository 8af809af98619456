"""A raw-view restore racing a plaintext appender (issue 14, item 4).

A raw write used to run beside the plaintext engine's read-modify-write of the same
file, without the inode's lock, and the engine forgot its cached header only for raw
writes below offset 128: an append could then store a header or a last block over
the half-restored file, which afterwards read EIO.  Raw writes are now one step
between the engine's operations (under the inode lock, the engine's state of the file
dropped after each), so every interleaving ends in a state some serial order gives:
the restored file, followed by the records appended after the last restore.
"""

from __future__ import annotations

import os
import threading

import pytest

from fuse_helpers import fuse_skip_reason, guard_mount, run_as, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

NOBODY = 65534
RULES = [{"uid": 0, "effects": ["permit", "apply_key"]},
         {"uid": NOBODY, "effects": ["permit"]}]
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
RECORDS = 300 if SANITIZED else 1500
RESTORES = 100 if SANITIZED else 500


@pytest.fixture(scope="module", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


def record(i: int) -> bytes:
    return b"<rec %06d>\n" % i


def restore_loop(path: str, stored: bytes, n: int) -> int:
    """The raw caller writes the stored image back over the file n times."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(n):
            assert os.pwrite(fd, stored, 0) == len(stored)
    finally:
        os.close(fd)
    return n


@pytest.mark.parametrize("io_uring", [True, False], ids=["uring", "classic"])
def test_raw_restore_racing_appender(wtmp, io_uring):
    with guard_mount(wtmp, rules=RULES, io_uring=io_uring) as g:
        os.chmod(g.mnt, 0o777)
        plain = os.urandom(10_000)  # a partial last block: appends rewrite it
        with open(g.mnt / "f", "wb") as f:
            f.write(plain)
        os.chmod(g.mnt / "f", 0o666)
        stored = (g.backing / "f").read_bytes()
        errors: list[BaseException] = []

        def appender() -> None:
            try:
                fd = os.open(g.mnt / "f", os.O_WRONLY | os.O_APPEND)
                try:
                    for i in range(RECORDS):
                        os.write(fd, record(i))
                finally:
                    os.close(fd)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=appender)
        t.start()
        run_as(NOBODY, NOBODY, restore_loop, str(g.mnt / "f"), stored, RESTORES)
        t.join()
        assert not errors, errors
        got = (g.mnt / "f").read_bytes()  # no EIO: the file is whole
        assert got.startswith(plain)
        tail = got[len(plain):]
        # what follows the restored content: the records appended after the last
        # restore, in order, ending with the last one (or nothing)
        n = len(tail) // len(record(0))
        assert tail == b"".join(record(i) for i in range(RECORDS - n, RECORDS))
        assert not [e for e in g.audit_events() if e.get("category") == "integrity"
                    or "integrity" in str(e.get("event", ""))]
        assert g.proc.poll() is None
