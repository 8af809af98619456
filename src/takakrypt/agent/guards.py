"""Guard points served by the agent: the FUSE data path wired to the agent's policy
engine, key manager and audit trail.

The data path calls back (from its own C threads, with the GIL) on decision-cache
misses, for keys, and for audit events.  The C side audits every deny, every decision
whose effects say audit, and every integrity failure — cache hits included — so the
agent-side decision here does not audit a second time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .. import config as C
from ..audit import event as ev
from ..guard import GuardPoint
from .handler import EFFECT_NAMES, effects_of

log = logging.getLogger("takakryptd.guards")

def mount(agent: Any, gp: C.GuardPoint) -> GuardPoint:
    g = build(agent, gp)
    g.mount()
    return g


def resume(agent: Any, gp: C.GuardPoint, fds: list[int], state: bytes) -> GuardPoint:
    """Take over the FUSE connection another takakryptd handed over (agent.handover)
    instead of mounting: the path never goes bare.  Raises OSError/ValueError if the
    engine cannot; the connection is then left as it was (never unmounted)."""
    g = build(agent, gp)
    g.resume(fds, state)
    return g


def build(agent: Any, gp: C.GuardPoint) -> GuardPoint:
    """The guard point of ``gp`` wired to ``agent``, not mounted yet."""
    policy_name, key_name = gp.policy, gp.key
    root = os.path.normpath(gp.path)

    def decide(uid: int, gid: int, tid: int, path: str, action: str) -> tuple:
        d = agent.decide(policy_name, uid, gid, tid, path, action, guard=root, key=key_name,
                         audit=False)
        ttl = d.cache_ttl if d.cache_ttl is not None else agent.config.agent.cache.ttl_seconds
        version = agent.keys.current_version(key_name) if d.permit and d.apply_key else 0
        return int(effects_of(d)), d.rule, version, ttl

    def get_key(name: str, version: int) -> bytearray:
        # Each guard point serves only files under its own key: a TAKA file of another
        # guard point (copied or restored raw into this one) fails closed (EIO + audit)
        # instead of being decrypted with the other guard point's key.
        if name != key_name:
            from ..errors import KeyNotFound

            raise KeyNotFound(f"file names key {name!r}, but guard point {root} uses "
                              f"{key_name!r}")
        return agent.keys.get(name, version)

    def audit(kind: str, uid: int, gid: int, pid: int, path: str, action: str, effects: int,
              detail: str, rule: int = -1, key_version: int = 0, latency_ns: int = 0) -> None:
        if agent.audit is None:
            return
        full = os.path.join(root, path) if path else root
        if kind != "access":
            agent.audit.log(ev.system_event(kind, detail or kind, path=full,
                                            detail={"uid": uid, "pid": pid, "action": action}))
            return
        exe = ""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            pass
        verdict = ("would-deny" if effects & 16 else "permit" if effects & 1 and not effects & 2
                   else "deny")
        pol = agent.config.policies.get(policy_name)
        applies = bool(effects & 4)
        agent.audit.log(ev.access_event(
            uid=uid, pid=pid, exe=exe, path=full, operation=action, decision=verdict,
            effects=[n for n, b in EFFECT_NAMES if effects & b], policy=policy_name, rule=rule,
            key=key_name if applies else None,
            key_version=key_version if applies and key_version else None,
            learn_mode=bool(pol is not None and pol.learn_mode),
            latency_us=latency_ns / 1000, reason=detail, groups=(gid,)))

    ring = getattr(getattr(agent, "ring_transport", None), "ring", None)
    # cache misses go through the ring (no GIL on the data path's threads), rename and
    # link included; the decide callback only serves a guard point without a ring
    g = GuardPoint(gp.path, backing=gp.backing, key_name=key_name, get_key=get_key,
                   decide=decide, audit=audit, threads=4, ring=ring,
                   cache=agent.config.agent.cache.max_entries,
                   metadata_cache=gp.metadata_cache,
                   # a handover over io_uring parks each ring entry on a request of the
                   # process's own, answered by the successor: its exit waits for the
                   # successor, but systemd starts that only once the old one is gone
                   io_uring=gp.io_uring and not getattr(agent, "fd_store", False),
                   read_helpers=gp.read_helpers, audit_decisions=True,
                   format_version=gp.format,
                   # how long a cache miss waits for the agent's answer, then denies
                   ring_timeout_ms=max(1, round(agent.config.agent.request_timeout * 1000)),
                   current_version=lambda name: agent.keys.current_version(name))
    g.spec = gp  # type: ignore[attr-defined]
    apply_policy_hints(agent, g)
    return g


def apply_policy_hints(agent: Any, g: GuardPoint) -> None:
    """Tell the data path what the guard point's policy proves for every caller (kernel
    caching of regular files, docs/guard-points.md "Policy hints"); after a mount and
    after every reload.  A policy that is gone gets no hints."""
    g.set_policy_hints(*policy_hints(agent.state.engine, g))


def policy_hints(engine: Any, g: GuardPoint) -> tuple[bool, bool, bool]:
    """(plain_only, getattr_all, process_free) of the guard point's policy under
    ``engine``; none for a policy that is gone."""
    name = g.spec.policy  # type: ignore[attr-defined]
    if name not in engine.policies:
        return False, False, False
    return (*engine.metadata_hints(name), engine.process_free(name))
