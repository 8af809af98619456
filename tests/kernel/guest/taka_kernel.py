"""Talking TAKA to the kernel module from a test (not the agent): the family id, a
request and its answer, the module's STATUS."""

from __future__ import annotations

import struct

import genl_raw as R
from takakrypt import protocol as P


def family(g: R.Genl) -> int:
    fid = g.family()
    assert fid is not None, "generic netlink family 'takakrypt' not registered"
    return fid


def ask(g: R.Genl, fid: int, payload: P.Payload, seq: int = 4242) -> tuple[int, list[P.Message]]:
    """Send a TAKA request; (netlink errno, decoded TAKA answers)."""
    taka = P.encode(P.request(payload, seq))
    err, msgs = g.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, taka))
    return err, [P.decode(m) for m in msgs]


def status(g: R.Genl, fid: int) -> P.StatusResponse:
    err, answers = ask(g, fid, P.StatusRequest())
    assert err == 0 and len(answers) == 1, (err, answers)
    a = answers[0]
    assert a.is_response and a.status == P.Status.SUCCESS
    return a.payload


def header(magic=P.MAGIC, version=2, op=0, seq=1, payload_size=0, status=0, ts=0) -> bytes:
    return struct.pack("<IIIIIIQ", magic, version, op, seq, payload_size, status, ts)
