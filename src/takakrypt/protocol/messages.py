"""TAKA messages: the header, every payload, and the byte codec.

The authoritative description, with a byte table per message, is docs/protocol.md; the
C twin is kernel/include/uapi/takakrypt.h.  All integers are little-endian, all structs
packed.  A message is the 32-byte header followed by ``payload_size`` payload bytes::

    off  size  field         meaning
    ---  ----  ------------  ------------------------------------------------------
      0     4  magic         0x54414B41
      4     4  version       1 = seed layouts, 2 = seed layouts + appended extensions
      8     4  operation     Operation; bit 31 set = response (TAKAKRYPT_MSG_RESPONSE)
     12     4  sequence      chosen by the requester, echoed by the response
     16     4  payload_size  bytes after the header; header + payload <= 8192
     20     4  status        Status; 0 in every request
     24     8  timestamp     sender's CLOCK_REALTIME, nanoseconds since the epoch
     32        payload: fixed part (u32/u64 fields), then the variable fields in order

A payload's fixed part holds the seed's fields in seed order; version 2 appends the
extension fields after them.  Variable fields (strings, bytes) follow the fixed part
back to back, each sized by its ``*_len`` field; strings are UTF-8, carry no NUL and no
terminator.  A response whose status is not SUCCESS carries :class:`ErrorReply`.

Contract: :func:`decode` returns a :class:`Message` or raises
:class:`~takakrypt.errors.ProtocolError`, never anything else; :func:`encode` raises
ProtocolError for a message that cannot be valid on the wire.  For every valid message
``decode(encode(m)) == m`` and for every accepted buffer ``encode(decode(b)) == b``.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from ..errors import ProtocolError
from .constants import (EFFECT_MASK, HEADER_SIZE, MAGIC, MAX_MSG_SIZE, MAX_PAYLOAD_SIZE,
                        MIN_VERSION, RESPONSE_FLAG, VERSION, Action, Algorithm, AuditKind,
                        Effect, Enforcer, Operation, Status)

# ---------------------------------------------------------------------------------------
# layout description: one table per payload drives encode, decode, the C layout test and
# the byte tables in the docs


class Len(NamedTuple):
    """A fixed field holding the byte length of variable field ``attr``."""
    attr: str


class Count(NamedTuple):
    """A fixed field holding the number of entries of variable field ``attr``."""
    attr: str


class Crc(NamedTuple):
    """A fixed field holding CRC-32 (zlib / IEEE 802.3) of variable field ``attr``."""
    attr: str


class Fixed(NamedTuple):
    name: str                              # C field name
    fmt: str                               # struct format: I u32, i s32, Q u64
    source: str | Len | Count | Crc        # attribute name, or derived
    since: int = 1                         # first protocol version carrying the field
    conv: Callable[[Any], Any] | None = None  # validates/converts the wire integer


class Var(NamedTuple):
    attr: str
    kind: str                              # PATH | TEXT | BYTES | ENTRIES
    since: int = 1


PATH = "path"        # UTF-8 with surrogateescape (any bytes but NUL round-trip)
TEXT = "text"        # strict UTF-8, no NUL
BYTES = "bytes"      # opaque
ENTRIES = "entries"  # packed GuardPointEntry records


class Layout:
    """Wire layout of one payload (``c_struct`` names its C twin)."""

    def __init__(self, c_struct: str, fixed: list[Fixed], var: list[Var],
                 with_header: bool = True) -> None:
        self.c_struct = c_struct
        self.with_header = with_header
        self.fixed = fixed
        self.var = var
        self.fixed_for = {v: [f for f in fixed if f.since <= v]
                          for v in range(MIN_VERSION, VERSION + 1)}
        self.var_for = {v: [x for x in var if x.since <= v]
                        for v in range(MIN_VERSION, VERSION + 1)}
        self.structs = {v: struct.Struct("<" + "".join(f.fmt for f in fs))
                        for v, fs in self.fixed_for.items()}
        # attributes that only exist from version 2 on (must be default in version 1)
        self.ext_attrs = [f.source for f in fixed if f.since > 1 and isinstance(f.source, str)]
        self.ext_attrs += [x.attr for x in var if x.since > 1]

    def offsets(self, version: int = VERSION) -> list[tuple[str, int, int]]:
        """(C field, offset in the payload, size) of the fixed part."""
        out, off = [], 0
        for f in self.fixed_for[version]:
            size = struct.calcsize("<" + f.fmt)
            out.append((f.name, off, size))
            off += size
        return out

    def size(self, version: int = VERSION) -> int:
        """Size of the fixed part of the payload."""
        return self.structs[version].size


def _enum(cls: type) -> Callable[[Any], Any]:
    def conv(x: Any) -> Any:
        try:
            return cls(x)
        except (ValueError, TypeError):
            raise ProtocolError(f"unknown {cls.__name__.lower()} {x!r}") from None
    return conv


def _bool(x: Any) -> bool:
    if x is True or x is False or (type(x) is int and x in (0, 1)):
        return bool(x)
    raise ProtocolError(f"boolean field must be 0 or 1, got {x!r}")


#: GuardPointEntry.enabled: 1 enforce, 0 configured but disabled, 2 enforced but
#: closed (its keys withdrawn: the agent cannot have the key now)
GP_DISABLED, GP_ENABLED, GP_CLOSED = 0, 1, 2


def _gp_state(x: Any) -> int:
    if x is True or x is False or (type(x) is int and x in (0, 1, 2)):
        return int(x)
    raise ProtocolError(f"guard point state must be 0, 1 or 2, got {x!r}")


def _effects(x: Any) -> Effect:
    if type(x) is not int and not isinstance(x, Effect) or x < 0 or x & ~EFFECT_MASK:
        raise ProtocolError(f"unknown effect bits in {x!r}")
    return Effect(x)


_action = _enum(Action)

# ---------------------------------------------------------------------------------------
# payloads


class Payload(msgspec.Struct, frozen=True):
    """Base of every payload; subclasses set OPERATION, RESPONSE and LAYOUT."""

    # class attributes, deliberately unannotated so msgspec does not make them fields
    OPERATION = None
    RESPONSE = None
    LAYOUT = None

    def check(self, version: int) -> None:
        """Cross-field rules (raise ProtocolError); per-field rules live in LAYOUT."""


class HealthCheckRequest(Payload, frozen=True):
    pass


class HealthCheckResponse(Payload, frozen=True):
    agent_version: int        # major << 16 | minor << 8 | patch
    uptime_seconds: int
    active_workers: int
    processed_requests: int   # wraps at 2**32


class PolicyCheckRequest(Payload, frozen=True):
    pid: int                  # thread group id (what userspace calls the pid)
    uid: int                  # fsuid
    gid: int                  # fsgid
    action: Action
    path: str                 # absolute path the application used
    process: str              # absolute path of the executable ("" for kernel threads)
    cwd: str
    # -- version 2 extensions
    tid: int = 0              # thread id (kernel task pid); 0 = unknown
    start_time: int = 0       # process start, clock ticks after boot (/proc/PID/stat #22)
    exe_dev: int = 0          # st_dev of the executable
    exe_ino: int = 0          # st_ino of the executable
    guard_point_id: int = 0   # id from CONFIG_UPDATE; 0 = unknown
    target: str = ""          # new path for rename and link, else ""

    def check(self, version: int) -> None:
        if self.action == Action.NONE:
            raise ProtocolError("policy check needs an action")
        if version >= 2 and (self.action in (Action.RENAME, Action.LINK)) != bool(self.target):
            raise ProtocolError("target path is required for rename/link and only for them")


class PolicyCheckResponse(Payload, frozen=True):
    allow_access: bool
    encrypt_file: bool        # apply the key: plaintext view (else raw stored bytes)
    audit_action: bool
    key_id: str
    policy: str
    reason: str
    # -- version 2 extensions
    effects: Effect = Effect(0)
    rule_index: int = -1      # -1: no rule matched (default deny)
    key_version: int = 0
    cache_ttl_ms: int = 0     # 0: do not cache

    @classmethod
    def from_effects(cls, effects: Effect, *, key_id: str = "", key_version: int = 0,
                     policy: str = "", reason: str = "", rule_index: int = -1,
                     cache_ttl_ms: int = 0) -> PolicyCheckResponse:
        """Build a response whose seed booleans agree with ``effects``."""
        return cls(allow_access=bool(effects & Effect.PERMIT),
                   encrypt_file=bool(effects & Effect.APPLY_KEY),
                   audit_action=bool(effects & Effect.AUDIT), key_id=key_id, policy=policy,
                   reason=reason, effects=Effect(effects), rule_index=rule_index,
                   key_version=key_version, cache_ttl_ms=cache_ttl_ms)

    def check(self, version: int) -> None:
        if version < 2:
            if self.encrypt_file and not self.allow_access:
                raise ProtocolError("encrypt_file set on a denied access")
            return
        e = self.effects
        if bool(e & Effect.PERMIT) == bool(e & Effect.DENY):
            raise ProtocolError("effects must hold exactly one of permit and deny")
        if e & (Effect.APPLY_KEY | Effect.WOULD_DENY) and not e & Effect.PERMIT:
            raise ProtocolError("apply_key and would_deny need permit")
        if (self.allow_access, self.encrypt_file, self.audit_action) != (
                bool(e & Effect.PERMIT), bool(e & Effect.APPLY_KEY), bool(e & Effect.AUDIT)):
            raise ProtocolError("allow_access/encrypt_file/audit_action disagree with effects")
        if e & Effect.APPLY_KEY and (not self.key_id or self.key_version < 1):
            raise ProtocolError("apply_key needs key_id and key_version >= 1")


class EncryptRequest(Payload, frozen=True):
    algorithm: int            # Algorithm; unknown values are answered with INVALID
    key_id: str
    metadata: bytes           # associated data bound to the ciphertext
    data: bytes               # plaintext
    key_version: int = 0      # v2; 0 = current version


class EncryptResponse(Payload, frozen=True):
    encrypted: bytes          # sealed record: nonce (iv_len) | ciphertext | tag (tag_len)
    iv_len: int
    tag_len: int
    key_version: int = 0      # v2; the version used

    def check(self, version: int) -> None:
        if self.iv_len + self.tag_len > len(self.encrypted):
            raise ProtocolError("iv_len + tag_len exceed encrypted_len")


class DecryptRequest(Payload, frozen=True):
    algorithm: int
    key_id: str
    iv: bytes
    tag: bytes
    encrypted: bytes          # ciphertext without nonce and tag
    key_version: int = 0      # v2; 0 = current version
    metadata: bytes = b""     # v2; associated data, as given to ENCRYPT


class DecryptResponse(Payload, frozen=True):
    plaintext: bytes          # checksum (CRC-32 of plaintext) is derived on the wire


class KeyRequest(Payload, frozen=True):
    key_id: str
    key_version: int = 0      # 0 = current version
    guard_point_id: int = 0


class KeyResponse(Payload, frozen=True):
    key_id: str
    key_version: int
    key: bytes
    algorithm: int = Algorithm.AES_256_GCM

    def __repr__(self) -> str:  # never print key material
        return (f"KeyResponse(key_id={self.key_id!r}, key_version={self.key_version}, "
                f"key=<{len(self.key)} bytes>, algorithm={self.algorithm!r})")


class GuardPointEntry(Payload, frozen=True):
    enabled: int              # GP_ENABLED (True), GP_DISABLED (False) or GP_CLOSED
    name: str
    path: str
    policy: str
    id: int = 0               # v2; referenced by POLICY_CHECK guard_point_id


class ConfigUpdateRequest(Payload, frozen=True):
    entries: tuple[GuardPointEntry, ...]
    generation: int = 0       # v2; policy generation, bumped on every reload

    def check(self, version: int) -> None:
        if version >= 2:
            ids = [e.id for e in self.entries]
            if 0 in ids or len(set(ids)) != len(ids):
                raise ProtocolError("guard point ids must be non-zero and unique")


class ConfigUpdateResponse(Payload, frozen=True):
    configured_count: int
    error_count: int


class AuditEventRequest(Payload, frozen=True):
    kind: AuditKind
    path: str = ""
    process: str = ""
    detail: str = ""
    pid: int = 0
    tid: int = 0
    uid: int = 0xFFFFFFFF     # (uid_t)-1: unknown
    gid: int = 0xFFFFFFFF
    action: Action = Action.NONE
    effects: Effect = Effect(0)
    rule_index: int = -1
    guard_point_id: int = 0
    error: int = 0            # positive errno returned to the application, 0 = none
    count: int = 1            # identical events coalesced by the sender

    def check(self, version: int) -> None:
        if self.count < 1:
            raise ProtocolError("audit event count must be >= 1")


class AuditEventResponse(Payload, frozen=True):
    pass


class StatusRequest(Payload, frozen=True):
    pass


class StatusResponse(Payload, frozen=True):
    enforcer: Enforcer
    impl_version: int = 0
    agent_connected: bool = False
    guard_point_count: int = 0
    config_generation: int = 0
    cache_entries: int = 0
    cache_capacity: int = 0
    pending_requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    requests_sent: int = 0
    requests_timed_out: int = 0
    fail_closed_denials: int = 0
    # -- version 2 extensions
    policy_denials: int = 0       # accesses denied by the agent's decisions (cached or not)
    integrity_errors: int = 0     # EIO for a bad header, tag or length
    audit_events: int = 0         # AUDIT_EVENTs sent (each may stand for count events)
    audit_drops: int = 0          # audit events dropped (queue full, no agent)


class ErrorReply(Payload, frozen=True):
    """Payload of any response whose status is not SUCCESS (version 1: empty)."""

    reason: str = ""


def _lens(*names: str) -> list[Fixed]:
    return [Fixed(f"{n}_len", "I", Len(n)) for n in names]


_effects_conv: Callable[[Any], Any] = _effects

HealthCheckRequest.LAYOUT = Layout("takakrypt_health_request", [], [])
HealthCheckResponse.LAYOUT = Layout("takakrypt_health_response", [
    Fixed("agent_version", "I", "agent_version"),
    Fixed("uptime_seconds", "I", "uptime_seconds"),
    Fixed("active_workers", "I", "active_workers"),
    Fixed("processed_requests", "I", "processed_requests")], [])
PolicyCheckRequest.LAYOUT = Layout("takakrypt_policy_request", [
    Fixed("pid", "I", "pid"), Fixed("uid", "I", "uid"), Fixed("gid", "I", "gid"),
    Fixed("action", "I", "action", conv=_action),
    Fixed("path_len", "I", Len("path")), Fixed("process_len", "I", Len("process")),
    Fixed("cwd_len", "I", Len("cwd")),
    Fixed("tid", "I", "tid", 2), Fixed("start_time", "Q", "start_time", 2),
    Fixed("exe_dev", "Q", "exe_dev", 2), Fixed("exe_ino", "Q", "exe_ino", 2),
    Fixed("guard_point_id", "I", "guard_point_id", 2),
    Fixed("target_len", "I", Len("target"), 2)],
    [Var("path", PATH), Var("process", PATH), Var("cwd", PATH), Var("target", PATH, 2)])
PolicyCheckResponse.LAYOUT = Layout("takakrypt_policy_response", [
    Fixed("allow_access", "I", "allow_access", conv=_bool),
    Fixed("encrypt_file", "I", "encrypt_file", conv=_bool),
    Fixed("audit_action", "I", "audit_action", conv=_bool),
    *_lens("key_id", "policy", "reason"),
    Fixed("effects", "I", "effects", 2, _effects_conv),
    Fixed("rule_index", "i", "rule_index", 2),
    Fixed("key_version", "I", "key_version", 2),
    Fixed("cache_ttl_ms", "I", "cache_ttl_ms", 2)],
    [Var("key_id", TEXT), Var("policy", TEXT), Var("reason", TEXT)])
EncryptRequest.LAYOUT = Layout("takakrypt_encrypt_request", [
    Fixed("algorithm", "I", "algorithm"), *_lens("data", "key_id", "metadata"),
    Fixed("key_version", "I", "key_version", 2)],
    [Var("key_id", TEXT), Var("metadata", BYTES), Var("data", BYTES)])
EncryptResponse.LAYOUT = Layout("takakrypt_encrypt_response", [
    Fixed("encrypted_len", "I", Len("encrypted")), Fixed("iv_len", "I", "iv_len"),
    Fixed("tag_len", "I", "tag_len"), Fixed("key_version", "I", "key_version", 2)],
    [Var("encrypted", BYTES)])
DecryptRequest.LAYOUT = Layout("takakrypt_decrypt_request", [
    Fixed("algorithm", "I", "algorithm"), *_lens("encrypted", "key_id", "iv", "tag"),
    Fixed("key_version", "I", "key_version", 2),
    Fixed("metadata_len", "I", Len("metadata"), 2)],
    [Var("key_id", TEXT), Var("iv", BYTES), Var("tag", BYTES), Var("encrypted", BYTES),
     Var("metadata", BYTES, 2)])
DecryptResponse.LAYOUT = Layout("takakrypt_decrypt_response", [
    Fixed("plaintext_len", "I", Len("plaintext")), Fixed("checksum", "I", Crc("plaintext"))],
    [Var("plaintext", BYTES)])
KeyRequest.LAYOUT = Layout("takakrypt_key_request", [
    Fixed("guard_point_id", "I", "guard_point_id"), Fixed("key_version", "I", "key_version"),
    *_lens("key_id")], [Var("key_id", TEXT)])
KeyResponse.LAYOUT = Layout("takakrypt_key_response", [
    Fixed("algorithm", "I", "algorithm"), Fixed("key_version", "I", "key_version"),
    *_lens("key_id"), Fixed("key_len", "I", Len("key"))],
    [Var("key_id", TEXT), Var("key", BYTES)])
GuardPointEntry.LAYOUT = Layout("takakrypt_guard_point_entry", [
    Fixed("enabled", "I", "enabled", conv=_gp_state), *_lens("name", "path", "policy"),
    Fixed("id", "I", "id", 2)],
    [Var("name", TEXT), Var("path", PATH), Var("policy", TEXT)], with_header=False)
ConfigUpdateRequest.LAYOUT = Layout("takakrypt_config_request", [
    Fixed("guard_point_count", "I", Count("entries")),
    Fixed("total_data_len", "I", Len("entries")),
    Fixed("generation", "I", "generation", 2)], [Var("entries", ENTRIES)])
ConfigUpdateResponse.LAYOUT = Layout("takakrypt_config_response", [
    Fixed("configured_count", "I", "configured_count"),
    Fixed("error_count", "I", "error_count")], [])
AuditEventRequest.LAYOUT = Layout("takakrypt_audit_event", [
    Fixed("kind", "I", "kind", conv=_enum(AuditKind)), Fixed("count", "I", "count"),
    Fixed("pid", "I", "pid"), Fixed("tid", "I", "tid"), Fixed("uid", "I", "uid"),
    Fixed("gid", "I", "gid"), Fixed("action", "I", "action", conv=_action),
    Fixed("effects", "I", "effects", conv=_effects_conv),
    Fixed("rule_index", "i", "rule_index"), Fixed("guard_point_id", "I", "guard_point_id"),
    Fixed("error", "I", "error"), *_lens("path", "process", "detail")],
    [Var("path", PATH), Var("process", PATH), Var("detail", TEXT)])
AuditEventResponse.LAYOUT = Layout("takakrypt_audit_response", [], [])
StatusRequest.LAYOUT = Layout("takakrypt_status_request", [], [])
StatusResponse.LAYOUT = Layout("takakrypt_status_response", [
    Fixed("enforcer", "I", "enforcer", conv=_enum(Enforcer)),
    Fixed("impl_version", "I", "impl_version"),
    Fixed("agent_connected", "I", "agent_connected", conv=_bool),
    *[Fixed(n, "I", n) for n in ("guard_point_count", "config_generation", "cache_entries",
                                  "cache_capacity", "pending_requests")],
    *[Fixed(n, "Q", n) for n in ("cache_hits", "cache_misses", "requests_sent",
                                  "requests_timed_out", "fail_closed_denials")],
    *[Fixed(n, "Q", n, 2) for n in ("policy_denials", "integrity_errors", "audit_events",
                                     "audit_drops")]], [])
ErrorReply.LAYOUT = Layout("takakrypt_error_response", [
    Fixed("reason_len", "I", Len("reason"), 2)], [Var("reason", TEXT, 2)])

#: (operation, is response) -> payload class of a SUCCESS message
PAYLOADS: dict[tuple[Operation, bool], type[Payload]] = {}
for _op, _req, _rsp in (
        (Operation.HEALTH_CHECK, HealthCheckRequest, HealthCheckResponse),
        (Operation.POLICY_CHECK, PolicyCheckRequest, PolicyCheckResponse),
        (Operation.ENCRYPT, EncryptRequest, EncryptResponse),
        (Operation.DECRYPT, DecryptRequest, DecryptResponse),
        (Operation.KEY_REQUEST, KeyRequest, KeyResponse),
        (Operation.CONFIG_UPDATE, ConfigUpdateRequest, ConfigUpdateResponse),
        (Operation.AUDIT_EVENT, AuditEventRequest, AuditEventResponse),
        (Operation.STATUS_REQUEST, StatusRequest, StatusResponse)):
    _req.OPERATION, _req.RESPONSE = _op, False
    _rsp.OPERATION, _rsp.RESPONSE = _op, True
    PAYLOADS[(_op, False)] = _req
    PAYLOADS[(_op, True)] = _rsp

#: every layout, for docs and the C layout test
LAYOUTS: list[Layout] = [c.LAYOUT for c in (*PAYLOADS.values(), GuardPointEntry, ErrorReply)]

_DEFAULTS: dict[type, dict[str, Any]] = {
    c: {f.name: f.default for f in msgspec.structs.fields(c)
        if f.default is not msgspec.NODEFAULT}
    for c in (*PAYLOADS.values(), GuardPointEntry, ErrorReply)}

# ---------------------------------------------------------------------------------------
# payload codec


def _enc_var(kind: str, value: Any, version: int, name: str) -> bytes:
    if kind == BYTES:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{name} must be bytes")
        return bytes(value)
    if kind == ENTRIES:
        if not isinstance(value, (tuple, list)) or not all(
                type(e) is GuardPointEntry for e in value):
            raise ProtocolError(f"{name} must be a tuple of GuardPointEntry")
        return b"".join(_pack(e, version) for e in value)
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be str")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        if kind != PATH:
            raise ProtocolError(f"{name} is not valid UTF-8 text") from None
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ProtocolError(f"{name} holds a surrogate that is not an escaped byte") \
                from None
        if raw.decode("utf-8", "surrogateescape") != value:
            raise ProtocolError(f"{name} is not in canonical surrogateescape form")
    if b"\0" in raw:
        raise ProtocolError(f"{name} contains NUL")
    return raw


def _dec_var(kind: str, raw: bytes, version: int, name: str) -> Any:
    if kind == BYTES:
        return raw
    if kind == ENTRIES:
        entries, pos = [], 0
        while pos < len(raw):
            e, used = _unpack(GuardPointEntry, raw, pos, version)
            entries.append(e)
            pos = used
        return tuple(entries)
    if b"\0" in raw:
        raise ProtocolError(f"{name} contains NUL")
    if kind == PATH:
        return raw.decode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not valid UTF-8") from None


def _pack(p: Payload, version: int) -> bytes:
    cls = type(p)
    lay: Layout = cls.LAYOUT
    name = cls.__name__
    if version < 2:
        defaults = _DEFAULTS[cls]
        for attr in lay.ext_attrs:
            if getattr(p, attr) != defaults[attr]:
                raise ProtocolError(f"{name}.{attr} needs protocol version 2")
    blobs = {v.attr: _enc_var(v.kind, getattr(p, v.attr), version, f"{name}.{v.attr}")
             for v in lay.var_for[version]}
    vals: list[Any] = []
    for f in lay.fixed_for[version]:
        src = f.source
        if isinstance(src, str):
            x = getattr(p, src)
            if f.conv is not None:
                f.conv(x)
        elif isinstance(src, Len):
            x = len(blobs[src.attr])
        elif isinstance(src, Count):
            x = len(getattr(p, src.attr))
        else:
            x = zlib.crc32(blobs[src.attr])
        vals.append(x)
    p.check(version)
    try:
        fixed = lay.structs[version].pack(*vals)
    except struct.error as e:
        raise ProtocolError(f"{name}: field out of range ({e})") from None
    return fixed + b"".join(blobs.values())


def _unpack(cls: type[Payload], buf: bytes, pos: int, version: int) -> tuple[Payload, int]:
    """Parse one payload of ``cls`` at ``buf[pos:]``; return it and the end offset."""
    lay: Layout = cls.LAYOUT
    st = lay.structs[version]
    name = cls.__name__
    if len(buf) - pos < st.size:
        raise ProtocolError(f"{name}: {len(buf) - pos} bytes, fixed part needs {st.size}")
    kw: dict[str, Any] = {}
    lens: dict[str, int] = {}
    derived: list[tuple[Fixed, int]] = []
    for f, x in zip(lay.fixed_for[version], st.unpack_from(buf, pos)):
        src = f.source
        if isinstance(src, str):
            kw[src] = f.conv(x) if f.conv is not None else x
        elif isinstance(src, Len):
            lens[src.attr] = x
        else:
            derived.append((f, x))
    pos += st.size
    for v in lay.var_for[version]:
        n = lens[v.attr]
        if n > len(buf) - pos:
            raise ProtocolError(f"{name}.{v.attr}: {n} bytes run past the end of the payload")
        kw[v.attr] = _dec_var(v.kind, buf[pos:pos + n], version, f"{name}.{v.attr}")
        pos += n
    for f, x in derived:
        src = f.source
        if isinstance(src, Count) and len(kw[src.attr]) != x:
            raise ProtocolError(f"{name}.{f.name} is {x} but {len(kw[src.attr])} follow")
        if isinstance(src, Crc) and zlib.crc32(kw[src.attr]) != x:
            raise ProtocolError(f"{name}.{f.name} does not match the data")
    p = cls(**kw)
    p.check(version)
    return p, pos


# ---------------------------------------------------------------------------------------
# header and message

_HEADER = struct.Struct("<IIIIIIQ")
assert _HEADER.size == HEADER_SIZE


class Header(msgspec.Struct, frozen=True):
    """The 32-byte header, magic implied.  ``response`` is bit 31 of ``operation``."""

    operation: Operation
    sequence: int
    payload_size: int = 0
    status: Status = Status.SUCCESS
    timestamp: int = 0
    version: int = VERSION
    response: bool = False

    def pack(self) -> bytes:
        _check_header(self.version, self.operation, self.status, self.response,
                      self.payload_size)
        try:
            return _HEADER.pack(MAGIC, self.version,
                                self.operation | (RESPONSE_FLAG if self.response else 0),
                                self.sequence, self.payload_size, self.status, self.timestamp)
        except struct.error as e:
            raise ProtocolError(f"header field out of range ({e})") from None

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parse and validate the first 32 bytes of ``data``."""
        if len(data) < HEADER_SIZE:
            raise ProtocolError(f"message of {len(data)} bytes is shorter than the header")
        magic, version, op, seq, size, status, ts = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic 0x{magic:08x}")
        response = bool(op & RESPONSE_FLAG)
        op &= ~RESPONSE_FLAG
        _check_header(version, op, status, response, size)
        return cls(Operation(op), seq, size, Status(status), ts, version, response)


def _check_header(version: int, op: int, status: int, response: bool, size: int) -> None:
    if not (type(version) is int and MIN_VERSION <= version <= VERSION):
        raise ProtocolError(f"unsupported protocol version {version!r}")
    if op not in Operation._value2member_map_:
        raise ProtocolError(f"unknown operation {op!r}")
    if status not in Status._value2member_map_:
        raise ProtocolError(f"unknown status {status!r}")
    if status != Status.SUCCESS and not response:
        raise ProtocolError(f"request carries status {status!r}; requests carry 0")
    if not (type(size) is int and 0 <= size <= MAX_PAYLOAD_SIZE):
        raise ProtocolError(f"payload_size {size!r} exceeds {MAX_PAYLOAD_SIZE}")


class Message(msgspec.Struct, frozen=True):
    """A header and its typed payload.  Build with :func:`request` / :func:`reply`."""

    header: Header
    payload: Payload

    @property
    def operation(self) -> Operation:
        return self.header.operation

    @property
    def sequence(self) -> int:
        return self.header.sequence

    @property
    def status(self) -> Status:
        return self.header.status

    @property
    def is_response(self) -> bool:
        return self.header.response

    @property
    def ok(self) -> bool:
        return self.header.status == Status.SUCCESS


def payload_class(operation: int, response: bool, status: int = 0) -> type[Payload]:
    """The payload type a message with this header carries."""
    if response and status != Status.SUCCESS:
        return ErrorReply
    try:
        return PAYLOADS[(Operation(operation), bool(response))]
    except ValueError:
        raise ProtocolError(f"unknown operation {operation!r}") from None


def encode_payload(payload: Payload, version: int = VERSION) -> bytes:
    if not isinstance(payload, Payload) or payload.LAYOUT is None:
        raise ProtocolError(f"not a payload: {type(payload).__name__}")
    if not (type(version) is int and MIN_VERSION <= version <= VERSION):
        raise ProtocolError(f"unsupported protocol version {version!r}")
    body = _pack(payload, version)
    if len(body) > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"message of {HEADER_SIZE + len(body)} bytes exceeds "
                            f"{MAX_MSG_SIZE}")
    return body


def encode(msg: Message) -> bytes:
    """Serialise ``msg``; its header's payload_size must be exact (use request/reply)."""
    if not isinstance(msg, Message) or not isinstance(msg.header, Header):
        raise ProtocolError("encode() takes a Message")
    h = msg.header
    body = encode_payload(msg.payload, h.version)
    want = payload_class(h.operation, h.response, h.status)
    if type(msg.payload) is not want:
        raise ProtocolError(f"{Operation(h.operation).name} "
                            f"{'response' if h.response else 'request'} with status "
                            f"{h.status!r} carries {want.__name__}, "
                            f"not {type(msg.payload).__name__}")
    if h.payload_size != len(body):
        raise ProtocolError(f"header.payload_size is {h.payload_size}, payload encodes "
                            f"to {len(body)} bytes")
    return h.pack() + body


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one whole message (one datagram / NLA / ring record)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"cannot decode {type(data).__name__}")
    buf = bytes(data)
    if len(buf) > MAX_MSG_SIZE:
        raise ProtocolError(f"message of {len(buf)} bytes exceeds {MAX_MSG_SIZE}")
    h = Header.unpack(buf)
    if len(buf) - HEADER_SIZE != h.payload_size:
        raise ProtocolError(f"payload_size is {h.payload_size} but "
                            f"{len(buf) - HEADER_SIZE} bytes follow the header")
    cls = payload_class(h.operation, h.response, h.status)
    payload, end = _unpack(cls, buf, HEADER_SIZE, h.version)
    if end != len(buf):
        raise ProtocolError(f"{cls.__name__}: {len(buf) - end} trailing bytes")
    return Message(h, payload)


def request(payload: Payload, sequence: int, *, timestamp: int | None = None,
            version: int = VERSION) -> Message:
    """A request message for ``payload`` (its class names the operation)."""
    if not isinstance(payload, Payload) or payload.RESPONSE is not False:
        raise ProtocolError(f"{type(payload).__name__} is not a request payload")
    size = len(encode_payload(payload, version))
    return Message(Header(payload.OPERATION, sequence, size, Status.SUCCESS,
                          time.time_ns() if timestamp is None else timestamp, version),
                   payload)


def reply(to: Message | Header, payload: Payload, *,
          timestamp: int | None = None) -> Message:
    """The SUCCESS response to ``to`` (same operation, sequence and version)."""
    h = to.header if isinstance(to, Message) else to
    if not isinstance(payload, Payload) or payload.RESPONSE is not True \
            or payload.OPERATION != h.operation:
        raise ProtocolError(f"{type(payload).__name__} does not answer "
                            f"{Operation(h.operation).name}")
    size = len(encode_payload(payload, h.version))
    return Message(Header(h.operation, h.sequence, size, Status.SUCCESS,
                          time.time_ns() if timestamp is None else timestamp, h.version,
                          True), payload)


def error_reply(to: Message | Header, status: Status, reason: str = "", *,
                timestamp: int | None = None) -> Message:
    """A failed response to ``to``; the reason is dropped in version 1."""
    h = to.header if isinstance(to, Message) else to
    if status == Status.SUCCESS or status not in Status._value2member_map_:
        raise ProtocolError(f"error_reply needs an error status, got {status!r}")
    payload = ErrorReply(reason if h.version >= 2 else "")
    size = len(encode_payload(payload, h.version))
    return Message(Header(h.operation, h.sequence, size, Status(status),
                          time.time_ns() if timestamp is None else timestamp, h.version,
                          True), payload)
