"""A stand-in for the FUSE engine's guard point, for tests of the daemon's handover
protocol only (who sends which descriptor where, in which order, and what the daemon
does when a step fails).  End-to-end tests use the real engine.

``install()`` (run inside takakryptd before main) replaces agent.guards.build.  Every
step is appended to $TK_FAKE_LOG as "pid event path detail".  The connection is a pipe:
handover_begin hands out its read end and a state naming the pipe's inode; resume
checks that the descriptor it gets is that same pipe.  $TK_FAKE_RESUME_FAIL makes
resume raise ValueError; while the file $TK_FAKE_MOUNT_FAIL exists, mounting a guard
point whose path ends in /b fails; with $TK_FAKE_GATE resume waits until that file exists."""

from __future__ import annotations

import os
import time
from typing import Any


def _log(event: str, path: str, detail: str = "") -> None:
    with open(os.environ["TK_FAKE_LOG"], "a") as f:
        f.write(f"{os.getpid()} {event} {path} {detail}\n")


class FakeGuardPoint:
    def __init__(self, gp: Any) -> None:
        self.spec = gp
        self.path = os.path.normpath(gp.path)
        self.fds: list[int] = []
        self.is_mounted = False

    def set_policy_hints(self, *a: Any) -> None:
        pass

    def bump_generation(self) -> int:
        return 0

    def stats(self) -> dict:
        return {}

    def mount(self) -> None:
        fail = os.environ.get("TK_FAKE_MOUNT_FAIL")
        if fail and os.path.exists(fail) and self.path.endswith("/b"):
            _log("mount-failed", self.path)
            raise OSError(5, f"cannot mount guard point {self.path}: Input/output error")
        r, w = os.pipe()
        os.close(w)
        self.fds = [r]
        self.is_mounted = True
        _log("mount", self.path, str(os.fstat(r).st_ino))

    def mount_problem(self) -> str:
        return ""  # no kernel mount to send a request through: the stand-in serves

    def unmount(self) -> None:
        self.is_mounted = False
        _log("unmount", self.path)

    def handover_begin(self) -> tuple[list[int], bytes]:
        _log("begin", self.path)
        return list(self.fds), f"pipe {os.fstat(self.fds[0]).st_ino}".encode()

    def handover_abort(self) -> None:
        _log("abort", self.path)

    def handover_done(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.is_mounted = False
        _log("done", self.path)

    def resume(self, fds: list[int], state: bytes) -> None:
        gate = os.environ.get("TK_FAKE_GATE")
        if gate:  # hold the handover open until the test lets it go on
            _log("resume-waits", self.path)
            while not os.path.exists(gate):
                time.sleep(0.01)
        if os.environ.get("TK_FAKE_RESUME_FAIL"):
            _log("resume-failed", self.path)
            raise ValueError("engine state does not match (fake)")
        want = state.decode().split()[1]
        if str(os.fstat(fds[0]).st_ino) != want:
            raise ValueError(f"descriptor is not the connection the state names ({want})")
        self.fds = [os.dup(fd) for fd in fds]
        self.is_mounted = True
        _log("resume", self.path, want)


def install() -> None:
    from takakrypt.agent import guards

    guards.build = lambda agent, gp: FakeGuardPoint(gp)  # type: ignore[assignment]


def events(path: str) -> list[tuple[int, str, str, str]]:
    out = []
    with open(path) as f:
        for line in f:
            pid, event, where, *detail = line.rstrip("\n").split(" ", 3)
            out.append((int(pid), event, where, detail[0] if detail else ""))
    return out
