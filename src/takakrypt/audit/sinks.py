"""Audit sinks: where events go.  A local file and RFC 5424 syslog (UDP, TCP, TLS).

Contract of a :class:`Sink` (the :class:`~takakrypt.audit.logger.AuditLogger` relies on it):

* ``write(event)`` is called from ONE thread (the logger's writer) and SHOULD return
  quickly.  It MAY raise; the logger counts the error and carries on.
* ``stats()`` is thread-safe and returns at least ``written``, ``errors``, ``dropped``.
* ``flush(timeout)`` and ``close(timeout)`` are idempotent; ``close`` flushes first.

:class:`FileSink` writes synchronously (one ``write(2)`` per event, ``fsync`` after every
deny).  :class:`SyslogSink` never blocks the logger on the network: ``write`` hands the
formatted message to a small bounded buffer drained by the sink's own sender thread,
which (re)connects with exponential backoff; while the destination is down, events are
counted as ``dropped``.

TCP and TLS use RFC 6587 octet-counting framing::

    MSG-LEN SP SYSLOG-MSG        e.g.  b"123 <134>1 2026-...Z host takakrypt 42 access [...] {...}"

UDP sends one message per datagram (RFC 5426), no framing.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Literal

from .event import ACCESS, INTEGRITY, Event
from .formats import FACILITIES, BodyFormat, body_encoder, to_syslog

__all__ = ["FileSink", "Sink", "SyslogSink", "Transport"]

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp", "tls"]


class Sink:
    """Base class: a name and thread-safe counters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._counter_lock = threading.Lock()
        self._counters: dict[str, int] = {"written": 0, "errors": 0, "dropped": 0}

    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def count_error(self) -> None:
        """Called by the logger when :meth:`write` raised."""
        self._count("errors")

    def stats(self) -> dict[str, int | bool | str]:
        with self._counter_lock:
            return dict(self._counters)

    def write(self, event: Event) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> bool:
        """Push buffered events out; True when nothing is left pending."""
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush and release resources.  Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# ------------------------------------------------------------------------ file


def _must_sync(event: Event) -> bool:
    # a deny (and an integrity failure) must survive a crash right after it
    return (event.kind == ACCESS and event.decision == "deny") or event.kind == INTEGRITY


class FileSink(Sink):
    """Append JSON lines or CEF lines to ``path`` (created 0600).

    Rotation: before a line that would take the file past ``max_bytes``, the file is
    renamed ``path.1`` (``path.1`` -> ``path.2`` ... up to ``path.<backups>``, the oldest
    is removed) and a new file is started.  ``max_bytes=0`` never rotates; ``backups=0``
    discards the old file.  A single line longer than ``max_bytes`` is still written,
    alone in its file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: BodyFormat = "json",
        max_bytes: int = 100 * 1024 * 1024,
        backups: int = 5,
        name: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(name or f"file:{self.path}")
        if max_bytes < 0 or backups < 0:
            raise ValueError("max_bytes and backups must be >= 0")
        self.format = format
        self._encode = body_encoder(format)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._size = 0
        self._count("rotations", 0)
        self._count("fsyncs", 0)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file may have been created wider
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def reopen(self) -> None:
        """Close and reopen ``path`` (after an external logrotate)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._open()

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._count("rotations")
        self._open()

    def write(self, event: Event) -> None:
        line = self._encode(event) + b"\n"
        if self._fd is None:
            self._open()
        if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        assert self._fd is not None
        view = memoryview(line)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(line)
        if _must_sync(event):
            os.fsync(self._fd)
            self._count("fsyncs")
        self._count("written")

    def flush(self, timeout: float | None = None) -> bool:
        if self._fd is not None:
            os.fsync(self._fd)
        return True

    def close(self, timeout: float | None = None) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------- syslog

_DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}


class SyslogSink(Sink):
    """RFC 5424 to a syslog server over UDP, TCP or TLS (RFC 5425 / 6587 framing).

    ``write`` never blocks on the network: it formats the message and appends it to a
    buffer of at most ``buffer_size`` messages that the sender thread drains.  State:

    * *connecting* (start-up): messages are buffered;
    * *up*: messages are buffered and sent;
    * *down* (a connect or send failed): messages are counted as ``dropped`` until a
      reconnect succeeds; reconnects back off from ``reconnect_min`` doubling to
      ``reconnect_max`` seconds.

    TLS: the server certificate is verified against ``ca_file`` (the system store when
    None) and its name against ``server_name`` (default ``host``); ``cert_file`` /
    ``key_file`` present a client certificate.  TLS 1.2 is the minimum.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        transport: Transport = "tls",
        format: BodyFormat = "json",
        facility: int = FACILITIES["local0"],
        app_name: str = "takakrypt",
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        buffer_size: int = 4096,
        connect_timeout: float = 5.0,
        send_timeout: float = 10.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        name: str | None = None,
    ) -> None:
        if transport not in _DEFAULT_PORTS:
            raise ValueError(f"unknown syslog transport {transport!r} (udp, tcp or tls)")
        self.host = host
        self.port = port or _DEFAULT_PORTS[transport]
        self.transport = transport
        super().__init__(name or f"syslog:{transport}://{host}:{self.port}")
        self.format = format
        body_encoder(format)  # validates format
        self.facility = facility
        self.app_name = app_name
        self.server_name = server_name or host
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._procid = os.getpid()
        self._ssl: ssl.SSLContext | None = None
        if transport == "tls":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file)
            self._ssl = ctx

        self._buf: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._inflight = 0
        self._down = False
        self._connected = False
        self._ever_connected = False
        self._outage = False
        self._backoff = reconnect_min
        self._retry_at = 0.0
        self._connected_at = 0.0
        self._stopping = False
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._count("reconnects", 0)
        self._thread = threading.Thread(
            target=self._run, name=f"takakrypt-audit-{self.name}", daemon=True
        )
        self._thread.start()

    # -- called from the logger's writer thread

    def format_message(self, event: Event) -> bytes:
        msg = to_syslog(
            event, body=self.format, facility=self.facility, app_name=self.app_name,
            procid=self._procid,
        )
        if self.transport == "udp":
            return msg
        return b"%d %s" % (len(msg), msg)

    def write(self, event: Event) -> None:
        msg = self.format_message(event)
        with self._cond:
            if self._stopping or self._down or len(self._buf) >= self.buffer_size:
                self._count("dropped")
                return
            self._buf.append(msg)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    def stats(self) -> dict[str, int | bool | str]:
        s = super().stats()
        with self._cond:
            s["pending"] = len(self._buf) + self._inflight
            s["connected"] = self._connected
        return s

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout: float) -> bool:
        """Block until the sink is connected (tests, start-up checks)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout)

    def wait_down(self, timeout: float) -> bool:
        """Block until the sink has noticed an outage (tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._down, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._buf and not self._inflight) or self._down, timeout
            ) and not self._buf and not self._inflight

    def close(self, timeout: float | None = 5.0) -> None:
        if self._thread.is_alive():
            self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._wake()
        self._thread.join(timeout)
        with self._cond:
            lost = len(self._buf)
            self._buf.clear()
        if lost:
            self._count("dropped", lost)
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- sender thread

    def _connect(self) -> socket.socket:
        if self.transport == "udp":
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.connect((self.host, self.port))
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.server_name)
            sock.settimeout(self.send_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _set_state(self, *, connected: bool, down: bool) -> None:
        with self._cond:
            self._connected = connected
            self._down = down
            self._cond.notify_all()

    def _disconnect(self, graceful: bool = False) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            try:
                if graceful and isinstance(sock, ssl.SSLSocket):
                    sock.settimeout(1.0)
                    sock.unwrap()  # close_notify, so the server sees a clean end
            except (OSError, ValueError):
                pass
            try:
                sock.close()
            except OSError:
                pass

    def _peer_gone(self) -> bool:
        """The socket is readable: a syslog server never talks, so it closed or reset
        (or, for TLS, sent a post-handshake message such as a session ticket)."""
        sock = self._sock
        assert sock is not None
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except ConnectionRefusedError:
            # UDP: ICMP port unreachable for an earlier datagram; nothing to reconnect
            self._count("errors")
            return self.transport != "udp"
        except OSError:
            return True
        finally:
            if self._sock is not None:
                sock.settimeout(self.send_timeout)
        return data == b""

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _lost(self, what: str, e: object = None) -> None:
        """The connection failed or the peer went away: go down, schedule a retry."""
        self._disconnect()
        self._count("errors")
        with self._cond:
            self._inflight = 0
            self._connected = False
            self._down = True
            self._cond.notify_all()
        now = time.monotonic()
        if now - self._connected_at >= self.reconnect_max:
            self._backoff = self.reconnect_min  # it was a healthy connection
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max)
        # one warning per outage, not one per retry
        level = logging.WARNING if not self._outage else logging.DEBUG
        self._outage = True
        log.log(level, "audit sink %s: %s%s; events are dropped until it is back",
                self.name, what, f": {e}" if e else "")

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping and (not self._buf or self._sock is None):
                    break
            if self._sock is None:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._stopping, max(0.0, self._retry_at - time.monotonic()))
                    if self._stopping:
                        continue
                try:
                    self._sock = self._connect()
                except OSError as e:
                    with self._cond:
                        lost = len(self._buf)
                        self._buf.clear()
                    if lost:
                        self._count("dropped", lost)
                    self._lost("connect failed", e)
                    continue
                if self._ever_connected:
                    self._count("reconnects")
                if self._outage:
                    log.info("audit sink %s: connected again", self.name)
                self._ever_connected = True
                self._outage = False
                self._connected_at = time.monotonic()
                self._set_state(connected=True, down=False)

            with self._cond:
                batch = list(self._buf)
                self._buf.clear()
                self._inflight = len(batch)
            if batch:
                self._send_batch(batch)
                continue
            try:
                r, _, _ = select.select([self._sock, self._wake_r], [], [])
            except (OSError, ValueError):
                r = [self._sock]
            if self._wake_r in r:
                self._drain_wake()
            if self._sock in r and self._peer_gone():
                self._lost("connection closed by the server")
        self._disconnect(graceful=True)
        self._set_state(connected=False, down=self._down)

    def _sent_one(self) -> None:
        with self._cond:
            self._inflight -= 1
            if not self._inflight:
                self._cond.notify_all()

    def _send_batch(self, batch: list[bytes]) -> None:
        sock = self._sock
        assert sock is not None
        for i, msg in enumerate(batch):
            try:
                if self.transport == "udp":
                    sock.send(msg)
                else:
                    sock.sendall(msg)
            except ConnectionRefusedError as e:
                if self.transport != "udp":
                    self._send_failed(e, len(batch) - i)
                    return
                # UDP: an earlier datagram hit a closed port (ICMP); this one is lost
                # but the socket stays usable
                self._count("errors")
                self._count("dropped")
                self._sent_one()
                continue
            except OSError as e:
                self._send_failed(e, len(batch) - i)
                return
            self._count("written")
            self._sent_one()

    def _send_failed(self, e: OSError, lost: int) -> None:
        self._count("dropped", lost)
        self._lost("send failed", e)
