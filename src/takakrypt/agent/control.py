"""The control socket: a Unix stream socket (mode 0600, root or the agent's own uid
only) speaking one JSON object per line in each direction.

Request:  ``{"cmd": "status"}``  (plus command arguments)
Response: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": KIND, "message": ...}``

Commands: status, reload, guard_list, keys_list, policy_check, audit_stats, health.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import Error

MAX_LINE = 1 << 20
Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.rejected = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is created 0600: no window with wider access
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path,
                                                          limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            uid = peer_uid(sock)
            if uid not in (0, os.geteuid()):
                self.rejected += 1
                await self._send(writer, {"ok": False, "error": "permission",
                                          "message": "control socket is for root only"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._send(writer, {"ok": False, "error": "usage",
                                              "message": "request too long"})
                    return
                if not line:
                    return
                await self._send(writer, await self._dispatch(line))
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected an object with a 'cmd' string")
        except ValueError as e:
            return {"ok": False, "error": "usage", "message": f"bad request: {e}"}
        try:
            result = self.handler(req)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return {"ok": True, "result": result}
        except Error as e:
            return {"ok": False, "error": e.kind, "message": str(e), "exit_code": e.exit_code}
        except Exception as e:  # noqa: BLE001 - report, never kill the server
            return {"ok": False, "error": "internal", "message": f"{type(e).__name__}: {e}"}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj, default=str).encode() + b"\n")
        await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def call(path: str, cmd: str, /, *, timeout: float = 30.0, **args: Any) -> Any:
    """Client side (the CLI): send one command, return its result or raise."""
    from ..errors import AgentUnavailable, error_from_kind

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AgentUnavailable(f"takakryptd is not running (no control socket at {path}: "
                                   f"{e.strerror})") from None
        except PermissionError:
            raise AgentUnavailable(f"permission denied on {path} (the control socket is "
                                   "for root)") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise AgentUnavailable("takakryptd closed the control connection")
            buf += chunk
    except socket.timeout:
        raise AgentUnavailable(f"takakryptd did not answer within {timeout:.0f} s") from None
    finally:
        s.close()
    resp = json.loads(buf)
    if not resp.get("ok"):
        raise error_from_kind(resp.get("error", "error"), resp.get("message", "failed"))
    return resp.get("result")
