"""A synchronous client of the agent's SOCK_SEQPACKET transport, for enforcement points
in other processes, tools and tests.  Fail closed: no answer within the timeout (5 s by
default, as the protocol says) or no agent at all is a deny."""

from __future__ import annotations

import os
import socket
import time

from .. import protocol as P
from ..errors import AgentUnavailable, ProtocolError


class AgentClient:
    def __init__(self, path: str, *, timeout: float = P.DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.seq = P.Sequencer()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise AgentUnavailable(f"no agent at {path}: {e.strerror}") from None

    def call(self, payload: P.Payload) -> P.Message:
        """Send a request; return the matching response, or a synthesized TIMEOUT."""
        req = P.request(payload, self.seq.next())
        self.sock.sendall(P.encode(req))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return P.error_reply(req, P.Status.TIMEOUT, "agent did not answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(P.MAX_MSG_SIZE + 1)
            except socket.timeout:
                continue
            if not data:
                return P.error_reply(req, P.Status.NETWORK, "agent closed the connection")
            try:
                rsp = P.decode(data)
            except ProtocolError:
                continue  # garbage is dropped, never acted on
            if rsp.sequence == req.sequence and rsp.operation == req.operation:
                return rsp

    def policy_check(self, *, path: str, action: str, uid: int | None = None,
                     gid: int | None = None, pid: int | None = None, tid: int = 0,
                     process: str = "", start_time: int = 0, exe_dev: int = 0,
                     exe_ino: int = 0, target: str = "") -> P.Message:
        return self.call(P.PolicyCheckRequest(
            pid=os.getpid() if pid is None else pid, uid=os.getuid() if uid is None else uid,
            gid=os.getgid() if gid is None else gid, action=P.Action.from_policy_name(action),
            path=path, process=process, cwd="", tid=tid, start_time=start_time,
            exe_dev=exe_dev, exe_ino=exe_ino, target=target))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def permitted(rsp: P.Message) -> bool:
    """Fail-closed reading of a POLICY_CHECK answer."""
    return bool(rsp.ok and isinstance(rsp.payload, P.PolicyCheckResponse)
                and rsp.payload.effects & P.Effect.PERMIT)
