"""The KMIP key backend: data keys held by a KMIP server, over mutual TLS.

Each version of a key is one KMIP Symmetric Key object made by the server::

    Object Type                 Symmetric Key
    Cryptographic Algorithm     AES
    Cryptographic Length        256
    Cryptographic Usage Mask    Encrypt | Decrypt
    Name                        takakrypt/<name>/v<version>      (e.g. takakrypt/payroll/v3)
    Object Group                takakrypt            (index 0: every key, for list)
    Object Group                takakrypt/<name>     (index 1: every version of one key)
    State                       Active               (Pre-Active while being claimed)

A version is a *claim* on a name: ``create``/``rotate`` Create the object (Pre-Active),
Locate the name, and Activate the object only if it is the only one of that name;
otherwise the claim is withdrawn (Destroy, still Pre-Active) and retried.  Two clients
can never both win a version: of two objects the later one's Locate sees the earlier
one, which is only gone if its claim was withdrawn (docs/keys.md, "The KMIP backend",
has the argument and the rest of the scheme).

``retire`` Revokes (Cessation of Operation) and Destroys a version's object; a version
below the current one with no Active object is reported ``retired``.

The client speaks KMIP 1.4 in TTLV over its own TLS connection (``ssl``, TLS 1.2 or
later, the server's certificate checked against ``ca_file`` and the host name), using
PyKMIP (``pip install pykmip``) to encode requests and decode answers.  The answer to
Get, the only message that holds key material, is read into a locked buffer and
parsed here, so no ``bytes`` copy of a key is made in Python (docs/keys.md, "Keys in
memory").  PyKMIP is imported by this module only: ``import takakrypt.keys`` works
without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import (
    BackendUnavailable,
    KeyExists,
    KeyInUse,
    KeyNotFound,
    KeyRetired,
    KeystoreCorrupt,
    UsageError,
)
from .backend import (
    ALGORITHM,
    KEY_BYTES,
    KeyBackend,
    KeyInfo,
    KeyVersionInfo,
    check_version,
    validate_key_name,
)
from .secret import lock, wipe

try:  # PyKMIP: only what encodes requests and decodes answers
    from kmip.core import enums as _E
    from kmip.core import objects as _O
    from kmip.core.attributes import UniqueIdentifier as _UID
    from kmip.core.factories.attributes import AttributeFactory as _AttributeFactory
    from kmip.core.messages import contents as _C
    from kmip.core.messages import messages as _M
    from kmip.core.messages import payloads as _P
    from kmip.core.utils import BytearrayStream as _Stream
except ImportError as e:  # pragma: no cover - pykmip is a test dependency
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

__all__ = ["KmipBackend", "object_name"]

log = logging.getLogger(__name__)

PREFIX = "takakrypt"
#: reported as the creation time of a retired version whose object the server removed
#: along with its material (PyKMIP does; servers that keep the metadata of destroyed
#: objects report the real time)
UNKNOWN_TIME = "1970-01-01T00:00:00Z"
DEFAULT_PORT = 5696
#: an answer larger than this is not a KMIP answer to anything we ask
MAX_MESSAGE = 64 << 20
#: objects per Locate answer (Maximum Items; further pages by Offset Items)
LOCATE_PAGE = 1000
#: Get Attributes requests per batch
BATCH = 200

_OBJ_NAME = re.compile(r"takakrypt/([A-Za-z0-9_][A-Za-z0-9._-]{0,62})/v([1-9][0-9]{0,17})")

# TTLV tags and types read from the answer to Get (KMIP 1.4 spec, section 9.1.3)
_T_RESPONSE_MESSAGE = 0x42007B
_T_BATCH_ITEM = 0x42000F
_T_RESULT_STATUS = 0x42007F
_T_RESPONSE_PAYLOAD = 0x42007C
_T_SYMMETRIC_KEY = 0x42008F
_T_KEY_BLOCK = 0x420040
_T_KEY_FORMAT_TYPE = 0x420042
_T_KEY_VALUE = 0x420045
_T_KEY_MATERIAL = 0x420043
_TYPE_STRUCTURE = 0x01
_TYPE_ENUMERATION = 0x05
_TYPE_BYTE_STRING = 0x08


def object_name(name: str, version: int) -> str:
    """The KMIP Name of version ``version`` of key ``name``."""
    return f"{PREFIX}/{name}/v{version}"


def _group(name: str | None = None) -> str:
    return PREFIX if name is None else f"{PREFIX}/{name}"


def _op_name(op: Any) -> str:
    return op.name.replace("_", " ").title().replace(" ", "")


def _rfc3339(ts: int | None) -> str:
    if ts is None:
        return UNKNOWN_TIME
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uid_order(uid: str) -> tuple[int, int, str]:
    # numeric identifiers (PyKMIP's) in numeric order, others in string order; the
    # order only decides who waits for whom, never who wins (see _claim)
    return (0, int(uid), "") if uid.isdigit() else (1, 0, uid)


# ----------------------------------------------------------------------- errors


class _Transient(Exception):
    """A connection-level failure: worth a new connection and another try."""


class _Refused(Exception):
    """A failure another try does not fix (TLS verification, a rejected certificate)."""


class _Failed(Exception):
    """The server answered a batch item with an error (the reason is an enum)."""

    def __init__(self, op: str, reason: Any, message: str) -> None:
        self.op, self.reason, self.message = op, reason, message
        name = getattr(reason, "name", str(reason)).replace("_", " ").lower()
        super().__init__(f"{op}: {name}" + (f": {message}" if message else ""))

    @property
    def gone(self) -> bool:
        """The object does not exist (or is not ours: PyKMIP says Permission Denied)."""
        return self.reason in (_E.ResultReason.ITEM_NOT_FOUND,
                               _E.ResultReason.PERMISSION_DENIED)


_ALERTS = {
    # the server's answer to our client certificate, as OpenSSL names the TLS alert
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client certificate rejected: certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "client certificate rejected: certificate revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client certificate rejected: bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "client certificate rejected: unsupported "
                                           "certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client certificate rejected: certificate unknown",
    "TLSV1_ALERT_UNKNOWN_CA": "client certificate rejected: unknown CA (not signed by a "
                              "CA the server trusts)",
    "TLSV1_ALERT_ACCESS_DENIED": "client certificate rejected: access denied",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client certificate required",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "TLS handshake failure (no common cipher or protocol, "
                                     "or the client certificate was refused)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (is this a KMIP port?)",
}


def _tls_refusal(e: ssl.SSLError, ca_file: str, cert_file: str) -> str | None:
    """A message for a TLS failure another try would not fix, else None."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"server certificate verify failed: {e.verify_message} "
                f"(certificate verify failed; ca_file {ca_file})")
    reason = getattr(e, "reason", None) or ""
    text = _ALERTS.get(reason)
    if text is None:
        return None
    if "client certificate" in text:
        text += f" (cert_file {cert_file})"
    return text


def _cause(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {getattr(e, 'reason', None) or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


# ------------------------------------------------------------------------ model


@dataclass(frozen=True)
class _Obj:
    """One of our objects as the server describes it (never its material)."""

    uid: str
    name: str
    version: int
    state: Any  # kmip.core.enums.State
    created: int | None  # Initial Date, seconds since the epoch

    @property
    def active(self) -> bool:
        return self.state == _E.State.ACTIVE

    @property
    def claim(self) -> bool:
        """Pre-Active: an unfinished (or abandoned) claim, not a version yet."""
        return self.state == _E.State.PRE_ACTIVE


@dataclass
class _Key:
    """A key's objects, sorted into versions."""

    name: str
    active: dict[int, _Obj]
    retired: dict[int, _Obj]  # Deactivated, Compromised, Destroyed: material unusable
    claims: list[_Obj]

    @property
    def current(self) -> int:
        return max(self.active, default=0)

    @property
    def counted(self) -> int:
        """The highest version ever made (Active or retired): the next is one more."""
        return max([*self.active, *self.retired], default=0)

    def info(self, current: int | None = None) -> KeyInfo:
        cur = self.current if current is None else current
        versions = []
        for v in range(1, cur + 1):
            if v in self.active:
                versions.append(KeyVersionInfo(v, _rfc3339(self.active[v].created), "active"))
            else:  # retired, or its object is gone with its material
                o = self.retired.get(v)
                versions.append(KeyVersionInfo(v, _rfc3339(o and o.created), "retired"))
        return KeyInfo(name=self.name, current_version=cur, versions=versions,
                       algorithm=ALGORITHM, backend=KmipBackend.backend_name)


# ---------------------------------------------------------------------- backend


class KmipBackend(KeyBackend):
    """Keys on a KMIP server (see the module docstring and docs/keys.md).

    ``host``/``port``: the server; ``ca_file``: the CA (PEM) that signed the server's
    certificate, whose name must match ``host``; ``cert_file``/``key_file``: this
    client's certificate and key (mutual TLS is required).  ``timeout``: seconds one
    KMIP request may take, connecting included; ``retries``: further tries of a request
    after a connection-level failure (exponential backoff with jitter), never after an
    answer such as "not found".

    The files are read when the backend is made (``UsageError`` if one is unusable);
    the server is first contacted by the first call.  One connection is kept and shared
    by the threads using the instance (a lock around it); it is made again after a
    failure.
    """

    backend_name = "kmip"
    #: seconds after which another client's Pre-Active claim on a version counts as
    #: abandoned (its client died between Create and Activate) and may be destroyed;
    #: only liveness depends on it, never safety (an Active object cannot be destroyed)
    claim_timeout = 30.0
    #: how long create/rotate keep trying to claim a version against other clients
    claim_budget = 120.0

    def __init__(self, host: str, port: int = DEFAULT_PORT, *, ca_file: str, cert_file: str,
                 key_file: str, timeout: float = 10.0, retries: int = 3) -> None:
        self._sock: ssl.SSLSocket | None = None
        self._closed = True
        if _IMPORT_ERROR is not None:
            raise UsageError("the KMIP backend needs PyKMIP (pip install 'takakrypt[kmip]'): "
                             f"{_IMPORT_ERROR}")
        if not isinstance(host, str) or not host:
            raise UsageError("KMIP host must be a non-empty string")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise UsageError(f"KMIP port must be an integer 1-65535, not {port!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= 3600:
            raise UsageError(f"KMIP timeout must be 0 < seconds <= 3600, not {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise UsageError(f"KMIP retries must be an integer 0-20, not {retries!r}")
        self.host, self.port = host, port
        self.timeout, self.retries = float(timeout), retries
        self.ca_file, self.cert_file, self.key_file = (
            os.fspath(ca_file), os.fspath(cert_file), os.fspath(key_file))
        self._ctx = self._tls_context()
        self._io = threading.Lock()  # the connection: one request at a time
        self._writes = threading.Lock()  # this instance's create/rotate/retire
        self._attrs = _AttributeFactory()
        self._closed = False

    # ----------------------------------------------------------------- plumbing

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _tls_context(self) -> ssl.SSLContext:
        for what, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                           ("key_file", self.key_file)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise UsageError(f"cannot read the KMIP {what} {path}: {e.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self.ca_file)
        except ssl.SSLError as e:
            raise UsageError(f"the KMIP ca_file {self.ca_file} holds no usable PEM "
                             f"certificate ({e.reason or e})") from None
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise UsageError(f"cannot use the KMIP cert_file {self.cert_file} with key_file "
                             f"{self.key_file} ({e.reason or e})") from None
        return ctx

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"the KMIP backend for {self.address} is closed")

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _connect(self, deadline: float) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port),
                                       timeout=max(deadline - time.monotonic(), 0.001))
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._ctx.wrap_socket(raw, server_hostname=self.host,
                                        do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        try:
            tls.settimeout(max(deadline - time.monotonic(), 0.001))
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def _stale(self) -> bool:
        """The idle connection was closed by the server (readable before we asked)."""
        assert self._sock is not None
        try:
            p = select.poll()  # not select(): the agent's descriptors go past 1024
            p.register(self._sock, select.POLLIN)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    @staticmethod
    def _recv_exact(sock: ssl.SSLSocket, view: memoryview, deadline: float) -> None:
        while view:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            n = sock.recv_into(view)
            if n == 0:
                raise _Transient("connection closed by the server")
            view = view[n:]

    def _exchange(self, data: bytes, deadline: float) -> bytearray:
        """Send one request message, read one answer into a locked buffer."""
        sock = self._sock
        assert sock is not None
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(data)
        header = bytearray(8)
        self._recv_exact(sock, memoryview(header), deadline)
        tag = int.from_bytes(header[:3], "big")
        size = int.from_bytes(header[4:], "big")
        if tag != _T_RESPONSE_MESSAGE or header[3] != _TYPE_STRUCTURE or size > MAX_MESSAGE:
            raise _Transient("the answer is not a KMIP response message")
        buf = bytearray(8 + size)
        lock(buf)  # may hold key material (Get); wiped by the caller
        buf[:8] = header
        try:
            with memoryview(buf) as mv:
                self._recv_exact(sock, mv[8:], deadline)
        except BaseException:
            wipe(buf)
            raise
        return buf

    def _roundtrip(self, data: bytes, what: str, *, idempotent: bool,
                   retries: int | None = None) -> bytearray:
        """One request/answer on the shared connection, with connection-level retries.

        A request that may have reached the server is tried again only if it is
        ``idempotent`` (reads); otherwise its outcome is unknown and reported so."""
        self._check_open()
        with self._io:
            self._check_open()
            attempt = 0
            while True:
                deadline = time.monotonic() + self.timeout
                sent = False
                try:
                    if self._sock is not None and self._stale():
                        self._drop()
                    if self._sock is None:
                        self._sock = self._connect(deadline)
                    sent = True
                    return self._exchange(data, deadline)
                except ssl.SSLError as e:
                    self._drop()
                    refusal = _tls_refusal(e, self.ca_file, self.cert_file)
                    if refusal is not None:
                        raise BackendUnavailable(
                            f"KMIP server {self.address}: {refusal}") from None
                    cause = _cause(e)
                except (OSError, _Transient) as e:
                    self._drop()
                    cause = _cause(e)
                except BaseException:
                    self._drop()  # half a message on the wire: the stream is lost
                    raise
                if sent and not idempotent:
                    raise BackendUnavailable(
                        f"KMIP server {self.address}: {what} failed ({cause}); the server "
                        "may or may not have done it") from None
                if attempt >= (self.retries if retries is None else retries):
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise BackendUnavailable(
                        f"KMIP server {self.address} unavailable{tries}: {cause}") from None
                time.sleep(self._backoff(attempt))
                attempt += 1

    @staticmethod
    def _backoff(attempt: int) -> float:
        cap = min(2.0, 0.05 * (2 ** attempt))
        return random.uniform(cap / 2, cap)

    # --------------------------------------------------------------- messages

    @staticmethod
    def _message(items: list[tuple[Any, Any]]) -> bytes:
        batch = []
        for i, (op, payload) in enumerate(items):
            batch.append(_M.RequestBatchItem(
                operation=_C.Operation(op),
                unique_batch_item_id=_C.UniqueBatchItemID(b"%d" % i) if len(items) > 1
                else None,
                request_payload=payload))
        header = _M.RequestHeader(
            protocol_version=_C.ProtocolVersion(1, 4),
            # one failed item (an object destroyed meanwhile) must not stop the others
            batch_error_cont_option=_C.BatchErrorContinuationOption(
                _E.BatchErrorContinuationOption.CONTINUE) if len(batch) > 1 else None,
            batch_count=_C.BatchCount(len(batch)))
        stream = _Stream()
        _M.RequestMessage(request_header=header, batch_items=batch).write(
            stream, kmip_version=_E.KMIPVersion.KMIP_1_4)
        return bytes(stream.buffer)

    def _batch(self, items: list[tuple[Any, Any]], *, idempotent: bool = True,
               retries: int | None = None) -> list[Any]:
        """Send ``items`` (operation, payload) as one message; per item its answer's
        payload, or a :class:`_Failed` (returned, not raised)."""
        what = "/".join(sorted({_op_name(op) for op, _ in items}))
        raw = self._roundtrip(self._message(items), what, idempotent=idempotent,
                              retries=retries)
        try:
            response = _M.ResponseMessage()
            response.read(_Stream(bytes(raw)), kmip_version=_E.KMIPVersion.KMIP_1_4)
        except Exception as e:  # PyKMIP raises many types on a malformed message
            self._drop()
            raise BackendUnavailable(f"KMIP server {self.address}: malformed answer to "
                                     f"{what}: {e}") from None
        finally:
            wipe(raw)
        got = response.batch_items
        if len(items) == 1:
            if len(got) != 1:
                raise BackendUnavailable(f"KMIP server {self.address}: {len(got)} answers "
                                         f"to one {what} request")
            by_id = {b"0": got[0]}
        else:
            by_id = {bytes(g.unique_batch_item_id.value): g for g in got
                     if g.unique_batch_item_id is not None}
            if not by_id and len(got) == 1 and \
                    got[0].result_status.value != _E.ResultStatus.SUCCESS:
                raise self._unavailable(what, got[0])  # the whole message was refused
        out: list[Any] = []
        for i, (op, _) in enumerate(items):
            item = by_id.get(b"%d" % i)
            if item is None:  # not done (a server that stops a batch at an error)
                out.append(_Failed(_op_name(op), None, "not processed"))
            elif item.result_status.value == _E.ResultStatus.SUCCESS:
                out.append(item.response_payload)
            else:
                out.append(self._failure(op, item))
        return out

    @staticmethod
    def _failure(op: Any, item: Any) -> _Failed:
        reason = item.result_reason.value if item.result_reason else None
        message = item.result_message.value if item.result_message else ""
        return _Failed(_op_name(op), reason, message)

    def _unavailable(self, what: str, item: Any) -> BackendUnavailable:
        f = self._failure(_E.Operation.QUERY, item)
        why = "the server refused our credentials" if f.reason == \
            _E.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL else "the server refused the request"
        return BackendUnavailable(f"KMIP server {self.address}: {why} ({what}: "
                                  f"{f.message or f.reason})")

    def _one(self, op: Any, payload: Any, *, idempotent: bool = True,
             retries: int | None = None) -> Any:
        """One operation; its answer's payload, or raises :class:`_Failed`."""
        r = self._batch([(op, payload)], idempotent=idempotent, retries=retries)[0]
        if isinstance(r, _Failed):
            raise r
        return r

    def _unexpected(self, f: _Failed) -> BackendUnavailable:
        return BackendUnavailable(f"KMIP server {self.address} refused {f}")

    # ------------------------------------------------------------- operations

    def _attr(self, kind: Any, value: Any, index: int | None = None) -> Any:
        return self._attrs.create_attribute(kind, value, index)

    def _locate(self, *filters: Any) -> list[str]:
        """Every unique identifier matching ``filters`` (all pages, deduplicated)."""
        uids: list[str] = []
        seen: set[str] = set()
        offset = 0
        while True:
            payload = _P.LocateRequestPayload(
                maximum_items=LOCATE_PAGE, offset_items=offset or None,
                attributes=list(filters))
            try:
                page = self._one(_E.Operation.LOCATE, payload).unique_identifiers
            except _Failed as f:
                raise self._unexpected(f) from None
            for u in page:
                if u not in seen:
                    seen.add(u)
                    uids.append(u)
            if len(page) < LOCATE_PAGE:
                return uids
            offset += len(page)

    def _describe(self, uids: Iterable[str]) -> list[_Obj]:
        """Name, State and Initial Date of ``uids`` (batched); objects that vanished in
        between and objects without one of our names are left out."""

        def request(uid: str) -> tuple[Any, Any]:
            return (_E.Operation.GET_ATTRIBUTES, _P.GetAttributesRequestPayload(
                unique_identifier=uid, attribute_names=["Name", "State", "Initial Date"]))

        uids = list(uids)
        out: list[_Obj] = []
        for i in range(0, len(uids), BATCH):
            chunk = uids[i:i + BATCH]
            answers = self._batch([request(u) for u in chunk])
            for uid, a in zip(chunk, answers, strict=True):
                if isinstance(a, _Failed) and a.reason is None:  # not processed: again
                    a = self._batch([request(uid)])[0]
                if isinstance(a, _Failed):
                    if a.gone:
                        continue
                    raise self._unexpected(a)
                obj = self._parse(uid, a.attributes)
                if obj is not None:
                    out.append(obj)
        return out

    @staticmethod
    def _parse(uid: str, attrs: list[Any]) -> _Obj | None:
        names: list[tuple[str, int]] = []
        state, created = None, None
        for a in attrs:
            n, v = a.attribute_name.value, a.attribute_value
            if n == "Name":
                m = _OBJ_NAME.fullmatch(v.name_value.value)
                if m:
                    names.append((m.group(1), int(m.group(2))))
            elif n == "State":
                state = v.value
            elif n == "Initial Date":
                created = int(v.value)
        if len(names) != 1 or state is None:
            return None
        return _Obj(uid, names[0][0], names[0][1], state, created)

    def _objects(self, name: str | None) -> list[_Obj]:
        uids = self._locate(
            self._attr(_E.AttributeType.OBJECT_GROUP, _group(name)),
            self._attr(_E.AttributeType.OBJECT_TYPE, _E.ObjectType.SYMMETRIC_KEY))
        objs = self._describe(uids)
        return objs if name is None else [o for o in objs if o.name == name]

    def _key(self, name: str, objs: list[_Obj]) -> _Key:
        key = _Key(name, {}, {}, [])
        for o in objs:
            if o.claim:
                key.claims.append(o)
            elif o.active:
                if o.version in key.active:
                    raise KeystoreCorrupt(
                        f"key {name!r} version {o.version} is held by two Active objects "
                        f"(unique identifiers {key.active[o.version].uid} and {o.uid}) on "
                        f"KMIP server {self.address}; destroy the wrong one")
                key.active[o.version] = o
            else:
                key.retired.setdefault(o.version, o)
        return key

    def _load(self, name: str) -> _Key:
        key = self._key(name, self._objects(name))
        if not key.active:
            raise KeyNotFound(f"key {name!r} not found on KMIP server {self.address}")
        return key

    def _create_object(self, name: str, version: int) -> str:
        a, T = self._attr, _E.AttributeType
        template = _O.TemplateAttribute(attributes=[
            a(T.CRYPTOGRAPHIC_ALGORITHM, _E.CryptographicAlgorithm.AES),
            a(T.CRYPTOGRAPHIC_LENGTH, KEY_BYTES * 8),
            a(T.CRYPTOGRAPHIC_USAGE_MASK, [_E.CryptographicUsageMask.ENCRYPT,
                                           _E.CryptographicUsageMask.DECRYPT]),
            a(T.NAME, object_name(name, version)),
            a(T.OBJECT_GROUP, _group(), 0),
            a(T.OBJECT_GROUP, _group(name), 1),
        ])
        payload = _P.CreateRequestPayload(object_type=_E.ObjectType.SYMMETRIC_KEY,
                                          template_attribute=template)
        return str(self._one(_E.Operation.CREATE, payload, idempotent=False)
                   .unique_identifier)

    def _holders(self, name: str, version: int) -> list[str]:
        """Our objects (any state) with the Name of ``version``."""
        return self._locate(
            self._attr(_E.AttributeType.NAME, object_name(name, version)),
            self._attr(_E.AttributeType.OBJECT_GROUP, _group(name)))

    def _destroy_claim(self, uid: str, *, retries: int | None = None) -> None:
        """Withdraw a Pre-Active claim (ours, or an abandoned one); gone is fine, and so
        is Active (the claim was won meanwhile: the server refuses)."""
        with contextlib.suppress(_Failed):
            self._one(_E.Operation.DESTROY, _P.DestroyRequestPayload(
                unique_identifier=_UID(uid)), idempotent=False, retries=retries)

    def _reap(self, name: str, version: int, objs: list[_Obj], now: float) -> set[str]:
        """Destroy the claims in ``objs`` older than :attr:`claim_timeout` at ``now``;
        their unique identifiers.  Only liveness rests on the clock: the server refuses
        to destroy an Active object, and a claim destroyed before its Activate makes
        that Activate fail."""
        reaped = set()
        for o in objs:
            if o.claim and o.created is not None and now - o.created > self.claim_timeout:
                log.warning("destroying abandoned claim %s on %s (object %s)",
                            object_name(name, version), self.address, o.uid)
                self._destroy_claim(o.uid)
                reaped.add(o.uid)
        return reaped

    def _claim(self, name: str, version: int) -> _Obj | None:
        """Try to make ``version`` of ``name``: the Active object, or None if another
        client holds or wins that version (nothing of ours is left then)."""
        try:
            uid = self._create_object(name, version)
        except _Failed as f:
            # a server that keeps Names unique refuses a taken one: a lost claim, unless
            # the holder is an abandoned claim (judged by our clock: we have no object
            # of our own to compare with)
            holders = self._describe(self._holders(name, version))
            if not holders:
                raise self._unexpected(f) from None
            self._reap(name, version, holders, time.time())
            return None
        try:
            obj = self._settle(name, version, uid)
        except BaseException:
            # one quick try to withdraw; if the server is away, the next claim of this
            # version destroys ours once it counts as abandoned (and if ours became
            # Active meanwhile, the server refuses: the version exists)
            with contextlib.suppress(Exception):
                self._destroy_claim(uid, retries=0)
            raise
        if obj is None:
            self._destroy_claim(uid)
        return obj

    def _settle(self, name: str, version: int, uid: str) -> _Obj | None:
        """Steps 2-5 of a claim (docs/keys.md): Activate ``uid`` if it is the only
        object of its Name; None if the claim is lost (the caller withdraws it)."""
        waited_since = time.monotonic()
        while True:
            others = [u for u in self._holders(name, version) if u != uid]
            if not others:
                # alone after our Create: any later claim's Locate sees ours
                answers = self._batch([
                    (_E.Operation.ACTIVATE, _P.ActivateRequestPayload(
                        unique_identifier=_UID(uid))),
                    (_E.Operation.GET_ATTRIBUTES, _P.GetAttributesRequestPayload(
                        unique_identifier=uid, attribute_names=["Initial Date"]))],
                    idempotent=False)
                if isinstance(answers[0], _Failed):
                    if answers[0].gone:  # taken for abandoned and destroyed
                        return None
                    raise self._unexpected(answers[0])
                created = None
                if not isinstance(answers[1], _Failed):
                    created = next((int(x.attribute_value.value)
                                    for x in answers[1].attributes), None)
                return _Obj(uid, name, version, _E.State.ACTIVE, created)
            desc = {o.uid: o for o in self._describe([uid, *others])}
            mine = desc.get(uid)
            if mine is None:  # taken for abandoned and destroyed
                return None
            rivals = [desc[u] for u in others if u in desc]
            if any(not o.claim for o in rivals):
                return None  # the version exists (Active, or retired)
            if mine.created is not None:
                reaped = self._reap(name, version, rivals, mine.created)
                rivals = [o for o in rivals if o.uid not in reaped]
            if any(_uid_order(o.uid) < _uid_order(uid) for o in rivals):
                return None  # a claim ordered before ours: let it finish
            if time.monotonic() - waited_since > self.claim_timeout + self.timeout:
                return None
            # the first live claim: wait for the others to withdraw
            time.sleep(random.uniform(0.005, 0.02))

    def _make_version(self, name: str, *, new: bool) -> KeyInfo:
        """create (``new``) or rotate: claim the next version until one is ours."""
        deadline = time.monotonic() + self.claim_budget
        attempt = 0
        while True:
            key = self._key(name, self._objects(name))
            if new and (key.active or key.retired):
                raise KeyExists(f"key {name!r} already exists on KMIP server {self.address}")
            if not new and not key.active:
                raise KeyNotFound(f"key {name!r} not found on KMIP server {self.address}")
            version = key.counted + 1
            obj = self._claim(name, version)
            if obj is not None:
                key.active[version] = obj
                return key.info(current=version)
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"KMIP server {self.address}: could not claim version {version} of key "
                    f"{name!r} in {self.claim_budget:.0f} s: other clients keep claiming it")
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** min(attempt, 6))))
            attempt += 1

    # ------------------------------------------------------------ KeyBackend API

    def create(self, name: str) -> KeyInfo:
        """Create key ``name`` (version 1); KeyExists if any version of it exists."""
        validate_key_name(name)
        self._check_open()
        with self._writes:
            info = self._make_version(name, new=True)
        log.info("created key %s version 1 on KMIP server %s", name, self.address)
        return info

    def rotate(self, name: str) -> KeyInfo:
        """Add version ``current + 1`` to ``name`` and make it current."""
        validate_key_name(name)
        self._check_open()
        with self._writes:
            info = self._make_version(name, new=False)
        log.info("rotated key %s to version %d on KMIP server %s", name,
                 info.current_version, self.address)
        return info

    def retire(self, name: str, version: int) -> KeyInfo:
        """Revoke and Destroy the object of ``version`` (its material is gone for good);
        the current version cannot be retired (``KeyInUse``)."""
        validate_key_name(name)
        if check_version(version) is None:
            raise UsageError("retire: give the version to retire")
        self._check_open()
        with self._writes:
            key = self._load(name)
            if not 1 <= version <= key.current:
                raise KeyNotFound(f"key {name!r} has no version {version} (versions "
                                  f"1-{key.current}) on KMIP server {self.address}")
            if version == key.current:
                raise KeyInUse(f"version {version} is the current version of key {name!r}: "
                               "rotate first")
            targets = [o for o in self._objects(name)
                       if o.version == version and not o.claim
                       and o.state not in (_E.State.DESTROYED,
                                           _E.State.DESTROYED_COMPROMISED)]
            refused: _Failed | None = None
            for o in targets:
                ops = [(_E.Operation.DESTROY, _P.DestroyRequestPayload(
                    unique_identifier=_UID(o.uid)))]
                if o.active:  # Active objects cannot be destroyed: revoke first
                    ops.insert(0, (_E.Operation.REVOKE, _P.RevokeRequestPayload(
                        unique_identifier=_UID(o.uid),
                        revocation_reason=_O.RevocationReason(
                            code=_E.RevocationReasonCode.CESSATION_OF_OPERATION))))
                for op in ops:
                    r = self._batch([op], idempotent=False)[0]
                    if isinstance(r, _Failed):
                        refused = r  # gone is fine (retired meanwhile), checked below
            key = self._load(name)
            if version in key.active:
                raise self._unexpected(refused) if refused else BackendUnavailable(
                    f"KMIP server {self.address}: version {version} of key {name!r} is "
                    "still active after Revoke and Destroy")
            info = key.info()
        if targets:
            log.info("retired version %d of key %s on KMIP server %s", version, name,
                     self.address)
        return info

    def get(self, name: str, version: int | None = None) -> bytearray:
        """The 32-byte material of ``name`` at ``version`` (None = current), in a new
        locked bytearray the caller wipes."""
        validate_key_name(name)
        check_version(version)
        self._check_open()
        if version is None:
            key = self._load(name)
            uid = key.active[key.current].uid
            out = self._material(uid)
            if out is None:  # pragma: no cover - the current version cannot be retired
                raise KeyNotFound(f"key {name!r} not found on KMIP server {self.address}")
            return out
        uids = self._locate(
            self._attr(_E.AttributeType.NAME, object_name(name, version)),
            self._attr(_E.AttributeType.OBJECT_GROUP, _group(name)),
            self._attr(_E.AttributeType.OBJECT_TYPE, _E.ObjectType.SYMMETRIC_KEY),
            self._attr(_E.AttributeType.STATE, _E.State.ACTIVE))
        if len(uids) > 1:
            raise KeystoreCorrupt(
                f"key {name!r} version {version} is held by {len(uids)} Active objects "
                f"(unique identifiers {', '.join(uids)}) on KMIP server {self.address}")
        if uids:
            out = self._material(uids[0])
            if out is not None:
                return out
        key = self._load(name)
        if 1 <= version <= key.current:
            raise KeyRetired(f"key {name!r} version {version} was retired (its material is "
                             f"destroyed) on KMIP server {self.address}")
        raise KeyNotFound(f"key {name!r} has no version {version} (versions "
                          f"1-{key.current}) on KMIP server {self.address}")

    def _material(self, uid: str) -> bytearray | None:
        """Get ``uid`` as a raw key; None if the object is gone."""
        payload = _P.GetRequestPayload(unique_identifier=uid,
                                       key_format_type=_E.KeyFormatType.RAW)
        data = self._message([(_E.Operation.GET, payload)])
        raw = self._roundtrip(data, "Get", idempotent=True)
        try:
            status = _get_answer(raw)
            if status is not None:  # an error: decode it with PyKMIP (no key in it)
                response = _M.ResponseMessage()
                response.read(_Stream(bytes(raw)), kmip_version=_E.KMIPVersion.KMIP_1_4)
                f = self._failure(_E.Operation.GET, response.batch_items[0])
                if f.gone:
                    return None
                raise self._unexpected(f)
            off, length, fmt = _key_material(raw)
            if fmt != _E.KeyFormatType.RAW.value or length != KEY_BYTES:
                raise KeystoreCorrupt(
                    f"object {uid} on KMIP server {self.address} is not a raw "
                    f"{KEY_BYTES * 8}-bit key (format {fmt}, {length} bytes)")
            out = bytearray(KEY_BYTES)
            lock(out)  # released by the caller's wipe()
            with memoryview(raw) as mv:
                out[:] = mv[off:off + KEY_BYTES]
            return out
        except ValueError as e:
            raise BackendUnavailable(f"KMIP server {self.address}: malformed answer to "
                                     f"Get: {e}") from None
        finally:
            wipe(raw)

    def info(self, name: str) -> KeyInfo:
        validate_key_name(name)
        self._check_open()
        return self._load(name).info()

    def list(self) -> list[KeyInfo]:  # noqa: A003
        self._check_open()
        by_name: dict[str, list[_Obj]] = {}
        for o in self._objects(None):
            by_name.setdefault(o.name, []).append(o)
        out = []
        for name in sorted(by_name):
            key = self._key(name, by_name[name])
            if key.active:
                out.append(key.info())
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._io:
            self._drop()

    # ------------------------------------------------------------------- extras

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<KmipBackend {getattr(self, 'host', '?')}:{getattr(self, 'port', '?')} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("KmipBackend objects cannot be pickled")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._drop()


# ------------------------------------------------------------- TTLV of Get's answer


def _ttlv(buf: bytearray, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(tag, type, value offset, value length) of the items in buf[start:end]."""
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated TTLV item")
        tag = int.from_bytes(buf[pos:pos + 3], "big")
        typ = buf[pos + 3]
        length = int.from_bytes(buf[pos + 4:pos + 8], "big")
        value = pos + 8
        if value + length > end:
            raise ValueError("TTLV item longer than its container")
        yield tag, typ, value, length
        pos = value + length + (-length % 8)


def _child(buf: bytearray, parent: tuple[int, int], tag: int, typ: int) -> tuple[int, int]:
    for t, ty, off, length in _ttlv(buf, parent[0], parent[0] + parent[1]):
        if t == tag:
            if ty != typ:
                raise ValueError(f"TTLV tag {tag:#x} has type {ty}")
            return off, length
    raise ValueError(f"TTLV tag {tag:#x} missing")


def _enum(buf: bytearray, where: tuple[int, int]) -> int:
    off, length = where
    if length != 4:
        raise ValueError("enumeration of the wrong length")
    return int.from_bytes(buf[off:off + 4], "big")


def _get_answer(buf: bytearray) -> int | None:
    """None if the (single) batch item of a Get answer succeeded, else its status."""
    msg = _child(buf, (0, len(buf)), _T_RESPONSE_MESSAGE, _TYPE_STRUCTURE)
    item = _child(buf, msg, _T_BATCH_ITEM, _TYPE_STRUCTURE)
    status = _enum(buf, _child(buf, item, _T_RESULT_STATUS, _TYPE_ENUMERATION))
    return None if status == _E.ResultStatus.SUCCESS.value else status


def _key_material(buf: bytearray) -> tuple[int, int, int]:
    """(offset, length, key format type) of the key material in a Get answer."""
    msg = _child(buf, (0, len(buf)), _T_RESPONSE_MESSAGE, _TYPE_STRUCTURE)
    item = _child(buf, msg, _T_BATCH_ITEM, _TYPE_STRUCTURE)
    payload = _child(buf, item, _T_RESPONSE_PAYLOAD, _TYPE_STRUCTURE)
    key = _child(buf, payload, _T_SYMMETRIC_KEY, _TYPE_STRUCTURE)
    block = _child(buf, key, _T_KEY_BLOCK, _TYPE_STRUCTURE)
    fmt = _enum(buf, _child(buf, block, _T_KEY_FORMAT_TYPE, _TYPE_ENUMERATION))
    value = _child(buf, block, _T_KEY_VALUE, _TYPE_STRUCTURE)
    off, length = _child(buf, value, _T_KEY_MATERIAL, _TYPE_BYTE_STRING)
    return off, length, fmt
