"""Generic netlink by hand (struct only), for the kernel suite's probes and fuzzing.

Independent of pyroute2 on purpose: the host tests compare the agent's frames
(takakrypt.agent.genl, built with pyroute2's classes) with these, and the fuzz tests
need to build frames that no well-behaved library would (wrong lengths, wrong types).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
CMD_MSG, CMD_REGISTER, ATTR_MSG = 1, 2, 1
NLMSGHDR = struct.Struct("=IHHII")
GENLHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def nlattr(atype: int, value: bytes, *, length: int | None = None) -> bytes:
    """An attribute; ``length`` overrides the header's nla_len (to lie about it)."""
    n = NLATTR.size + len(value) if length is None else length
    return pad4(NLATTR.pack(n, atype) + value)


def frame(family: int, cmd: int, attrs: bytes = b"", *, seq: int = 1, port: int = 0,
          flags: int = NLM_F_REQUEST | NLM_F_ACK, version: int = 1,
          length: int | None = None) -> bytes:
    body = GENLHDR.pack(cmd, version, 0) + attrs
    n = NLMSGHDR.size + len(body) if length is None else length
    return NLMSGHDR.pack(n, family, flags, seq, port) + body


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, seq, port, payload after nlmsghdr) for each message of a datagram."""
    out, off = [], 0
    while off + NLMSGHDR.size <= len(data):
        n, t, _f, seq, port = NLMSGHDR.unpack_from(data, off)
        if n < NLMSGHDR.size:
            break
        out.append((t, seq, port, data[off + NLMSGHDR.size:off + n]))
        off += (n + 3) & ~3
    return out


def attrs(payload: bytes) -> dict[int, bytes]:
    """Attributes after a genlmsghdr."""
    out, off = {}, GENLHDR.size
    while off + NLATTR.size <= len(payload):
        n, t = NLATTR.unpack_from(payload, off)
        if n < NLATTR.size:
            break
        out[t & 0x3FFF] = payload[off + NLATTR.size:off + n]
        off += (n + 3) & ~3
    return out


class Genl:
    """A blocking NETLINK_GENERIC socket; ``call`` sends one frame and returns what came
    back until the ack: (errno of the ack, 0 = success; TAKA messages received)."""

    def __init__(self, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(timeout)
        self.port = self.sock.getsockname()[0]
        self.seq = 100

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Genl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def family(self, name: str = "takakrypt") -> int | None:
        name_attr = nlattr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
        err, replies = self._exchange(frame(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, name_attr,
                                            seq=self._next(), flags=NLM_F_REQUEST | NLM_F_ACK),
                                      GENL_ID_CTRL)
        if err == errno.ENOENT:
            return None
        if err:
            raise OSError(err, os.strerror(err))
        fid = attrs(replies[0])[CTRL_ATTR_FAMILY_ID]
        return struct.unpack("=H", fid[:2])[0]

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def call(self, family: int, cmd: int, attr_bytes: bytes = b"", **kw) -> tuple[int, list[bytes]]:
        """Errno of the ack and the ATTR_MSG payloads of the family's messages before it."""
        kw.setdefault("seq", self._next())
        err, replies = self._exchange(frame(family, cmd, attr_bytes, port=self.port, **kw),
                                      family)
        return err, [attrs(p).get(ATTR_MSG, b"") for p in replies]

    def call_raw(self, data: bytes, family: int) -> tuple[int, list[bytes]]:
        err, replies = self._exchange(data, family)
        return err, [attrs(p).get(ATTR_MSG, b"") for p in replies]

    def _exchange(self, data: bytes, family: int) -> tuple[int, list[bytes]]:
        seq = NLMSGHDR.unpack_from(data, 0)[3] if len(data) >= NLMSGHDR.size else 0
        self.send_raw(data)
        got: list[bytes] = []
        while True:
            for t, s, _port, payload in messages(self.sock.recv(65536)):
                if t == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload, 0)[0]
                    acked = NLMSGHDR.unpack_from(payload, 4)[3] if len(payload) >= 20 else s
                    if acked == seq:
                        return -code, got
                elif t == family and s == seq:
                    got.append(payload)

    def recv_msgs(self, family: int) -> list[tuple[int, bytes]]:
        """Whatever arrives next: (port, ATTR_MSG) of the family's messages."""
        return [(port, attrs(p).get(ATTR_MSG, b"")) for t, _s, port, p in
                messages(self.sock.recv(65536)) if t == family]
