"""The state of a guard point's FUSE connection (takakrypt.fuseconn), asked of the
connection and never of a stat the kernel answers from its attribute cache (issue 16
item 4: a restart 0.3 s after a SIGKILL stacked a new mount on the dead one)."""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_helpers import (SRC, errno_of, fuse_skip_reason, raw_mount, sweep_stale_mounts,
                          unmount_path)

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from takakrypt import fuseconn  # noqa: E402
from takakrypt.guard import (GuardError, cleanup_stale, connection_state,  # noqa: E402
                             fuse_mounts, is_stale, mount_device)

LONG = 600.0  # metadata_cache: the kernel may answer a stat of the root for ten minutes


@pytest.fixture(scope="module", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


def _stacked(path: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == str(path)
                   and line.split(" - ")[1].startswith("fuse.takakrypt "))


@contextlib.contextmanager
def _server(tmp_path: Path):
    """An in-place guard point at tmp_path/data served by ``python -m takakrypt.guard``
    (a process holding its connection alone: killed, the connection dies with it), with
    LONG kernel caching; yields (mount point, server process)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    key = tmp_path / "key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
    proc = subprocess.Popen([sys.executable, "-m", "takakrypt.guard", "--mountpoint", str(data),
                             "--key-file", str(key), "--allow-all", "--metadata-cache",
                             str(LONG)], stdout=subprocess.PIPE, env=dict(os.environ,
                                                                          PYTHONPATH=str(SRC)))
    try:
        assert proc.stdout.readline().startswith(b"mounted"), "the guard point did not mount"
        yield data, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        unmount_path(str(data))


def test_quick_restart_after_sigkill_does_not_stack_on_the_dead_mount(tmp_path):
    with _server(tmp_path) as (mnt, proc):
        (mnt / "f").write_bytes(b"kept")
        os.stat(mnt)  # the root's attributes are now cached for LONG seconds
        proc.kill()
        proc.wait()
        os.stat(mnt)  # what the old check asked: answered from the cache, dead or not
        # the restart, at once: it must clean the dead mount up, not mount on top of it
        with _server(tmp_path):
            assert _stacked(mnt) == 1
            assert (mnt / "f").read_bytes() == b"kept"
    assert _stacked(mnt) == 0


def test_a_dead_connection_is_dead_whatever_the_cache_says(tmp_path):
    with _server(tmp_path) as (mnt, proc):
        assert connection_state(str(mnt)).state == fuseconn.LIVE
        assert not is_stale(str(mnt))
        os.stat(mnt)
        proc.kill()
        proc.wait()
        assert errno_of(os.stat, mnt) == 0  # cached
        st = connection_state(str(mnt))
        assert st.state == fuseconn.DEAD and st.error in fuseconn.REFUSED, st
        assert is_stale(str(mnt))
        assert cleanup_stale(str(mnt)) and str(mnt) not in fuse_mounts(str(mnt))
    assert connection_state(str(mnt)) is None  # no takakrypt mount there


def _send_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv_fd(sock: socket.socket) -> int:
    _, anc, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(4))
    return array.array("i", anc[0][2][:4])[0]


def test_no_answer_is_hung_while_a_process_holds_it_held_while_none_does(tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    fd = raw_mount(mnt)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn = int(mount_device(str(mnt)).split(":")[1])
        assert fuseconn.holders(conn) == (os.getpid(),)
        st = connection_state(str(mnt), timeout=0.5)
        assert st.state == fuseconn.HUNG and st.holders == (os.getpid(),), st
        # a process named as a store (systemd: PID 1) keeps it for a server: held
        st = connection_state(str(mnt), timeout=0.5, stores=(1, os.getpid()))
        assert st.state == fuseconn.HELD, st
        # in flight in a Unix socket, as in a handover: held, but nobody serves it
        _send_fd(a, fd)
        os.close(fd)
        fd = -1
        assert fuseconn.holders(conn) == ()
        st = connection_state(str(mnt), timeout=0.5)
        assert st.state == fuseconn.HELD and not is_stale(str(mnt)), st
        with pytest.raises(GuardError, match="held without a server"):
            cleanup_stale(str(mnt))  # someone's to pick up: neither unmounted nor stacked on
        assert str(mnt) in fuse_mounts(str(mnt))
        fd = _recv_fd(b)
        os.close(fd)  # the last descriptor: the kernel ends the connection
        fd = -1
        st = connection_state(str(mnt), timeout=5)
        assert st.state == fuseconn.DEAD, st
        assert cleanup_stale(str(mnt)) and str(mnt) not in fuse_mounts(str(mnt))
    finally:
        a.close()
        b.close()
        if fd >= 0:
            os.close(fd)
        if str(mnt) in fuse_mounts(str(mnt)):
            cleanup_stale(str(mnt))


def test_a_hung_connection_is_aborted_and_unmounted(tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    fd = raw_mount(mnt)
    try:
        assert is_stale(str(mnt), timeout=0.5)
        assert cleanup_stale(str(mnt)) and str(mnt) not in fuse_mounts(str(mnt))
    finally:
        os.close(fd)


_WITHOUT_SYS_ADMIN = """
import errno, os, sys
from takakrypt.guard import connection_state
try:
    os.getxattr(sys.argv[1], "trusted.takakrypt.probe")
    print("has CAP_SYS_ADMIN")
except OSError as e:
    if e.errno != errno.ENODATA:  # the kernel answers this itself without the capability
        print("has CAP_SYS_ADMIN")
print(connection_state(sys.argv[1]).state)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is absent")
def test_the_probe_works_without_cap_sys_admin(tmp_path):
    # trusted.* needs CAP_SYS_ADMIN (else the kernel says ENODATA, asking no one): the
    # probe then asks for a security.* name, which reaches the server as well
    def probe_unprivileged(mnt):
        r = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c",
                            _WITHOUT_SYS_ADMIN, str(mnt)], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, PYTHONPATH=str(SRC)))
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    with _server(tmp_path) as (mnt, proc):
        assert probe_unprivileged(mnt) == ["live"]
        os.stat(mnt)
        proc.kill()
        proc.wait()
        assert probe_unprivileged(mnt) == ["dead"]
