"""An open file description is a capability (issue 14, item 2).

The policy decides at open: the view, and whether the handle may read and write.  The
handle's READ, WRITE, FSYNC and FALLOCATE are not asked again, whoever sends them.
Before, they were checked per request for the sending process, which the page cache,
mmap and shared-mapping writeback bypass: a denied program reading an inherited fd got
plaintext while the pages were cached and EACCES after drop_caches.  Now the answer is
the same either way, and what a denied program is refused is every open of its own --
also while a permitted process holds the file open and its pages are cached.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_helpers import errno_of, fuse_skip_reason, guard_mount, run_as, sweep_stale_mounts

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")

from takakrypt.cryptofile import TakaFile  # noqa: E402

NOBODY = 65534
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")
PY = os.path.realpath(sys.executable)
# python (the tests) gets plaintext, nobody a raw view, cat and everyone else nothing
RULES = [{"uid": NOBODY, "effects": ["permit"]},
         {"exe": PY, "effects": ["permit", "apply_key"]},
         {"effects": ["deny", "audit"]}]
SECRET = b"BOARD-MEMO-CONFIDENTIAL\n" * 400


@pytest.fixture(scope="module", autouse=True)
def _sweep():
    sweep_stale_mounts()
    yield
    sweep_stale_mounts()


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


# A program the policy denies that reads an inherited fd and nothing else (cat would
# fstat it first: a GETATTR that reaches the engine without the handle, checked like
# stat(2) of the path, so a program denied `getattr` cannot fstat -- see the docs).
READER_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char buf[65536];
    off_t off = 0;
    ssize_t n;
    if (argc < 2) return 2;
    /* "fd=N": an inherited fd; else a path it opens itself */
    int fd = strncmp(argv[1], "fd=", 3) == 0 ? atoi(argv[1] + 3) : open(argv[1], O_RDONLY);
    if (fd < 0) return errno == EACCES ? 13 : 4;
    while ((n = pread(fd, buf, sizeof buf, off)) > 0) {
        if (write(1, buf, (size_t)n) != n) return 3;
        off += n;
    }
    if (n < 0) fprintf(stderr, "pread at %lld: %s\n", (long long)off, strerror(errno));
    return n < 0 ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("reader")
    (d / "reader.c").write_text(READER_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "reader"), str(d / "reader.c")], check=True)
    return str(d / "reader")


def read_inherited(reader: str, fd: int) -> subprocess.CompletedProcess[bytes]:
    """The denied `reader` reading the inherited fd."""
    return subprocess.run([reader, f"fd={fd}"], pass_fds=(fd,), capture_output=True)


def test_denied_program_cannot_open_while_pages_are_cached(wtmp):
    with guard_mount(wtmp, rules=RULES) as g:
        os.chmod(g.mnt, 0o777)
        p = g.mnt / "memo"
        p.write_bytes(SECRET)
        os.chmod(p, 0o644)
        fd = os.open(p, os.O_RDONLY)  # held open, its pages cached (keep_cache)
        try:
            assert os.read(fd, len(SECRET)) == SECRET
            r = subprocess.run([CAT, str(p)], capture_output=True)
            assert r.returncode != 0 and b"Permission denied" in r.stderr
            assert r.stdout == b""
            # another user's own open lands on its own (raw) view: ciphertext only
            raw = run_as(NOBODY, NOBODY, lambda q: Path(q).read_bytes(), str(p))
            assert raw == (g.backing / "memo").read_bytes() and SECRET[:64] not in raw
        finally:
            os.close(fd)
        denies = [e for e in g.audit_events() if e["path"] == "memo" and e["effects"] & 2]
        assert denies


def test_inherited_fd_reads_the_same_with_and_without_cached_pages(wtmp, reader):
    with guard_mount(wtmp, rules=RULES) as g:
        p = g.mnt / "memo"
        p.write_bytes(SECRET)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.read(fd, len(SECRET)) == SECRET  # cached
            first = read_inherited(reader, fd)
            drop_caches()
            second = read_inherited(reader, fd)  # from the engine: not asked again
            # its own open is refused
            own = subprocess.run([reader, str(p)], capture_output=True)
        finally:
            os.close(fd)
        assert first.returncode == 0 and first.stdout == SECRET, first
        assert second.returncode == 0 and second.stdout == SECRET, second
        assert own.returncode == errno.EACCES and own.stdout == b"", own


def test_fd_passed_over_scm_rights_keeps_its_view(wtmp):
    """A plaintext fd passed to the raw-only user reads plaintext; a raw fd passed to
    a plaintext caller reads ciphertext: the handle, not the holder, has the view."""
    with guard_mount(wtmp, rules=RULES) as g:
        os.chmod(g.mnt, 0o777)
        p = g.mnt / "memo"
        p.write_bytes(SECRET)
        os.chmod(p, 0o644)
        stored = (g.backing / "memo").read_bytes()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # nobody: receive the plaintext fd, then send back a raw one
            rc = 1
            try:
                a.close()
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                _, fds, _, _ = socket.recv_fds(b, 16, 1)
                got = os.pread(fds[0], len(SECRET), 0)
                mine = os.open(p, os.O_RDONLY)
                socket.send_fds(b, [b"x"], [mine])
                b.sendall(b"ok" if got == SECRET else b"no")
                rc = 0
            finally:
                os._exit(rc)
        b.close()
        fd = os.open(p, os.O_RDONLY)
        socket.send_fds(a, [b"x"], [fd])
        _, fds, _, _ = socket.recv_fds(a, 16, 1)
        verdict = a.recv(2)
        os.waitpid(pid, 0)
        raw = os.pread(fds[0], len(stored) + 10, 0)
        for f in (fd, *fds):
            os.close(f)
        a.close()
        assert verdict == b"ok"
        assert raw == stored


def test_writes_through_an_inherited_fd_and_mapping_are_kept(wtmp):
    """The capability covers writes: a denied program writing through an inherited
    writable fd or a shared mapping of it stores encrypted bytes, and its fsync works;
    its own open for writing is refused."""
    with guard_mount(wtmp, rules=RULES) as g:
        p = g.mnt / "f"
        p.write_bytes(bytes(8192))
        fd = os.open(p, os.O_RDWR)
        try:
            m = mmap.mmap(fd, 8192)

            def child() -> tuple[int, int]:
                # the child drops to nobody: raw-only by the policy, no plaintext open
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.pwrite(fd, b"written-by-fd", 0)
                m[4096:4109] = b"stored-in-map"
                m.flush()
                os.fsync(fd)
                return errno_of(os.open, str(p), os.O_WRONLY), 0

            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    own, _ = child()
                    code = 0 if own == errno.EACCES else 2
                except BaseException:  # noqa: BLE001
                    code = 1
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            m.close()
        finally:
            os.close(fd)
        assert os.waitstatus_to_exitcode(status) == 0
        with TakaFile.open(str(g.backing / "f"), g.keys()) as f:
            plain = f.read(0, f.size)
        assert plain[:13] == b"written-by-fd" and plain[4096:4109] == b"stored-in-map"


def test_create_checks_the_access_mode_of_the_new_handle(wtmp):
    """A created file's handle is a capability too: `create` alone does not give write
    access when the policy denies `write` on the path."""
    rules = [{"actions": ["write", "append"], "effects": ["deny", "audit"]},
             {"effects": ["permit", "apply_key"]}]
    with guard_mount(wtmp, rules=rules) as g:
        assert errno_of(os.open, g.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644) == errno.EACCES
        assert not (g.backing / "new").exists()
        fd = os.open(g.mnt / "ro", os.O_CREAT | os.O_RDONLY, 0o644)  # read access only
        os.close(fd)
        assert (g.mnt / "ro").read_bytes() == b""
        assert any(e["path"] == "new" and e["action"] == "write" for e in g.audit_events())
