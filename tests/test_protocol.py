"""TAKA protocol: round trips, validation, fuzzing, sequencing and pending requests."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from takakrypt import protocol as P
from takakrypt.errors import EXIT_CODES, Error, ProtocolError
from takakrypt.protocol.messages import BYTES, ENTRIES, PATH, Len

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
S32 = st.integers(-(2**31), 2**31 - 1)
PATHS = st.binary(max_size=24).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
TEXTS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=12)
BLOBS = st.binary(max_size=48)
FMT = {"I": U32, "Q": U64, "i": S32}

ALL_PAYLOADS = [*P.PAYLOADS.values(), P.ErrorReply]


def _entry(version: int, id_: int = 0) -> st.SearchStrategy[P.GuardPointEntry]:
    extra = {"id": st.just(id_)} if version >= 2 else {}
    return st.builds(P.GuardPointEntry, enabled=st.sampled_from([0, 1, 2]), name=TEXTS, path=PATHS,
                     policy=TEXTS, **extra)


@st.composite
def _entries(draw: st.DrawFn, version: int) -> tuple[P.GuardPointEntry, ...]:
    n = draw(st.integers(0, 4))
    ids = draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    return tuple(draw(_entry(version, ids[i] if version >= 2 else 0)) for i in range(n))


def payloads(cls: type[P.Payload], version: int) -> st.SearchStrategy[P.Payload]:
    """Valid payloads of ``cls`` for ``version``, derived from its layout."""
    lay = cls.LAYOUT
    kw: dict[str, st.SearchStrategy] = {}
    for f in lay.fixed_for[version]:
        if isinstance(f.source, str):
            conv_name = getattr(f.conv, "__name__", "")
            if conv_name == "_bool":
                kw[f.source] = st.booleans()
            elif conv_name == "_effects":
                kw[f.source] = st.integers(0, 0x7F).map(P.Effect)
            elif f.conv is not None:
                enum = {"kind": P.AuditKind, "action": P.Action, "enforcer": P.Enforcer}[f.source]
                kw[f.source] = st.sampled_from(list(enum))
            else:
                kw[f.source] = FMT[f.fmt]
    for v in lay.var_for[version]:
        kw[v.attr] = {PATH: PATHS, BYTES: BLOBS, ENTRIES: _entries(version)}.get(v.kind, TEXTS)
    if cls is P.PolicyCheckRequest:
        return _st_policy_request(kw, version)
    if cls is P.PolicyCheckResponse:
        return _st_policy_response(version)
    if cls is P.EncryptResponse:
        kw["iv_len"] = st.integers(0, 4)
        kw["tag_len"] = st.integers(0, 4)
        kw["encrypted"] = st.binary(min_size=8, max_size=48)
    if cls is P.AuditEventRequest:
        kw["count"] = st.integers(1, 2**32 - 1)
    return st.builds(cls, **kw)


@st.composite
def _st_policy_request(draw: st.DrawFn, kw: dict, version: int) -> P.PolicyCheckRequest:
    action = draw(st.sampled_from([a for a in P.Action if a != P.Action.NONE]))
    vals = {k: draw(s) for k, s in kw.items() if k not in ("action", "target")}
    if version >= 2:
        needs = action in (P.Action.RENAME, P.Action.LINK)
        vals["target"] = draw(PATHS.filter(bool)) if needs else ""
    return P.PolicyCheckRequest(action=action, **vals)


@st.composite
def _st_policy_response(draw: st.DrawFn, version: int) -> P.PolicyCheckResponse:
    if version < 2:
        allow = draw(st.booleans())
        return P.PolicyCheckResponse(allow, allow and draw(st.booleans()), draw(st.booleans()),
                                     draw(TEXTS), draw(TEXTS), draw(TEXTS))
    e = P.Effect.PERMIT if draw(st.booleans()) else P.Effect.DENY
    if e & P.Effect.PERMIT:
        e |= draw(st.sampled_from([P.Effect(0), P.Effect.APPLY_KEY, P.Effect.WOULD_DENY,
                                   P.Effect.APPLY_KEY | P.Effect.WOULD_DENY]))
    if draw(st.booleans()):
        e |= P.Effect.AUDIT
    key = e & P.Effect.APPLY_KEY
    return P.PolicyCheckResponse.from_effects(
        e, key_id=draw(TEXTS.filter(bool)) if key else draw(TEXTS),
        key_version=draw(st.integers(1, 2**32 - 1) if key else U32), policy=draw(TEXTS),
        reason=draw(TEXTS), rule_index=draw(S32), cache_ttl_ms=draw(U32))


@st.composite
def messages(draw: st.DrawFn) -> P.Message:
    version = draw(st.sampled_from([1, 2]))
    op = draw(st.sampled_from(list(P.Operation)))
    kind = draw(st.sampled_from(["request", "response", "error"]))
    seq, ts = draw(U32), draw(U64)
    req = P.request(draw(payloads(P.PAYLOADS[(op, False)], version)), seq, timestamp=ts,
                    version=version)
    if kind == "request":
        return req
    if kind == "response":
        return P.reply(req, draw(payloads(P.PAYLOADS[(op, True)], version)), timestamp=ts)
    status = draw(st.sampled_from([s for s in P.Status if s != P.Status.SUCCESS]))
    return P.error_reply(req, status, draw(TEXTS), timestamp=ts)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        m = P.decode(data)
    except ProtocolError as e:
        assert str(e)
        return
    assert P.encode(m) == data


# ---------------------------------------------------------------------------------------
# round trips and fuzzing


@FUZZ
@given(messages())
def test_round_trip(m: P.Message) -> None:
    b = P.encode(m)
    assert len(b) <= P.MAX_MSG_SIZE
    assert P.decode(b) == m
    assert P.encode(P.decode(b)) == b


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@FUZZ
@given(st.binary(min_size=0, max_size=200))
def test_random_payload_behind_valid_header(tail: bytes) -> None:
    # gets past the header checks so the payload parsers are exercised
    for op in P.Operation:
        for resp in (False, True):
            h = P.Header(op, 1, len(tail), response=resp)
            _decode_or_protocol_error(h.pack() + tail)


@FUZZ
@given(messages(), st.data())
def test_mutations(m: P.Message, data: st.DataObject) -> None:
    b = bytearray(P.encode(m))
    how = data.draw(st.sampled_from(["flip", "u32", "truncate", "extend", "insert", "delete"]))
    i = data.draw(st.integers(0, len(b) - 1))
    if how == "flip":
        b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "u32":
        j = data.draw(st.integers(0, (len(b) - 4) // 4)) * 4
        b[j:j + 4] = struct.pack("<I", data.draw(st.sampled_from(
            [0, 1, 2, 0xFFFFFFFF, 0x80000000, 8160, len(b)]) | U32))
    elif how == "truncate":
        del b[i:]
    elif how == "extend":
        b += data.draw(st.binary(min_size=1, max_size=16))
    elif how == "insert":
        b[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        del b[i]
    _decode_or_protocol_error(bytes(b))


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("version", [1, 2])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_payload_round_trips(cls: type[P.Payload], version: int,
                                   data: st.DataObject) -> None:
    p = data.draw(payloads(cls, version))
    if cls is P.ErrorReply:
        m = P.error_reply(P.Header(P.Operation.KEY_REQUEST, 3, version=version),
                          P.Status.NOT_FOUND, p.reason)
    elif cls.RESPONSE:
        m = P.reply(P.Header(cls.OPERATION, 3, version=version), p)
    else:
        m = P.request(p, 3, version=version)
    assert P.decode(P.encode(m)) == m


# ---------------------------------------------------------------------------------------
# header


def _policy_request(**kw: object) -> P.PolicyCheckRequest:
    base = dict(pid=100, uid=1000, gid=1000, action=P.Action.READ, path="/data/pg/f",
                process="/usr/bin/postgres", cwd="/")
    base.update(kw)
    return P.PolicyCheckRequest(**base)  # type: ignore[arg-type]


def test_header_layout() -> None:
    h = P.Header(P.Operation.POLICY_CHECK, 0xDEADBEEF, 12, P.Status.CRYPTO, 1 << 60, 2, True)
    raw = h.pack()
    assert raw == struct.pack("<IIIIIIQ", 0x54414B41, 2, 0x80000001, 0xDEADBEEF, 12, 4,
                              1 << 60)
    assert raw[:4] == b"AKAT"
    assert P.Header.unpack(raw + b"trailing") == h


@pytest.mark.parametrize("field,value,match", [
    (0, 0x54414B42, "bad magic"),
    (1, 0, "version"),
    (1, 3, "version"),
    (2, 8, "unknown operation"),
    (2, 0x00010001, "unknown operation"),
    (5, 9, "unknown status"),
    (5, 1, "request carries status"),
    (4, 8161, "payload_size"),
])
def test_header_rejects(field: int, value: int, match: str) -> None:
    vals = [0x54414B41, 2, 1, 1, 0, 0, 0]
    vals[field] = value
    with pytest.raises(ProtocolError, match=match):
        P.decode(struct.pack("<IIIIIIQ", *vals))


def test_short_and_oversized() -> None:
    with pytest.raises(ProtocolError, match="shorter than the header"):
        P.decode(b"TAKA")
    with pytest.raises(ProtocolError, match="exceeds 8192"):
        P.decode(b"\0" * 8193)
    with pytest.raises(ProtocolError, match="cannot decode"):
        P.decode(42)  # type: ignore[arg-type]


def test_payload_size_must_match() -> None:
    b = P.encode(P.request(_policy_request(), 1))
    with pytest.raises(ProtocolError, match="bytes follow the header"):
        P.decode(b[:-1])
    with pytest.raises(ProtocolError, match="bytes follow the header"):
        P.decode(b + b"x")


def test_max_message_size_boundary() -> None:
    hdr = P.Header(P.Operation.DECRYPT, 1, response=True)
    room = P.MAX_PAYLOAD_SIZE - 8            # decrypt response fixed part is 8 bytes
    ok = P.reply(hdr, P.DecryptResponse(b"\xaa" * room))
    assert len(P.encode(ok)) == 8192
    with pytest.raises(ProtocolError, match="exceeds"):
        P.reply(hdr, P.DecryptResponse(b"\xaa" * (room + 1)))


# ---------------------------------------------------------------------------------------
# payload validation


def _with_payload(op: P.Operation, body: bytes, *, response: bool = False,
                  version: int = 2, status: int = 0) -> bytes:
    return struct.pack("<IIIIIIQ", P.MAGIC, version, op | (P.RESPONSE_FLAG * response), 7,
                       len(body), status, 0) + body


def test_seed_v1_policy_request_decodes() -> None:
    # exactly the seed's struct takakrypt_policy_request
    body = struct.pack("<7I", 42, 1000, 100, P.Action.WRITE, 4, 4, 1) + b"/a/bperl/"
    m = P.decode(_with_payload(P.Operation.POLICY_CHECK, body, version=1))
    assert m.payload == P.PolicyCheckRequest(42, 1000, 100, P.Action.WRITE, "/a/b", "perl",
                                             "/")
    assert m.header.version == 1
    assert P.encode(m) == _with_payload(P.Operation.POLICY_CHECK, body, version=1)


def test_v1_cannot_carry_extensions() -> None:
    with pytest.raises(ProtocolError, match="needs protocol version 2"):
        P.request(_policy_request(tid=7), 1, version=1)


def test_v1_error_reply_has_no_payload() -> None:
    m = P.error_reply(P.Header(P.Operation.ENCRYPT, 5, version=1), P.Status.CRYPTO, "why")
    assert m.header.payload_size == 0 and m.payload == P.ErrorReply("")
    assert len(P.encode(m)) == 32


def test_string_running_past_payload() -> None:
    body = struct.pack("<7I", 1, 2, 3, 1, 100, 0, 0) + b"/x" + bytes(36)
    with pytest.raises(ProtocolError, match="run past the end"):
        P.decode(_with_payload(P.Operation.POLICY_CHECK, body))


def test_trailing_bytes() -> None:
    body = struct.pack("<4I", 1, 2, 3, 4) + b"!"
    with pytest.raises(ProtocolError, match="trailing"):
        P.decode(_with_payload(P.Operation.HEALTH_CHECK, body, response=True))


def test_nul_and_utf8() -> None:
    with pytest.raises(ProtocolError, match="NUL"):
        P.encode(P.request(_policy_request(path="/a\0b"), 1))
    rsp = P.PolicyCheckResponse(False, False, False, "", "", "\ud800", P.Effect.DENY)
    with pytest.raises(ProtocolError, match="UTF-8"):
        P.reply(P.Header(P.Operation.POLICY_CHECK, 1), rsp)
    body = struct.pack("<6I", 0, 0, 0, 1, 0, 0) + b"\xff"
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        P.decode(_with_payload(P.Operation.POLICY_CHECK, body, response=True, version=1))


def test_paths_are_bytes_exact() -> None:
    raw_path = b"/data/\xff\xfe-latin1-\xe9"
    p = _policy_request(path=raw_path.decode("utf-8", "surrogateescape"))
    m = P.decode(P.encode(P.request(p, 1)))
    assert m.payload.path.encode("utf-8", "surrogateescape") == raw_path
    with pytest.raises(ProtocolError, match="canonical"):
        P.request(_policy_request(path="\udcc3\udca9"), 1)  # would decode as "é"


def test_policy_check_rules() -> None:
    with pytest.raises(ProtocolError, match="needs an action"):
        P.request(_policy_request(action=P.Action.NONE), 1)
    with pytest.raises(ProtocolError, match="unknown action"):
        P.request(_policy_request(action=99), 1)
    with pytest.raises(ProtocolError, match="target"):
        P.request(_policy_request(action=P.Action.RENAME), 1)
    with pytest.raises(ProtocolError, match="target"):
        P.request(_policy_request(target="/x"), 1)
    hdr = P.Header(P.Operation.POLICY_CHECK, 1)
    bad = [
        P.PolicyCheckResponse(True, False, False, "", "", "", P.Effect.PERMIT | P.Effect.DENY),
        P.PolicyCheckResponse(False, False, False, "", "", "", P.Effect(0)),
        P.PolicyCheckResponse(True, False, False, "", "", "", P.Effect.DENY),
        P.PolicyCheckResponse(False, True, False, "", "", "",
                              P.Effect.DENY | P.Effect.APPLY_KEY),
        P.PolicyCheckResponse.from_effects(P.Effect.PERMIT | P.Effect.APPLY_KEY),
        P.PolicyCheckResponse(True, False, False, "", "", "", 1 << 5),
    ]
    for rsp in bad:
        with pytest.raises(ProtocolError):
            P.reply(hdr, rsp)


def test_policy_response_effects_decode_strictly() -> None:
    base = P.reply(P.Header(P.Operation.POLICY_CHECK, 1), P.PolicyCheckResponse.from_effects(
        P.Effect.DENY | P.Effect.AUDIT, policy="pg", reason="no rule", cache_ttl_ms=500))
    b = bytearray(P.encode(base))
    assert P.decode(bytes(b)) == base
    b[32:36] = struct.pack("<I", 1)              # allow_access = 1 while effects says deny
    with pytest.raises(ProtocolError, match="disagree"):
        P.decode(bytes(b))


def test_decrypt_checksum() -> None:
    m = P.reply(P.Header(P.Operation.DECRYPT, 1), P.DecryptResponse(b"hello"))
    b = bytearray(P.encode(m))
    assert struct.unpack_from("<I", b, 36)[0] == zlib.crc32(b"hello")
    b[-1] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        P.decode(bytes(b))


def test_config_update() -> None:
    entries = (P.GuardPointEntry(True, "pg", "/data/pg", "pg-policy", id=1),
               P.GuardPointEntry(False, "logs", "/var/log/app", "logs", id=2))
    m = P.request(P.ConfigUpdateRequest(entries, generation=9), 3)
    b = P.encode(m)
    assert P.decode(b) == m
    count, total, gen = struct.unpack_from("<3I", b, 32)
    assert (count, total, gen) == (2, len(b) - 44, 9)
    bad = bytearray(b)
    bad[32:36] = struct.pack("<I", 3)
    with pytest.raises(ProtocolError, match="guard_point_count"):
        P.decode(bytes(bad))
    with pytest.raises(ProtocolError, match="unique"):
        P.request(P.ConfigUpdateRequest((entries[0], entries[0])), 1)
    with pytest.raises(ProtocolError, match="non-zero"):
        P.request(P.ConfigUpdateRequest((P.GuardPointEntry(True, "a", "/a", "p"),)), 1)
    v1 = P.request(P.ConfigUpdateRequest((P.GuardPointEntry(True, "a", "/a", "p"),)), 1,
                   version=1)
    assert len(P.encode(v1)) == 32 + 8 + 16 + 4


def test_encrypt_response_rule() -> None:
    with pytest.raises(ProtocolError, match="iv_len"):
        P.reply(P.Header(P.Operation.ENCRYPT, 1), P.EncryptResponse(b"x" * 20, 12, 16))


def test_key_response_repr_hides_key() -> None:
    k = P.KeyResponse("pg-key", 3, b"\x11" * 32)
    assert "11" not in repr(k) and "32 bytes" in repr(k)
    assert P.decode(P.encode(P.reply(P.Header(P.Operation.KEY_REQUEST, 1), k))).payload == k


def test_encode_rejects_inconsistent_messages() -> None:
    m = P.request(_policy_request(), 1)
    with pytest.raises(ProtocolError, match="payload_size"):
        P.encode(P.Message(P.Header(P.Operation.POLICY_CHECK, 1, 0), m.payload))
    with pytest.raises(ProtocolError, match="carries"):
        P.encode(P.Message(P.Header(P.Operation.HEALTH_CHECK, 1, m.header.payload_size),
                           m.payload))
    with pytest.raises(ProtocolError, match="out of range"):
        P.encode(P.request(_policy_request(pid=-1), 1))
    with pytest.raises(ProtocolError, match="out of range"):
        P.encode(P.request(_policy_request(), 2**32))
    with pytest.raises(ProtocolError):
        P.encode("not a message")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="error status"):
        P.error_reply(m, P.Status.SUCCESS)
    with pytest.raises(ProtocolError, match="does not answer"):
        P.reply(m, P.HealthCheckResponse(1, 2, 3, 4))


@pytest.mark.parametrize("key", list(P.PAYLOADS), ids=lambda k: f"{k[0].name}-{k[1]}")
def test_every_operation_both_directions(key: tuple[P.Operation, bool]) -> None:
    cls = P.PAYLOADS[key]
    assert cls.OPERATION is key[0] and cls.RESPONSE is key[1]
    assert P.payload_class(key[0], key[1]) is cls
    assert P.payload_class(key[0], True, P.Status.DENIED) is P.ErrorReply


def test_error_class() -> None:
    assert issubclass(ProtocolError, Error)
    assert ProtocolError.exit_code == 11 and ProtocolError.kind == "protocol"
    assert EXIT_CODES[11]


def test_action_names_match_policy_language() -> None:
    from takakrypt.config import ACTIONS
    assert [a.policy_name for a in P.Action if a != P.Action.NONE] == list(ACTIONS)
    assert P.Action.from_policy_name("setxattr") is P.Action.SETXATTR


def test_length_fields_named_after_their_data() -> None:
    for lay in P.LAYOUTS:
        for f in lay.fixed:
            if isinstance(f.source, Len) and f.source.attr != "entries":
                assert f.name in (f"{f.source.attr}_len", "encrypted_len", "data_len",
                                  "plaintext_len"), f.name


# ---------------------------------------------------------------------------------------
# sequencing and pending requests


def test_sequencer_wraps_and_skips_zero() -> None:
    s = P.Sequencer(0xFFFFFFFE)
    assert [next(s) for _ in range(4)] == [0xFFFFFFFE, 0xFFFFFFFF, 1, 2]
    assert P.Sequencer(0).next() == 1
    with pytest.raises(ValueError):
        P.Sequencer(2**32)


def _req(seq: int, op: P.Operation = P.Operation.HEALTH_CHECK) -> P.Message:
    payload = P.PAYLOADS[(op, False)]() if op in (P.Operation.HEALTH_CHECK,
                                                  P.Operation.STATUS_REQUEST) \
        else _policy_request()
    return P.request(payload, seq)


def test_pending_resolve_and_timeout() -> None:
    async def main() -> None:
        pend = P.PendingRequests(timeout=0.05)
        r1, r2 = _req(1), _req(2)
        f1, f2 = pend.add(r1), pend.add(r2)
        assert len(pend) == 2 and 1 in pend
        ans = P.reply(r1, P.HealthCheckResponse(0x000100, 5, 2, 10))
        assert pend.resolve(ans) is True
        assert await f1 == ans
        t = await f2                                   # never answered
        assert t.status == P.Status.TIMEOUT and t.is_response and t.sequence == 2
        assert t.operation == P.Operation.HEALTH_CHECK and "0.05" in t.payload.reason
        assert len(pend) == 0
        assert pend.resolve(P.reply(r2, P.HealthCheckResponse(0, 0, 0, 0))) is False  # late
    asyncio.run(main())


def test_pending_matches_operation_and_direction() -> None:
    async def main() -> None:
        pend = P.PendingRequests()
        r = _req(5, P.Operation.POLICY_CHECK)
        fut = pend.add(r)
        with pytest.raises(ProtocolError, match="already pending"):
            pend.add(_req(5))
        wrong = P.reply(_req(5), P.HealthCheckResponse(0, 0, 0, 0))
        with pytest.raises(ProtocolError, match="HEALTH_CHECK"):
            pend.resolve(wrong)
        with pytest.raises(ProtocolError, match="takes responses"):
            pend.resolve(r)
        with pytest.raises(ProtocolError, match="only requests"):
            pend.add(wrong)
        assert not fut.done() and 5 in pend
        err = P.error_reply(r, P.Status.INTERNAL, "policy engine failed")
        assert pend.resolve(err)
        assert (await fut).status == P.Status.INTERNAL
    asyncio.run(main())


def test_pending_fail_all_and_cancel() -> None:
    async def main() -> None:
        pend = P.PendingRequests()
        futs = [pend.add(_req(i)) for i in (1, 2, 3)]
        futs[0].cancel()
        await asyncio.sleep(0)
        assert len(pend) == 2
        assert pend.fail_all() == 2
        for f in futs[1:]:
            assert (await f).status == P.Status.NETWORK
        assert len(pend) == 0
    asyncio.run(main())


def test_pending_call_is_transport_agnostic() -> None:
    async def main() -> None:
        pend = P.PendingRequests()
        seq = P.Sequencer()

        async def handler(msg: P.Message) -> P.Message:   # what the agent would run
            return P.reply(msg, P.StatusResponse(P.Enforcer.FUSE, cache_hits=7))

        async def send(data: bytes) -> None:              # any transport: bytes out, bytes in
            answer = await handler(P.decode(data))
            asyncio.get_running_loop().call_soon(pend.resolve, P.decode(P.encode(answer)))

        got = await pend.call(P.request(P.StatusRequest(), seq.next()), send)
        assert got.ok and got.payload.cache_hits == 7

        def broken(data: bytes) -> None:
            raise OSError("socket closed")
        with pytest.raises(OSError):
            await pend.call(P.request(P.StatusRequest(), seq.next()), broken)
        await asyncio.sleep(0)
        assert len(pend) == 0
    asyncio.run(main())
