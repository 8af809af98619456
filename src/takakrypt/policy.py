"""The policy engine: who may do what on which guarded file.

A policy is an ordered list of rules; the first rule whose sets all match (and whose
actions include the requested one) decides; no match is deny.  A rule's sets may be
negated ("!name").  Within a process set every criterion given must hold (executable
glob, name, SHA-256, database type), any value within a criterion will do.

This is the only place with policy logic: the FUSE path and the kernel ask through the
agent and cache what it answers (the C decision cache, keyed by caller identity,
path and action, invalidated by a generation number bumped on every reload).

Every decision can be explained: the matching rule, and for each earlier rule the
sets (or the action) that did not match.
"""

from __future__ import annotations

import datetime as dt
import grp
import pwd
import re
import zoneinfo
from dataclasses import dataclass, field
from functools import lru_cache

from . import config as C
from .procinfo import ExeHasher, Process, caller_can_modify

# ---------------------------------------------------------------------------------------
# globs


def glob_to_regex(pattern: str, *, subdirectories: bool = False) -> re.Pattern[str]:
    """``*`` and ``?`` stay within one path component, ``**`` crosses components;
    ``[...]`` classes as in fnmatch.  ``subdirectories`` also matches anything below a
    path that matches."""
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i:i + 2] == "**":
                i += 2
                if pattern[i:i + 1] == "/":  # "**/" matches zero or more directories
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    tail = "(?:/.*)?" if subdirectories else ""
    return re.compile("".join(out) + tail + r"\Z", re.DOTALL)


# ---------------------------------------------------------------------------------------
# request and decision


@dataclass(frozen=True, slots=True)
class Request:
    """One access to decide.  ``path`` is relative to the guard point ("" = its root)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    process: Process
    path: str
    action: str
    when: dt.datetime | None = None  # None = now


@dataclass(slots=True)
class Decision:
    policy: str
    rule: int                      # index of the deciding rule, -1 = no rule matched
    effects: frozenset[str]
    permit: bool                   # what the enforcement point does
    apply_key: bool                # plaintext view (else raw ciphertext if permitted)
    audit: bool                    # write an audit event
    learn_mode: bool = False
    would_deny: bool = False       # learn mode turned a deny into a permit
    cache_ttl: float | None = None  # None: the configured TTL; else a shorter bound
    any_path: bool = False         # no resource set took part: the same for every path
    any_process: bool = False      # the policy is process-free: the same for every
    #                                process of this uid and gid (Engine.process_free)
    explanation: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.would_deny:
            return "would-deny"
        return "permit" if self.permit else "deny"

    def as_dict(self) -> dict[str, object]:
        return {"decision": self.verdict, "policy": self.policy, "rule": self.rule,
                "effects": sorted(self.effects), "permit": self.permit,
                "apply_key": self.apply_key, "audit": self.audit,
                "learn_mode": self.learn_mode, "explanation": self.explanation}


# ---------------------------------------------------------------------------------------
# compiled sets


@lru_cache(maxsize=4096)
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def user_label(uid: int) -> str:
    n = _user_name(uid)
    return f"uid {uid} ({n})" if n else f"uid {uid}"


class _UserSet:
    def __init__(self, name: str, us: C.UserSet) -> None:
        self.name = name
        self.uids = {u for u in us.users if isinstance(u, int)}
        self.unames = {u for u in us.users if isinstance(u, str)}
        self.gids = {g for g in us.groups if isinstance(g, int)}
        self.gnames = {g for g in us.groups if isinstance(g, str)}
        for n in list(self.unames):  # resolve what exists now; the rest by name at match
            try:
                self.uids.add(pwd.getpwnam(n).pw_uid)
            except KeyError:
                pass
        for n in list(self.gnames):
            try:
                self.gids.add(grp.getgrnam(n).gr_gid)
            except KeyError:
                pass

    def match(self, req: Request) -> bool:
        if req.uid in self.uids:
            return True
        groups = (req.gid, *req.groups)
        if self.gids.intersection(groups):
            return True
        if self.unames and _user_name(req.uid) in self.unames:
            return True
        return bool(self.gnames) and any(_group_name(g) in self.gnames for g in groups)

    def why_not(self, req: Request) -> str:
        return f"{user_label(req.uid)} with groups {sorted({req.gid, *req.groups})} not in " \
               f"user set {self.name}"


class _ProcessSet:
    def __init__(self, name: str, ps: C.ProcessSet, hasher: ExeHasher) -> None:
        self.name = name
        self.exe = [glob_to_regex(e) for e in ps.executables]
        self.names = set(ps.names)
        self.sha = {h.lower() for h in ps.sha256}
        self.dbs = set(ps.databases)
        self.hasher = hasher

    def failing(self, req: Request) -> str | None:
        """None if the caller is in the set, else the first criterion it fails."""
        p = req.process
        if self.exe and not any(r.match(p.exe) for r in self.exe):
            return f"executable {p.exe or '?'} not matched"
        if self.names and p.comm not in self.names and \
                not (p.cmdline and p.cmdline[0].rsplit("/", 1)[-1] in self.names):
            return f"process name {p.comm!r} not listed"
        if self.dbs and p.database not in self.dbs:
            return f"database type {p.database or 'none'} not listed"
        if self.sha:
            # a binary its caller can rewrite proves nothing about the code it runs next
            if caller_can_modify(p, req.uid, req.gid, req.groups):
                return f"executable {p.exe or '?'} can be modified by the caller: its " \
                       "signature is not trusted"
            digest = self.hasher.sha256(p)
            if digest not in self.sha:
                return f"executable signature {digest[:16] + '…' if digest else 'unreadable'} " \
                       "does not match"
        return None

    def match(self, req: Request) -> bool:
        return self.failing(req) is None

    def why_not(self, req: Request) -> str:
        return f"process set {self.name}: {self.failing(req)}"


class _ResourceSet:
    def __init__(self, name: str, rs: C.ResourceSet) -> None:
        self.name = name
        self.res = [glob_to_regex(p.strip("/"), subdirectories=rs.subdirectories)
                    for p in rs.paths]

    def match(self, req: Request) -> bool:
        return any(r.match(req.path) for r in self.res)

    def why_not(self, req: Request) -> str:
        return f"path {req.path or '.'!r} not in resource set {self.name}"


_DAY_INDEX = {d: i for i, d in enumerate(C.DAYS)}


class _TimeSet:
    def __init__(self, name: str, ts: C.TimeSet) -> None:
        self.name = name
        self.days = {_DAY_INDEX[d.lower()] for d in ts.days}
        self.start, self.end = C.parse_hhmm(ts.start), C.parse_hhmm(ts.end)
        self.tz = zoneinfo.ZoneInfo(ts.timezone)
        self.tzname = ts.timezone

    def _local(self, when: dt.datetime) -> dt.datetime:
        return when.astimezone(self.tz)

    def match_at(self, when: dt.datetime) -> bool:
        t = self._local(when)
        minute, day = t.hour * 60 + t.minute, t.weekday()
        if self.start <= self.end:
            return day in self.days and self.start <= minute < self.end
        # overnight window: the part after midnight belongs to the day it started on
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days

    def seconds_to_boundary(self, when: dt.datetime) -> float:
        """Seconds until the next start/end/midnight in the set's timezone (a cached
        decision that consulted this set must not live past it)."""
        t = self._local(when)
        now_s = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
        marks = [self.start * 60, self.end * 60, 86400]
        return min(m - now_s for m in marks if m - now_s > 0)

    def match(self, req: Request) -> bool:
        return self.match_at(req.when or dt.datetime.now(dt.timezone.utc))

    def why_not(self, req: Request) -> str:
        t = self._local(req.when or dt.datetime.now(dt.timezone.utc))
        return f"{t:%a %H:%M} {self.tzname} outside time set {self.name}"


class _Rule:
    def __init__(self, index: int, rule: C.Rule, sets: dict[str, dict[str, object]]) -> None:
        self.index = index
        self.actions = C.expand_actions(rule.actions)
        self.effects = frozenset(rule.effects)
        self.checks: list[tuple[str, object, bool]] = []  # (kind, set, negated)
        for kind, ref in (("user_set", rule.user_set), ("process_set", rule.process_set),
                          ("resource_set", rule.resource_set), ("time_set", rule.time_set)):
            if ref is None:
                continue
            neg = ref.startswith("!")
            self.checks.append((kind, sets[kind][ref[1:] if neg else ref], neg))
        # cheap checks first; process sets may hash an executable
        order = {"user_set": 0, "resource_set": 1, "time_set": 2, "process_set": 3}
        self.checks.sort(key=lambda c: order[c[0]])
        self.uses_time = any(k == "time_set" for k, _, _ in self.checks)
        self.uses_path = any(k == "resource_set" for k, _, _ in self.checks)

    def matches(self, req: Request) -> bool:
        if req.action not in self.actions:
            return False
        for _kind, s, neg in self.checks:
            if s.match(req) == neg:  # type: ignore[attr-defined]
                return False
        return True

    def matches_but_path(self, req: Request) -> bool:
        """Whether everything but the resource set matches (another path could)."""
        if req.action not in self.actions:
            return False
        return all(s.match(req) != neg  # type: ignore[attr-defined]
                   for kind, s, neg in self.checks if kind != "resource_set")

    def reasons(self, req: Request) -> list[str]:
        out = []
        if req.action not in self.actions:
            out.append(f"action {req.action} not in {sorted(self.actions)}")
        for _kind, s, neg in self.checks:
            m = s.match(req)  # type: ignore[attr-defined]
            if m == neg:
                out.append(f"caller is in {s.name}, which the rule excludes" if neg  # type: ignore[attr-defined]
                           else s.why_not(req))  # type: ignore[attr-defined]
        return out


#: actions whose decision picks the view of a regular file (plaintext with apply_key,
#: the stored bytes without): the data path routes a caller by read, write, getattr,
#: creates by create, and requires the view for append and truncate
VIEW_ACTIONS = frozenset({"read", "write", "append", "truncate", "create", "getattr"})


class CompiledPolicy:
    def __init__(self, name: str, pol: C.Policy, sets: dict[str, dict[str, object]]) -> None:
        self.name = name
        self.learn_mode = pol.learn_mode
        self.rules = [_Rule(i, r, sets) for i, r in enumerate(pol.rules)]


# ---------------------------------------------------------------------------------------
# the engine


class Engine:
    """Evaluates requests against the policies of one configuration.

    Thread-safe for concurrent ``evaluate`` calls (compiled state is read-only; the
    executable hash cache has its own lock).  A reload builds a new Engine.
    """

    def __init__(self, cfg: C.Config, *, hasher: ExeHasher | None = None) -> None:
        self.config = cfg
        self.hasher = hasher or ExeHasher()
        sets: dict[str, dict[str, object]] = {
            "user_set": {n: _UserSet(n, s) for n, s in cfg.user_sets.items()},
            "process_set": {n: _ProcessSet(n, s, self.hasher)
                            for n, s in cfg.process_sets.items()},
            "resource_set": {n: _ResourceSet(n, s) for n, s in cfg.resource_sets.items()},
            "time_set": {n: _TimeSet(n, s) for n, s in cfg.time_sets.items()},
        }
        self.policies = {n: CompiledPolicy(n, p, sets) for n, p in cfg.policies.items()}
        self._process_free: dict[str, bool] = {}

    def evaluate(self, policy: str, req: Request, *, explain: bool = False) -> Decision:
        pol = self.policies[policy]
        if req.action not in C.ACTIONS:
            raise ValueError(f"unknown action {req.action!r}")
        if not req.process.exe:
            return self._refuse(pol, "caller has no executable (a kernel thread, or it "
                                "exited): it cannot be identified", explain)
        d = self._evaluate(pol, req, explain)
        if d.apply_key and req.process.tracer:
            return self._refuse(pol, f"caller is traced by pid {req.process.tracer}: no "
                                "plaintext for a process whose memory another reads",
                                explain)
        d.any_process = self.process_free(policy)
        return d

    @staticmethod
    def _refuse(pol: CompiledPolicy, why: str, explain: bool) -> Decision:
        """A deny that no rule and no learn mode can turn into a permit, for a caller
        whose identity cannot be relied on; never cached (cache_ttl 0)."""
        return Decision(policy=pol.name, rule=-1, effects=frozenset({"deny"}), permit=False,
                        apply_key=False, audit=True, learn_mode=pol.learn_mode, cache_ttl=0.0,
                        explanation=[why] if explain else [])

    def _evaluate(self, pol: CompiledPolicy, req: Request, explain: bool) -> Decision:
        if req.when is None and any(r.uses_time for r in pol.rules):
            req = Request(req.uid, req.gid, req.groups, req.process, req.path, req.action,
                          dt.datetime.now(dt.timezone.utc))
        notes: list[str] = []
        ttl: float | None = None
        # any_path: the outcome cannot change with the path (for this caller, action and
        # time) as long as no rule with a resource set decided, or was kept from deciding
        # by its resource set alone
        any_path = True
        for rule in pol.rules:
            if rule.uses_time:
                for kind, s, _neg in rule.checks:
                    if kind == "time_set":
                        b = s.seconds_to_boundary(req.when)  # type: ignore[attr-defined, arg-type]
                        ttl = b if ttl is None else min(ttl, b)
            if rule.matches(req):
                if explain:
                    notes.append(f"rule {rule.index} matched: effects "
                                 f"{', '.join(sorted(rule.effects))}")
                return self._decide(pol, rule.index, rule.effects, notes, ttl,
                                    any_path and not rule.uses_path)
            if any_path and rule.uses_path and rule.matches_but_path(req):
                any_path = False
            if explain:
                notes.append(f"rule {rule.index} skipped: " + "; ".join(rule.reasons(req)))
        if explain:
            notes.append("no rule matched: default deny")
        return self._decide(pol, -1, frozenset({"deny"}), notes, ttl, any_path)

    def metadata_hints(self, policy: str) -> tuple[bool, bool]:
        """Two facts about ``policy`` that hold for every caller, path and time, which
        let the data path have the kernel keep more (docs/guard-points.md, "Policy
        hints"):

        * ``plain_only``: no rule grants the raw view (every permit of an action that
          chooses a regular file's view — :data:`VIEW_ACTIONS` — applies the key), so
          every caller permitted a regular file reaches the same plaintext node;
        * ``getattr_all``: every caller is permitted getattr on every path, unaudited:
          the first rule that can decide getattr for everyone permits it without
          ``audit``, and no rule before it denies or audits getattr.  Not in learn mode
          (its would-deny events must be written).
        """
        pol = self.policies[policy]
        plain_only = all("apply_key" in r.effects for r in pol.rules
                         if "permit" in r.effects and r.actions & VIEW_ACTIONS)
        getattr_all = False
        if not pol.learn_mode:
            for r in pol.rules:
                if "getattr" not in r.actions:
                    continue
                if "permit" not in r.effects or "audit" in r.effects:
                    break
                if not r.checks:
                    getattr_all = True
                    break
        return plain_only, plain_only and getattr_all

    def process_free(self, policy: str) -> bool:
        """Whether ``policy`` decides on the caller's uid and primary gid alone (with
        path, action and time): no rule has a process set, and no user set a rule
        refers to lists groups (a group matches supplementary groups too, which only
        /proc tells).  The data path then identifies no process per request and caches
        decisions per uid/gid (docs/guard-points.md, "Policy hints")."""
        known = self._process_free.get(policy)
        if known is not None:
            return known
        pol = self.policies[policy]
        free = not any(kind == "process_set" or (kind == "user_set" and (
            s.gids or s.gnames))  # type: ignore[attr-defined]
            for r in pol.rules for kind, s, _neg in r.checks)
        self._process_free[policy] = free
        return free

    @staticmethod
    def _decide(pol: CompiledPolicy, index: int, effects: frozenset[str], notes: list[str],
                ttl: float | None, any_path: bool) -> Decision:
        permit = "permit" in effects
        d = Decision(policy=pol.name, rule=index, effects=effects, permit=permit,
                     apply_key=permit and "apply_key" in effects,
                     audit="audit" in effects or not permit, learn_mode=pol.learn_mode,
                     cache_ttl=ttl, any_path=any_path, explanation=notes)
        if not permit and pol.learn_mode:
            # learn mode: log what deny would have done, then let the access through
            # with the plaintext view a permit+apply_key rule would give
            d.would_deny, d.permit, d.apply_key, d.audit = True, True, True, True
        return d

