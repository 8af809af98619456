"""Issue 16 end to end, real FUSE engine: a guard point outlives its takakryptd
(systemd's fd store, `takakrypt restart`), a successor without keys denies, and
`takakrypt guard release` is the one way down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from agent_helpers import base_config, running
from handover_helpers import FakeSystemd
from takakrypt.guard import GuardPoint

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")
needs_handover = pytest.mark.skipif(not hasattr(GuardPoint, "handover_begin"),
                                    reason="the engine's handover API is not in this tree")

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat"))


def _cfg(tmp_path):
    """One guard point: python gets plaintext, cat ciphertext, the rest EACCES."""
    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir(exist_ok=True)
    os.chmod(gp, 0o777)
    cfg["process_sets"] = {"app": {"executables": [PY]}, "backup": {"executables": [CAT]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"process_set": "backup", "actions": ["read_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "gp", "key": "k1"}]
    return cfg, gp


def _mounts(path):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] == str(path)
                and "fuse.takakrypt" in line.partition(" - ")[2]]


def _status(cfg):
    r = subprocess.run([sys.executable, "-m", "takakrypt", "status", "--json"], capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"]))
    assert r.stdout, r.stderr
    return json.loads(r.stdout)


def _write(path, data: bytes):
    r = subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'wb').write("
                        "sys.stdin.buffer.read())", str(path)], input=data,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _read(path):
    return subprocess.run([PY, "-c", "import sys; sys.stdout.buffer.write(open(sys.argv[1], "
                           "'rb').read())", str(path)], capture_output=True, timeout=60)


# a reader that holds its file open: reads half, says so, waits for a line, reads the rest
_HOLDER = r"""
import sys
f = open(sys.argv[1], "rb")
head = f.read(int(sys.argv[2]))
print("half", flush=True)
sys.stdin.readline()
sys.stdout.buffer.write(head + f.read())
"""


def test_guard_release_refused_while_open_then_done(tmp_path):
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        _write(gp / "f", b"x" * 10000)
        holder = subprocess.Popen([PY, "-c", _HOLDER, str(gp / "f"), "10"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"half\n"
        r = d.cli("guard", "release", str(gp), check=False)
        assert r.returncode == 2, r.stderr
        assert f"pid {holder.pid} (python" in r.stderr and str(gp / "f") in r.stderr, r.stderr
        assert _mounts(gp)  # still served
        holder.communicate(b"go\n", timeout=60)
        r = d.cli("guard", "release", str(gp), "--json")
        assert json.loads(r.stdout) == {"released": str(gp)}
        assert not _mounts(gp)
        assert not _status(cfg)["guard_points"][0]["mounted"]
        assert open(gp / "f", "rb").read(4) == b"TAKA"  # the backing file, ciphertext


@needs_handover
def test_fd_store_restart_keeps_an_open_file_reading(tmp_path):
    cfg, gp = _cfg(tmp_path)
    data = os.urandom(3 << 20)
    sd = FakeSystemd(tmp_path)
    try:
        p1 = sd.start(tmp_path, cfg)
        sd.wait_for("READY=1", p1)
        _write(gp / "f", data)
        dev = _mounts(gp)[0].split()[2]
        reader = subprocess.Popen([PY, "-c", _HOLDER, str(gp / "f"), str(1 << 20)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert reader.stdout.readline() == b"half\n"
        p1.send_signal(signal.SIGTERM)
        assert p1.wait(60) == 0
        assert [m.split()[2] for m in _mounts(gp)] == [dev]  # never unmounted
        p2 = sd.start(tmp_path, cfg, log="takakryptd2.log")
        sd.wait_for("READY=1", p2)
        out, _ = reader.communicate(b"go\n", timeout=60)
        assert reader.returncode == 0 and out == data  # the right plaintext, whole
        assert [m.split()[2] for m in _mounts(gp)] == [dev]  # the same mount, served
        assert _read(gp / "f").stdout == data
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(60) == 0
    finally:
        sd.close()  # the store's fds close: the connection ends
        for _ in _mounts(gp):
            subprocess.run(["fusermount3", "-uz", str(gp)], check=False)


def _pid_gone(pid, timeout=60):
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"pid {pid} still there"
        time.sleep(0.05)


# writes 64 KiB chunks with fsync; prints the count after each; a line on stdin ends it
_WRITER = r"""
import os, select, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
n = 0
while True:
    os.write(fd, bytes([n % 251]) * 65536)
    os.fsync(fd)
    n += 1
    print(n, flush=True)
    if select.select([sys.stdin], [], [], 0)[0]:
        break
os.close(fd)
"""


@needs_handover
def test_restart_while_a_writer_streams_with_fsync(tmp_path):
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        writer = subprocess.Popen([PY, "-c", _WRITER, str(gp / "stream")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        while int(writer.stdout.readline()) < 20:
            pass
        r = d.cli("restart")  # takakryptd --upgrade: a new process takes over
        assert d.proc.wait(60) == 0  # the old one let go and exited
        new = _status(cfg)["pid"]
        assert new != d.proc.pid
        try:
            before = int(writer.stdout.readline())
            while int(writer.stdout.readline()) < before + 20:  # goes on through the new one
                pass
            writer.stdin.write(b"stop\n")
            writer.stdin.flush()
            rest = writer.communicate(timeout=60)[0].split()
            assert writer.returncode == 0
            n = int(rest[-1]) if rest else before + 20
            got = _read(gp / "stream").stdout
            assert got == b"".join(bytes([i % 251]) * 65536 for i in range(n))
            assert len(_mounts(gp)) == 1
        finally:
            os.kill(new, signal.SIGTERM)
            _pid_gone(new)
        assert r.returncode == 0


@needs_handover
def test_successor_without_keystore_denies_then_next_start_serves(tmp_path):
    cfg, gp = _cfg(tmp_path)
    sd = FakeSystemd(tmp_path)
    try:
        p1 = sd.start(tmp_path, cfg)
        sd.wait_for("READY=1", p1)
        _write(gp / "f", b"secret rows\n" * 100)
        p1.send_signal(signal.SIGTERM)
        assert p1.wait(60) == 0
        key = tmp_path / "master.key"
        good = key.read_bytes()
        key.write_bytes(os.urandom(len(good)))
        p2 = sd.start(tmp_path, cfg, log="takakryptd2.log")
        sd.wait_for("READY=1", p2)
        r = _read(gp / "f")
        assert r.returncode != 0 and b"Permission denied" in r.stderr and b"secret" not in \
            r.stdout, (r.stdout[:40], len(r.stdout), _mounts(gp), (gp / "f").stat())
        st = _status(cfg)
        assert st["state"] == "unhealthy" and "key backend cannot be opened" in \
            st["denying_all"], st
        assert len(_mounts(gp)) == 1
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(60) == 0
        key.write_bytes(good)
        p3 = sd.start(tmp_path, cfg, log="takakryptd3.log")
        sd.wait_for("READY=1", p3)
        assert _read(gp / "f").stdout == b"secret rows\n" * 100
        assert _status(cfg)["state"] == "healthy"
        p3.send_signal(signal.SIGTERM)
        assert p3.wait(60) == 0
    finally:
        sd.close()
        for _ in _mounts(gp):
            subprocess.run(["fusermount3", "-uz", str(gp)], check=False)


@needs_handover
def test_fd_store_sigkill_keeps_files_and_a_writer_going(tmp_path):
    """A watchdog's restart: takakryptd is SIGKILLed (no handover) three times while a
    reader holds a file half read and a writer streams with fsync.  The connection and
    the engine's shadow state wait in the fd store since the mount; each next start
    takes them over: the mount is never replaced nor uncovered, no call fails, every
    byte reads back."""
    cfg, gp = _cfg(tmp_path)
    data = os.urandom(3 << 20)
    sd = FakeSystemd(tmp_path)
    writer = None
    try:
        p = sd.start(tmp_path, cfg)
        sd.wait_for("READY=1", p)
        _write(gp / "f", data)
        dev = _mounts(gp)[0].split()[2]
        reader = subprocess.Popen([PY, "-c", _HOLDER, str(gp / "f"), str(1 << 20)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert reader.stdout.readline() == b"half\n"
        writer = subprocess.Popen([PY, "-c", _STREAMER, str(gp / "stream")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"writing\n"
        for i in range(3):
            assert any(n.startswith("tkgp-") for n in sd.names())  # stored since the mount
            time.sleep(0.5)  # the writer keeps writing
            p.kill()
            p.wait(60)
            assert [m.split()[2] for m in _mounts(gp)] == [dev]  # not unmounted
            p = sd.start(tmp_path, cfg, log=f"takakryptd-{i + 2}.log")
            sd.wait_for("READY=1", p)
            assert [m.split()[2] for m in _mounts(gp)] == [dev]  # the same mount, served
        out, _ = writer.communicate(b"stop\n", timeout=60)
        assert writer.returncode == 0, out
        written = out
        assert _read(gp / "stream").stdout == written
        out, _ = reader.communicate(b"go\n", timeout=60)
        assert reader.returncode == 0 and out == data
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        sd.close()
        for _ in _mounts(gp):
            subprocess.run(["fusermount3", "-uz", str(gp)], check=False)


# writes 8 KiB pages with fsync until told to stop; prints what it wrote
_STREAMER = r"""
import os, select, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
print("writing", flush=True)
out = bytearray()
n = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    page = (b"page %d " % n).ljust(8192, b".")
    os.write(fd, page)
    os.fsync(fd)
    out += page
    n += 1
os.close(fd)
sys.stdout.buffer.write(bytes(out))
"""
