"""Serialisations of :class:`~takakrypt.audit.event.Event`: JSON line, CEF, RFC 5424.

All functions are pure and thread-safe.  Examples of each format are in docs/audit.md.

* **JSON** (:func:`to_json`): one object per line, keys in ``Event`` field order,
  ``msgspec.json`` encoding (control characters escaped, so a line never breaks).
* **CEF** (:func:`to_cef`): ArcSight Common Event Format rev. 25::

      CEF:0|Takakrypt|Takakrypt|<version>|<signature id>|<name>|<severity>|<extension>

  Header fields escape ``\\`` and ``|``; extension values escape ``\\``, ``=``, and
  CR/LF as ``\\r``/``\\n``.  Extension keys are listed in :data:`CEF_KEYS`.
* **RFC 5424** (:func:`to_syslog`)::

      <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [takakrypt@32473 k="v" ...] MSG

  PRI = facility * 8 + severity (severity from the decision, :func:`syslog_severity`),
  MSGID = event kind, MSG = the JSON or CEF body.  SD param values escape ``"``, ``\\``
  and ``]`` with a backslash.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Callable, Literal

import msgspec

from .. import __version__
from .event import (
    ACCESS,
    COALESCED,
    CONFIG_RELOAD,
    DROPPED,
    INTEGRITY,
    KEY_REQUEST,
    PEER_REFUSED,
    RATE_LIMITED,
    Event,
    parse_rfc3339,
    sanitize,
)

__all__ = [
    "CEF_KEYS",
    "FACILITIES",
    "SD_ID",
    "BodyFormat",
    "body_encoder",
    "cef_escape_ext",
    "cef_escape_header",
    "cef_severity",
    "cef_signature",
    "from_json",
    "parse_facility",
    "sd_escape",
    "syslog_severity",
    "to_cef",
    "to_json",
    "to_syslog",
]

BodyFormat = Literal["json", "cef"]

# ---------------------------------------------------------------------------- JSON

_json_decoder = msgspec.json.Decoder(Event)


def to_json(event: Event) -> bytes:
    """The event as one JSON object, without the trailing newline."""
    try:
        return msgspec.json.encode(event)
    except UnicodeEncodeError:  # lone surrogates from an undecodable file name
        return msgspec.json.encode(sanitize(event))


def from_json(line: bytes | str) -> Event:
    """Parse one JSON line back into an :class:`Event` (msgspec.ValidationError if bad)."""
    return _json_decoder.decode(line)


# ----------------------------------------------------------------------------- CEF

CEF_VENDOR = "Takakrypt"
CEF_PRODUCT = "Takakrypt"

#: (signature id, name, CEF severity 0-10) per decision / system kind
_ACCESS_SIG = {
    "permit": ("1000", "access permitted", 3),
    "deny": ("1001", "access denied", 7),
    "would-deny": ("1002", "access would be denied (learn mode)", 5),
    "error": ("1003", "access failed", 7),
}
_ACCESS_OTHER = ("1099", "access", 5)
_SYSTEM_SIG = {
    DROPPED: ("2001", "audit events dropped", 6),
    CONFIG_RELOAD: ("2002", "configuration reloaded", 3),
    INTEGRITY: ("2003", "integrity failure", 9),
    COALESCED: ("2004", "repeated events coalesced", 5),
    RATE_LIMITED: ("2005", "events held back by the rate limit", 6),
    PEER_REFUSED: ("2008", "protocol peer refused", 7),
}
#: key-request events: by decision
_KEY_SIG = {"permit": ("2006", "key released", 5)}
_KEY_REFUSED = ("2007", "key request refused", 7)

#: extension key -> meaning (custom slots csN/cnN/cfpN carry a csNLabel naming the field)
CEF_KEYS: dict[str, str] = {
    "rt": "time, milliseconds since the epoch",
    "dvchost": "host",
    "cat": "kind",
    "act": "decision",
    "outcome": "success (permit) / failure (deny, would-deny, error) for access events",
    "suid": "uid",
    "suser": "user",
    "spid": "pid",
    "sproc": "exe",
    "fname": "path",
    "msg": "reason",
    "cs1": "policy (cs1Label=policy)",
    "cs2": "key (cs2Label=key)",
    "cs3": "groups, comma separated (cs3Label=groups)",
    "cs4": "effects, comma separated (cs4Label=effects)",
    "cs5": "operation (cs5Label=operation)",
    "cs6": "detail as compact JSON (cs6Label=detail)",
    "cn1": "rule (cn1Label=rule)",
    "cn2": "key_version (cn2Label=keyVersion)",
    "cn3": "learn_mode 1/0 (cn3Label=learnMode)",
    "cfp1": "latency_us (cfp1Label=latencyUs)",
}


def cef_signature(event: Event) -> tuple[str, str, int]:
    """(signature id, name, severity) of ``event``."""
    if event.kind == ACCESS:
        return _ACCESS_SIG.get(event.decision, _ACCESS_OTHER)
    if event.kind == KEY_REQUEST:
        return _KEY_SIG.get(event.decision, _KEY_REFUSED)
    return _SYSTEM_SIG.get(event.kind, ("2099", event.kind, 5))


def has_caller(event: Event) -> bool:
    """Access events, and system events that name a caller (``uid`` >= 0)."""
    return event.kind == ACCESS or event.uid >= 0


def cef_severity(event: Event) -> int:
    return cef_signature(event)[2]


def cef_escape_header(value: str) -> str:
    """Escape a CEF header field: ``\\`` and ``|``; line breaks become spaces (the
    header must stay on one line and CEF defines no escape for them there)."""
    return (
        value.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("\r", " ")
        .replace("\n", " ")
    )


_EXT_ESCAPES = str.maketrans({"\\": "\\\\", "=": "\\=", "\n": "\\n", "\r": "\\r"})


def cef_escape_ext(value: str) -> str:
    """Escape a CEF extension value: ``\\``, ``=``, and CR/LF as ``\\r``/``\\n``."""
    return value.translate(_EXT_ESCAPES)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _epoch_ms(ts: str) -> int | None:
    try:
        return (parse_rfc3339(ts) - _EPOCH) // timedelta(milliseconds=1)
    except (ValueError, OverflowError):
        return None


def to_cef(event: Event) -> str:
    """The event as one CEF line (no trailing newline).  Empty strings and None values
    are left out of the extension."""
    event = sanitize(event)
    sig, name, sev = cef_signature(event)
    header = "|".join(
        [
            "CEF:0",
            cef_escape_header(CEF_VENDOR),
            cef_escape_header(CEF_PRODUCT),
            cef_escape_header(__version__),
            cef_escape_header(sig),
            cef_escape_header(name),
            str(sev),
        ]
    )
    ext: list[tuple[str, str]] = []
    rt = _epoch_ms(event.time)
    if rt is not None:
        ext.append(("rt", str(rt)))
    ext.append(("dvchost", event.host))
    ext.append(("cat", event.kind))
    if has_caller(event):
        ext.append(("act", event.decision))
        if event.kind == ACCESS:
            ext.append(("outcome", "success" if event.decision == "permit" else "failure"))
        ext.append(("suid", str(event.uid)))
        ext.append(("suser", event.user))
        ext.append(("spid", str(event.pid)))
        ext.append(("sproc", event.exe))
    ext.append(("fname", event.path))
    ext.append(("msg", event.reason))
    def custom(slot: str, label: str, value: str | None) -> None:
        if value:
            ext.append((slot, value))
            ext.append((slot + "Label", label))

    if has_caller(event):
        custom("cs1", "policy", event.policy)
        custom("cs2", "key", event.key)
        custom("cs3", "groups", ",".join(event.groups))
        custom("cs4", "effects", ",".join(event.effects))
        custom("cs5", "operation", event.operation)
        custom("cn1", "rule", str(event.rule))
        if event.key_version is not None:
            custom("cn2", "keyVersion", str(event.key_version))
    if event.kind == ACCESS:
        custom("cn3", "learnMode", "1" if event.learn_mode else "0")
        custom("cfp1", "latencyUs", repr(event.latency_us))
    if event.detail is not None:
        custom("cs6", "detail", msgspec.json.encode(event.detail).decode())
    body = " ".join(f"{k}={cef_escape_ext(v)}" for k, v in ext if v)
    return f"{header}|{body}"


# ------------------------------------------------------------------------ RFC 5424

#: our SD-ID: the private enterprise number used by RFC 5424's own examples
SD_ID = "takakrypt@32473"

FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12,
    "audit": 13, "security": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}

#: syslog severities (0 emerg ... 7 debug) per decision / system kind
_ACCESS_SEVERITY = {"permit": 6, "would-deny": 5, "deny": 4, "error": 3}
_SYSTEM_SEVERITY = {DROPPED: 4, CONFIG_RELOAD: 5, INTEGRITY: 2, COALESCED: 5, RATE_LIMITED: 4,
                    PEER_REFUSED: 4}


def parse_facility(value: str | int) -> int:
    """A facility name (``"local0"``, ``"authpriv"``, ...) or number 0-23 -> number."""
    if isinstance(value, bool):
        raise ValueError(f"invalid syslog facility {value!r}")
    if isinstance(value, int):
        if 0 <= value <= 23:
            return value
        raise ValueError(f"syslog facility must be 0-23, got {value}")
    try:
        return FACILITIES[value.lower()]
    except KeyError:
        raise ValueError(
            f"unknown syslog facility {value!r} (one of {', '.join(FACILITIES)})"
        ) from None


def syslog_severity(event: Event) -> int:
    if event.kind == ACCESS:
        return _ACCESS_SEVERITY.get(event.decision, 5)
    if event.kind == KEY_REQUEST:
        return 5 if event.decision == "permit" else 4
    return _SYSTEM_SEVERITY.get(event.kind, 5)


def sd_escape(value: str) -> str:
    """Escape an SD-PARAM value (RFC 5424 section 6.3.3): ``"``, ``\\`` and ``]``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def _header_field(value: str, maxlen: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII, at most ``maxlen``, ``-`` when empty."""
    value = _NOT_PRINTUSASCII.sub("_", value)[:maxlen]
    return value or "-"


def _sd_params(event: Event) -> list[tuple[str, str]]:
    p = [("kind", event.kind)]
    if has_caller(event):
        p += [
            ("decision", event.decision),
            ("op", event.operation),
            ("uid", str(event.uid)),
            ("user", event.user),
            ("pid", str(event.pid)),
            ("exe", event.exe),
            ("path", event.path),
            ("policy", event.policy),
            ("rule", str(event.rule)),
        ]
        if event.key is not None:
            p.append(("key", event.key))
        if event.key_version is not None:
            p.append(("keyVersion", str(event.key_version)))
        if event.kind == ACCESS:
            p.append(("learn", "1" if event.learn_mode else "0"))
        else:
            p.append(("reason", event.reason))
    else:
        p.append(("reason", event.reason))
        if event.path:
            p.append(("path", event.path))
    return p


def body_encoder(fmt: BodyFormat) -> Callable[[Event], bytes]:
    """The body serialiser for ``fmt`` (``"json"`` or ``"cef"``), as bytes."""
    if fmt == "json":
        return to_json
    if fmt == "cef":
        return lambda e: to_cef(e).encode("utf-8")
    raise ValueError(f"unknown audit format {fmt!r} (json or cef)")


def to_syslog(
    event: Event,
    *,
    body: BodyFormat = "json",
    facility: int = FACILITIES["local0"],
    app_name: str = "takakrypt",
    procid: int | str | None = None,
) -> bytes:
    """The event as one RFC 5424 message (UTF-8, no framing, no trailing newline)."""
    event = sanitize(event)
    pri = facility * 8 + syslog_severity(event)
    sd = " ".join(f'{k}="{sd_escape(v)}"' for k, v in _sd_params(event))
    head = " ".join(
        [
            f"<{pri}>1",
            _header_field(event.time, 64),
            _header_field(event.host, 255),
            _header_field(app_name, 48),
            _header_field("" if procid is None else str(procid), 128),
            _header_field(event.kind, 32),
            f"[{SD_ID} {sd}]",
        ]
    )
    return head.encode("utf-8") + b" " + body_encoder(body)(event)
