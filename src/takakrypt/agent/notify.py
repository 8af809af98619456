"""systemd notification protocol ($NOTIFY_SOCKET): READY=1, RELOADING=1, STOPPING=1,
STATUS=..., WATCHDOG=1, FDSTORE=1 (descriptors as SCM_RIGHTS).  No dependency on
libsystemd; a no-op when not under systemd."""

from __future__ import annotations

import array
import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.address = addr or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            # ping at half the timeout, as sd_watchdog_enabled(3) recommends
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str, fds: list[int] | None = None) -> bool:
        if not self.address:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            self._sock.sendmsg(["\n".join(fields).encode()], anc, 0, self.address)
        except OSError:
            return False
        return True

    def send_fds(self, fields: tuple[str, ...], fds: list[int]) -> bool:
        """One datagram with descriptors (agent.handover.Notify)."""
        return self.send(*fields, fds=fds)

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status
                                                                  else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload units match the reload (systemd >= 253)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
