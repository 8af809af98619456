"""The audit event: one record per audited policy decision or system happening.

An :class:`Event` is immutable and carries only names, numbers and paths: NEVER key
material.  ``kind == "access"`` events come from the policy engine (one per decision
whose rule says ``audit``, and one per deny); the other kinds (``"dropped"``,
``"config-reload"``, ``"integrity"``, ...) are *system* events emitted by the agent.

Every field is documented in docs/audit.md.  Build events with :func:`access_event`
and :func:`system_event` rather than by hand: they fill ``time`` and ``host``.
"""

from __future__ import annotations

import grp
import pwd
import socket
import time as _time
from datetime import datetime, timezone
from functools import lru_cache
from typing import Iterable, Union

import msgspec

__all__ = [
    "ACCESS",
    "DROPPED",
    "COALESCED",
    "CONFIG_RELOAD",
    "INTEGRITY",
    "KEY_REQUEST",
    "PEER_REFUSED",
    "RATE_LIMITED",
    "DetailValue",
    "Event",
    "access_event",
    "clean_text",
    "dropped_event",
    "group_names",
    "hostname",
    "now_rfc3339",
    "parse_rfc3339",
    "sanitize",
    "system_event",
    "user_name",
]

#: event kinds
ACCESS = "access"
DROPPED = "dropped"
CONFIG_RELOAD = "config-reload"
INTEGRITY = "integrity"
#: a KEY_REQUEST (or refused ENCRYPT/DECRYPT) on the protocol: key name, version, peer
KEY_REQUEST = "key-request"
#: a peer the protocol socket refused (SO_PEERCRED: not root)
PEER_REFUSED = "peer-refused"
#: summary of repeated identical events (audit/coalesce.py)
COALESCED = "coalesced"
#: summary of a caller's events held back by the per-caller rate limit
RATE_LIMITED = "rate-limited"

#: values allowed in ``Event.detail`` (kept flat so every format can carry it)
DetailValue = Union[str, int, float, bool, None]


class Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One audit record.  Field order is the JSON key order."""

    #: RFC 3339 UTC with microseconds, e.g. ``2026-11-21T23:59:01.123456Z``
    time: str
    #: ``"access"`` for policy decisions, else a system event kind
    kind: str = ACCESS
    #: host name of the machine running the agent
    host: str = ""
    #: caller's (effective) uid, -1 if unknown or not applicable
    uid: int = -1
    #: user name of ``uid`` (the number as text when it has no name)
    user: str = ""
    #: caller's groups, names where known, else gids as text
    groups: list[str] = []
    #: caller's process id, 0 if not applicable
    pid: int = 0
    #: caller's executable path
    exe: str = ""
    #: the file path inside the guard point
    path: str = ""
    #: operation, e.g. ``"read"``, ``"write"``, ``"open"``, ``"rename"``
    operation: str = ""
    #: ``"permit"``, ``"deny"``, ``"would-deny"`` (learn mode), ``"error"``; ``""``
    #: for system events
    decision: str = ""
    #: effects of the matched rule: any of permit, deny, apply_key, audit
    effects: list[str] = []
    #: policy name ("" when no policy applies)
    policy: str = ""
    #: index of the matched rule in the policy, -1 when no rule matched
    rule: int = -1
    #: name of the key applied, if any
    key: str | None = None
    #: version of the key applied, if any
    key_version: int | None = None
    #: the decision was taken in learn mode (deny is logged, not enforced)
    learn_mode: bool = False
    #: time the decision took, microseconds
    latency_us: float = 0.0
    #: short human-readable reason, e.g. ``"no rule matched (default deny)"``
    reason: str = ""
    #: optional extra data, flat ``name -> scalar`` (e.g. ``{"count": 17}``)
    detail: dict[str, DetailValue] | None = None


def clean_text(s: str) -> str:
    """``s`` made encodable as UTF-8.

    File names on Linux are bytes; Python hands undecodable bytes over as lone
    surrogates (``os.fsdecode``: ``b"\\xff"`` -> ``"\\udcff"``), which no format can carry.
    Such bytes become the text ``\\xff``; any other lone surrogate becomes ``\\ud800``.
    A file named to break the encoder must not escape the audit trail.
    """
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


_STR_FIELDS = ("time", "kind", "host", "user", "exe", "path", "operation", "decision",
               "policy", "reason")


def sanitize(event: Event) -> Event:
    """``event`` itself if every text in it is valid UTF-8, else a copy passed through
    :func:`clean_text` (the formats call this; the helpers below do too)."""
    changes: dict[str, object] = {}
    for f in _STR_FIELDS:
        v = getattr(event, f)
        c = clean_text(v)
        if c is not v:
            changes[f] = c
    if event.key is not None and clean_text(event.key) is not event.key:
        changes["key"] = clean_text(event.key)
    for f in ("groups", "effects"):
        lst = getattr(event, f)
        cl = [clean_text(x) for x in lst]
        if any(a is not b for a, b in zip(cl, lst)):
            changes[f] = cl
    if event.detail:
        items = [(clean_text(k), clean_text(v) if isinstance(v, str) else v, k, v)
                 for k, v in event.detail.items()]
        if any(ck is not k or cv is not v for ck, cv, k, v in items):
            changes["detail"] = {ck: cv for ck, cv, _, _ in items}
    return msgspec.structs.replace(event, **changes) if changes else event


def now_rfc3339(t: float | None = None) -> str:
    """``t`` (seconds since the epoch, default now) as RFC 3339 UTC with microseconds."""
    if t is None:
        t = _time.time()
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(s: str) -> datetime:
    """Inverse of :func:`now_rfc3339` (accepts ``Z`` or a numeric offset).

    Raises ValueError on anything else.
    """
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        raise ValueError("timestamp without time zone")
    return dt


@lru_cache(maxsize=1)
def hostname() -> str:
    """This machine's host name (cached; the agent does not follow renames)."""
    return socket.gethostname() or "localhost"


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    """Name of ``uid``, or the number as text when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


@lru_cache(maxsize=4096)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return str(gid)


def group_names(gids: Iterable[int]) -> list[str]:
    """Names of ``gids`` (gid as text for those without a name), in order."""
    return [_group_name(g) for g in gids]


def access_event(
    *,
    uid: int,
    pid: int,
    exe: str,
    path: str,
    operation: str,
    decision: str,
    effects: Iterable[str] = (),
    policy: str = "",
    rule: int = -1,
    key: str | None = None,
    key_version: int | None = None,
    learn_mode: bool = False,
    latency_us: float = 0.0,
    reason: str = "",
    user: str | None = None,
    groups: Iterable[str | int] = (),
    host: str | None = None,
    time: str | None = None,
    detail: dict[str, DetailValue] | None = None,
) -> Event:
    """An ``"access"`` event for one policy decision.

    ``user`` defaults to the name of ``uid``; ``groups`` may mix names and gids (gids
    are resolved to names); ``time`` defaults to now and ``host`` to :func:`hostname`.
    """
    return sanitize(Event(
        time=time or now_rfc3339(),
        kind=ACCESS,
        host=host or hostname(),
        uid=uid,
        user=user_name(uid) if user is None else user,
        groups=[_group_name(g) if isinstance(g, int) else g for g in groups],
        pid=pid,
        exe=exe,
        path=path,
        operation=operation,
        decision=decision,
        effects=list(effects),
        policy=policy,
        rule=rule,
        key=key,
        key_version=key_version,
        learn_mode=learn_mode,
        latency_us=float(latency_us),
        reason=reason,
        detail=detail,
    ))


def system_event(
    kind: str,
    reason: str,
    *,
    detail: dict[str, DetailValue] | None = None,
    path: str = "",
    host: str | None = None,
    time: str | None = None,
    uid: int = -1,
    pid: int = 0,
    exe: str = "",
    operation: str = "",
    decision: str = "",
    key: str | None = None,
    key_version: int | None = None,
) -> Event:
    """A system event (``kind`` is not ``"access"``), e.g. ``"config-reload"``.

    ``uid`` >= 0 names a caller (``key-request``, ``peer-refused``); those other than
    ``key-request`` are coalesced and rate limited like access events (docs/audit.md)."""
    if kind == ACCESS:
        raise ValueError("system_event() kind must not be 'access'")
    return sanitize(Event(
        time=time or now_rfc3339(),
        kind=kind,
        host=host or hostname(),
        uid=uid,
        user=user_name(uid) if uid >= 0 else "",
        pid=pid,
        exe=exe,
        path=path,
        operation=operation,
        decision=decision,
        key=key,
        key_version=key_version,
        reason=reason,
        detail=detail,
    ))


def dropped_event(count: int, *, host: str | None = None) -> Event:
    """The ``"dropped N events"`` system event the logger writes after a queue overflow."""
    return system_event(
        DROPPED,
        f"dropped {count} events",
        detail={"count": count},
        host=host,
    )
