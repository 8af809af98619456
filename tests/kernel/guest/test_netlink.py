"""The generic-netlink family of takakryptfs against a hostile or clumsy sender: the
errors of the contract (kernel/netlink.c, docs/protocol.md "Transports"), from a
privileged and an unprivileged process, and random mutations that must never oops
the kernel (the host scans the guest's kernel log after the run)."""

from __future__ import annotations

import errno
import json
import os
import random
import struct

import pytest

import genl_raw as R
from taka_kernel import ask, family, header, status
from takakrypt import protocol as P

EINVAL, EPERM, ENOENT, ESRCH = errno.EINVAL, errno.EPERM, errno.ENOENT, errno.ESRCH
NOBODY = 65534


def _cfg(entries, gen=1, version=2) -> bytes:
    return P.encode(P.request(P.ConfigUpdateRequest(tuple(entries), generation=gen), 77,
                              version=version))


def _health() -> bytes:
    return P.encode(P.request(P.HealthCheckRequest(), 5))


def _patch(b: bytes, off: int, value: int) -> bytes:
    return b[:off] + struct.pack("<I", value) + b[off + 4:]


def _hdr_cases() -> dict[str, bytes]:
    good = _health()
    return {
        "truncated header (31 bytes)": good[:31],
        "bad magic": header(magic=0x41414141),
        "version 0": header(version=0),
        "version 3": header(version=3),
        "unknown operation": header(op=99),
        "status set in a request": header(status=1),
        "payload_size larger than sent": header(payload_size=8),
        "payload_size smaller than sent": header(payload_size=0) + b"\0" * 4,
        "unknown status in a response": header(op=0 | P.RESPONSE_FLAG, status=99),
        "health check with a payload": header(payload_size=4) + b"\0" * 4,
        "config update: count says 1, no entry": struct.pack(
            "<IIIIIIQIII", P.MAGIC, 2, 5, 1, 12, 0, 0, 1, 0, 1),
        "config update: duplicate ids": _cfg([P.GuardPointEntry(True, "a", "/a", "p", id=1),
                                              P.GuardPointEntry(True, "b", "/b", "p", id=2)])
        .replace(struct.pack("<I", 2) + b"b", struct.pack("<I", 1) + b"b"),
        "config update: enabled 3": _patch(_cfg([P.GuardPointEntry(True, "a", "/a", "p", id=1)]),
                                           P.HEADER_SIZE + 12, 3),   # the entry's `enabled`
        "config update: duplicate ids, one closed": _cfg([
            P.GuardPointEntry(P.GP_CLOSED, "a", "/a", "p", id=1),
            P.GuardPointEntry(True, "b", "/b", "p", id=2)])
        .replace(struct.pack("<I", 2) + b"b", struct.pack("<I", 1) + b"b"),
        "config update: NUL in a name": _cfg([P.GuardPointEntry(True, "a", "/a", "p", id=1)])
        .replace(b"/a", b"/\0"),
    }


@pytest.fixture
def g():
    with R.Genl() as s:
        yield s


def test_family_resolves(g):
    assert family(g) > 0


def test_health_and_status_answered(g):
    fid = family(g)
    err, answers = ask(g, fid, P.HealthCheckRequest(), seq=31)
    assert err == 0 and len(answers) == 1
    a = answers[0]
    assert a.operation == P.Operation.HEALTH_CHECK and a.is_response and a.sequence == 31
    st = status(g, fid)
    assert st.enforcer == P.Enforcer.KERNEL


def test_operation_not_served_gets_a_taka_error(g):
    fid = family(g)
    err, answers = ask(g, fid, P.AuditEventRequest(kind=P.AuditKind.ACCESS))
    assert err == 0 and len(answers) == 1
    assert answers[0].is_response and answers[0].status == P.Status.INVALID


@pytest.mark.parametrize("case", [
    "no attribute", "unknown attribute only", "ATTR_MSG of 4 bytes", "ATTR_MSG of 0 bytes",
    "ATTR_MSG of 8193 bytes", "ATTR_MSG of 16 KiB", "nla_len past the end",
    "nla_len below the attribute header"])
def test_bad_attributes_einval(g, case):
    fid = family(g)
    good = _health()
    attrs = {
        "no attribute": b"",
        "unknown attribute only": R.nlattr(2, good),
        "ATTR_MSG of 4 bytes": R.nlattr(R.ATTR_MSG, good[:4]),
        "ATTR_MSG of 0 bytes": R.nlattr(R.ATTR_MSG, b""),
        "ATTR_MSG of 8193 bytes": R.nlattr(R.ATTR_MSG, good + b"\0" * (8193 - len(good))),
        "ATTR_MSG of 16 KiB": R.nlattr(R.ATTR_MSG, good + b"\0" * (16384 - len(good))),
        "nla_len past the end": R.nlattr(R.ATTR_MSG, good, length=len(good) + 64),
        "nla_len below the attribute header": R.nlattr(R.ATTR_MSG, good, length=2),
    }[case]
    err, answers = g.call(fid, R.CMD_MSG, attrs)
    assert (err, answers) == (EINVAL, []), f"{case}: {os.strerror(err) if err else 'ok'}"


@pytest.mark.parametrize("case", list(_hdr_cases()))
def test_invalid_taka_messages_einval(g, case):
    fid = family(g)
    err, answers = g.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, _hdr_cases()[case]))
    assert (err, answers) == (EINVAL, []), f"{case}: {os.strerror(err) if err else 'ok'}"


def test_unknown_command(g):
    fid = family(g)
    for cmd in (0, 3, 200):
        err, _ = g.call(fid, cmd, R.nlattr(R.ATTR_MSG, _health()))
        assert err == errno.EOPNOTSUPP, (cmd, err)


def test_response_for_unknown_sequence(g):
    fid = family(g)
    resp = P.encode(P.reply(P.request(P.KeyRequest(key_id="k", guard_point_id=1), 0xDEAD),
                            P.KeyResponse(key_id="k", key_version=1, key=b"\x11" * 32)))
    # from a port that is not the registered agent
    err, _ = g.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, resp))
    assert err == ESRCH, os.strerror(err)
    # from the registered agent: nobody waits for it
    with R.Genl() as agent:
        assert agent.call(fid, R.CMD_REGISTER)[0] == 0
        assert status(g, fid).agent_connected == 1
        err, _ = agent.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, resp))
        assert err == ENOENT, os.strerror(err)
    # its socket closed: the kernel forgot it
    assert status(g, fid).agent_connected == 0


def test_latest_registration_wins(g):
    fid = family(g)
    with R.Genl() as a, R.Genl() as b:
        assert a.call(fid, R.CMD_REGISTER)[0] == 0
        assert b.call(fid, R.CMD_REGISTER)[0] == 0
        resp = P.encode(P.reply(P.request(P.HealthCheckRequest(), 9),
                                P.HealthCheckResponse(0, 0, 0, 0)))
        # a is no longer the agent: its responses are refused as a stranger's
        assert a.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, resp))[0] == ESRCH
        assert b.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG, resp))[0] == ENOENT
        a.close()
        assert status(g, fid).agent_connected == 1   # a leaving does not unregister b
    assert status(g, fid).agent_connected == 0


def _unprivileged_errnos(fid: int) -> dict[str, int]:
    """Run the sends in a child that dropped to nobody (no capabilities)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: dict = {}
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with R.Genl() as s:
                out["family"] = s.family()
                good = R.nlattr(R.ATTR_MSG, _health())
                out["register"] = s.call(fid, R.CMD_REGISTER)[0]
                out["msg"] = s.call(fid, R.CMD_MSG, good)[0]
                out["msg no attribute"] = s.call(fid, R.CMD_MSG)[0]
                out["msg bad header"] = s.call(fid, R.CMD_MSG,
                                               R.nlattr(R.ATTR_MSG, header(magic=1)))[0]
                out["msg 16 KiB"] = s.call(fid, R.CMD_MSG, R.nlattr(R.ATTR_MSG,
                                                                   b"\0" * 16384))[0]
                rng = random.Random(7)
                out["random"] = sorted({s.call(fid, rng.choice((1, 2)), R.nlattr(
                    rng.randrange(4), rng.randbytes(rng.randrange(64))))[0] for _ in range(200)})
        except BaseException as e:  # noqa: BLE001 - report it to the parent
            out["error"] = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_unprivileged_sender_gets_eperm(g):
    fid = family(g)
    out = _unprivileged_errnos(fid)
    assert "error" not in out, out
    assert out["family"] == fid   # resolving the family is open to all
    for k in ("register", "msg", "msg no attribute", "msg bad header", "msg 16 KiB"):
        assert out[k] == EPERM, (k, out[k])
    assert out["random"] == [EPERM], out["random"]
    assert status(g, fid).agent_connected == 0   # the refused registration did nothing


def _mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randrange(1, 4)):
        k = rng.randrange(5)
        if k == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k == 1:
            b = b[:rng.randrange(len(b) + 1)]
        elif k == 2:
            b += rng.randbytes(rng.randrange(1, 64))
        elif k == 3 and len(b) >= 24:
            off = rng.choice((4, 8, 12, 16, 20, 32, 36, 40))
            if off + 4 <= len(b):
                b[off:off + 4] = struct.pack("<I", rng.choice(
                    (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(b), rng.getrandbits(32))))
        elif k == 4 and len(b) >= 12:
            b[8:12] = struct.pack("<I", rng.choice(list(range(8))) | rng.choice((0, P.RESPONSE_FLAG)))
    return bytes(b)


def test_fuzz_privileged_sender(g):
    """Mutated TAKA messages and netlink frames: only the contract's answers, and the
    family still serves afterwards (the kernel log is checked by the host)."""
    fid = family(g)
    rng = random.Random(18)
    seeds = [_health(), P.encode(P.request(P.StatusRequest(), 6)),
             _cfg([P.GuardPointEntry(True, "a", "/a", "p", id=1),
                   P.GuardPointEntry(False, "b", "/b", "q", id=2)]),
             _cfg([P.GuardPointEntry(True, "a", "/a", "p")], gen=0, version=1),
             P.encode(P.reply(P.request(P.KeyRequest(key_id="k", guard_point_id=1), 3),
                              P.KeyResponse(key_id="k", key_version=1, key=b"\1" * 32)))]
    seen: dict[int, int] = {}
    with R.Genl() as agent:   # half the time the sender is the registered agent
        assert agent.call(fid, R.CMD_REGISTER)[0] == 0
        for i in range(1500):
            s = agent if i % 2 else g
            taka = _mutate(rng, rng.choice(seeds))
            if rng.random() < 0.1:  # the attribute itself goes wrong too
                attr = R.nlattr(rng.choice((0, 1, 1, 2, 0x8001)), taka,
                                length=rng.choice((None, 0, 3, len(taka) + 4, 0xFFFF)))
            else:
                attr = R.nlattr(R.ATTR_MSG, taka)
            err, answers = s.call(fid, rng.choice((1, 1, 1, 2)), attr)
            seen[err] = seen.get(err, 0) + 1
            assert err in (0, EINVAL, ENOENT, ESRCH), (i, taka.hex(), os.strerror(err))
            for a in answers:
                m = P.decode(a)   # whatever the kernel answers is a valid TAKA response
                assert m.is_response and m.sequence == struct.unpack_from("<I", taka, 12)[0]
        # garbage datagrams, acked or not: nothing to check but survival
        for _ in range(300):
            try:
                agent.send_raw(rng.randbytes(rng.randrange(0, 200)))
            except OSError:
                pass   # refused at send (e.g. ENODATA for a frame too short): fine
    st = status(g, fid)
    assert st.enforcer == P.Enforcer.KERNEL and st.agent_connected == 0
    print("fuzz errnos:", {os.strerror(k) if k else "ok": v for k, v in sorted(seen.items())})
    assert seen.get(0) and seen.get(EINVAL)   # both kinds were exercised
