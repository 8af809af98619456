"""A stand-in for systemd's notify socket with a file-descriptor store, and a way to
start takakryptd the way systemd starts it with a non-empty store (LISTEN_FDS from 3,
LISTEN_FDNAMES, LISTEN_PID of the process itself)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent_helpers import write_config

TESTS = os.path.dirname(os.path.abspath(__file__))

# exec takakryptd with the store's fds at 3.. (sd_listen_fds), LISTEN_PID = its own pid
_LAUNCH = r"""
import os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
if fds:
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


class FakeSystemd:
    """Receives sd_notify datagrams; keeps FDSTORE=1 descriptors by FDNAME (in the
    order they came) and drops them on FDSTOREREMOVE=1, as systemd does."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.store: list[tuple[str, int]] = []  # (name, fd)
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self._stop = False
        self.procs: list[subprocess.Popen] = []  # stopped at close(), whatever happened
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except socket.timeout:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(blob[:len(blob) - len(blob) % 4])
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
            with self.cond:
                if fields.get("FDSTORE") == "1":
                    self.store += [(fields.get("FDNAME", "stored"), fd) for fd in fds]
                else:
                    for fd in fds:
                        os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    for name, fd in [e for e in self.store if e[0] == fields.get("FDNAME")]:
                        self.store.remove((name, fd))
                        os.close(fd)
                self.messages.append(data.decode())
                self.cond.notify_all()

    def wait_for(self, field: str, proc: subprocess.Popen | None = None,
                 timeout: float = 60, prefix: bool = False) -> str:
        """The first message with line ``field`` (``prefix``: a line starting so)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages:
                    if any(x == field or prefix and x.startswith(field)
                           for x in m.split("\n")):
                        self.messages.remove(m)
                        return m
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"takakryptd exited {proc.returncode}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {field}; got {self.messages}")
                self.cond.wait(0.2)

    def names(self) -> list[str]:
        with self.cond:
            return [n for n, _ in self.store]

    def start(self, tmp: Path, cfg: dict, *args: str, log: str = "takakryptd.log",
              prelude: str = "", env: dict | None = None,
              fd_store: bool = True) -> subprocess.Popen:
        """takakryptd --foreground --fd-store under this fake systemd (``prelude``:
        Python run in the daemon's process before main, e.g. a fake engine)."""
        config = tmp / "takakrypt.yaml"
        write_config(config, cfg)
        with self.cond:
            fds = [fd for _, fd in self.store]
            names = ":".join(n for n, _ in self.store)
        high = [os.dup(fd) for fd in fds]  # above every fd number the child will use
        high = [self._above(fd, 3 + len(fds)) for fd in high]
        run = (f"import sys; sys.path.insert(0, {TESTS!r})\n{prelude}\n"
               "from takakrypt.agent.daemon import main; sys.exit(main())")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, ",".join(map(str, high)), names,
                 "-c", run, "--config", str(config), "--foreground",
                 *(["--fd-store"] if fd_store else []), *args],
                env=dict(os.environ, NOTIFY_SOCKET=self.path, **(env or {})),
                stdout=open(tmp / log, "ab"), stderr=subprocess.STDOUT, pass_fds=high)
            self.procs.append(proc)
            return proc
        finally:
            for fd in high:
                os.close(fd)

    @staticmethod
    def _above(fd: int, floor: int) -> int:
        if fd >= floor:
            return fd
        import fcntl

        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
        os.close(fd)
        return new

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)  # (a thread stuck in D state never ends)
        self._stop = True
        self.thread.join(5)
        self.sock.close()
        with self.cond:
            for _, fd in self.store:
                os.close(fd)
            self.store.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
