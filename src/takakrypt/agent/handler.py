"""The agent's request handler: one TAKA protocol message in, one answer out.

It does not know which transport a message came from (seqpacket socket, in-process
ring, generic netlink): transports call :meth:`RequestHandler.handle` with the bytes
and send back what it returns.  A malformed message is logged and dropped (no answer:
the sender times out and denies), never a crash.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any

from .. import protocol as P
from .. import procinfo
from ..errors import Error, ProtocolError
from .transports import KernelPeer, exe_of, in_process, peer_allowed

log = logging.getLogger("takakryptd.handler")

_EFFECT_BITS = {"permit": P.Effect.PERMIT, "deny": P.Effect.DENY,
                "apply_key": P.Effect.APPLY_KEY, "audit": P.Effect.AUDIT}
#: effect names of an enforcement point's audit record, in the FUSE engine's order
#: (agent.guards writes the FUSE engine's records with these too)
EFFECT_NAMES = (("permit", 1), ("deny", 2), ("apply_key", 4), ("audit", 8), ("would_deny", 16))
#: what the FUSE engine's integrity records say where the kernel's event has no text
_INTEGRITY_REASON = {P.AuditKind.INTEGRITY: "block failed authentication",
                     P.AuditKind.FORMAT: "invalid or unauthenticated TAKA header",
                     P.AuditKind.KEY_UNAVAILABLE: "key of the file header unavailable"}
_AGENT_UNAVAILABLE = "agent unavailable"  # the FUSE engine's reason (fuse_impl.c)


def verdict_of(effects: int) -> str:
    """An audit record's decision from an enforcement point's effects bits."""
    return ("would-deny" if effects & P.Effect.WOULD_DENY else
            "permit" if effects & P.Effect.PERMIT and not effects & P.Effect.DENY else "deny")


def effects_of(d: Any) -> P.Effect:
    """Protocol effects of a policy.Decision (learn mode: permit + would_deny)."""
    e = P.Effect(0)
    if d.permit:
        e |= P.Effect.PERMIT
        if d.apply_key:
            e |= P.Effect.APPLY_KEY
    else:
        e |= P.Effect.DENY
    if d.audit:
        e |= P.Effect.AUDIT
    if d.would_deny:
        e |= P.Effect.WOULD_DENY
    if d.any_path:
        e |= P.Effect.ANY_PATH
    if d.any_process:
        e |= P.Effect.ANY_PROCESS
    return e


# Fast path for POLICY_CHECK cache hits: the bulk of the traffic once caches are warm.
# It parses the fixed v2 layout with one struct call and builds the answer bytes
# directly; anything unusual (other versions, malformed fields, misses) falls back to
# the full decoder, which validates everything.  Layouts: docs/protocol.md.
_HDR = struct.Struct("<IIIIIIQ")
_PCQ = struct.Struct("<IIIIIIIIQQQII")      # v2 policy request fixed part after the header
_PCR = struct.Struct("<IIIIIIIiII")         # v2 policy response fixed part after the header
_PCQ_END = P.HEADER_SIZE + _PCQ.size        # 96
_RENAME_LINK = (int(P.Action.RENAME), int(P.Action.LINK))
_E_PERMIT, _E_APPLY, _E_AUDIT = int(P.Effect.PERMIT), int(P.Effect.APPLY_KEY), int(P.Effect.AUDIT)
_NACTIONS = max(int(a) for a in P.Action)


def _version(agent_version: str) -> int:
    parts = [int(x) for x in agent_version.split(".")[:3] if x.isdigit()]
    parts += [0] * (3 - len(parts))
    return parts[0] << 16 | parts[1] << 8 | parts[2]


class RequestHandler:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.processed = 0
        self.malformed = 0
        self._roots: list[tuple[bytes, bytes, Any]] = []
        self._roots_for: Any = None
        self.by_op: dict[str, int] = {}
        self._self_peer = in_process()  # the ring's sender: the FUSE engine in this process

    def observe(self, transport: str, t0: float, op: str = "any") -> None:
        m = self.agent.metrics
        if m is not None:
            m.latency.labels(transport=transport, operation=op).observe(time.perf_counter() - t0)

    def fast_policy_hit(self, data: bytes, *, audit: bool = True) -> bytes | None:
        """The answer to a well-formed v2 POLICY_CHECK that hits the decision cache, or
        None (then the caller takes the full path)."""
        n = len(data)
        if n < _PCQ_END:
            return None
        magic, version, op, seq, psize, status, _ts = _HDR.unpack_from(data, 0)
        if magic != P.MAGIC or version != 2 or op != 1 or status or psize != n - P.HEADER_SIZE:
            return None
        (pid, uid, gid, action, path_len, proc_len, cwd_len, _tid, start_time, exe_dev, exe_ino,
         gp_id, target_len) = _PCQ.unpack_from(data, P.HEADER_SIZE)
        if (not start_time or gp_id or not 1 <= action <= _NACTIONS or action in _RENAME_LINK
                or target_len or not path_len
                or _PCQ_END + path_len + proc_len + cwd_len != n
                or data.find(b"\0", _PCQ_END) != -1):
            return None
        cache = self.agent.cache
        path_b = data[_PCQ_END:_PCQ_END + path_len]
        hit = cache.lookup(uid, gid, pid, start_time, exe_dev, exe_ino, path_b, action)
        if hit is None:
            return None
        gp = self._guard_for_bytes(path_b)
        if gp is None:
            return None
        effects, rule, key_version, _flags = hit
        if effects & _E_AUDIT and audit:
            proc = data[_PCQ_END + path_len:_PCQ_END + path_len + proc_len]
            self._audit_hit_fields(uid, pid, os.fsdecode(proc), os.fsdecode(path_b),
                                   P.Action(action).policy_name, gp, effects, rule)
        self.agent.requests += 1
        self.processed += 1
        key = gp.key.encode() if effects & _E_APPLY else b""
        pol = gp.policy.encode()
        body = _PCR.pack(effects & _E_PERMIT, (effects >> 2) & 1, (effects >> 3) & 1, len(key),
                         len(pol), 0, effects, rule, key_version,
                         int(cache.default_ttl * 1000)) + key + pol
        return _HDR.pack(P.MAGIC, 2, 1 | P.RESPONSE_FLAG, seq, len(body), 0,
                         time.time_ns()) + body

    def handle_ring(self, data: bytes) -> Any:
        """Consumer of the in-process ring (the FUSE data path): cache hits are answered
        synchronously, everything else returns the coroutine of :meth:`handle`.  The
        data path audits its own decisions, so ring requests are not audited here."""
        if self.agent.cache is not None:
            fast = self.fast_policy_hit(data, audit=False)
            if fast is not None:
                return fast
        return self.handle(data, transport="ring", peer=self._self_peer)

    async def handle(self, data: bytes, *, transport: str = "?",
                     peer: Any = None) -> bytes | None:
        """``peer``: the sender's credentials (``transports.Peer``), None if unknown; key
        services (KEY_REQUEST, ENCRYPT, DECRYPT) are refused to an unknown peer."""
        if self.agent.cache is not None:
            fast = self.fast_policy_hit(data)
            if fast is not None:
                return fast
        try:
            msg = P.decode(data)
        except ProtocolError as e:
            self.malformed += 1
            log.warning("%s: dropped malformed message (%d bytes): %s", transport, len(data), e)
            if self.agent.metrics:
                self.agent.metrics.requests.labels(transport=transport, operation="malformed",
                                                   status="dropped").inc()
            return None
        if msg.is_response:
            # answers to requests the agent sent (CONFIG_UPDATE to the kernel) arrive here
            pending = getattr(self.agent, "pending", None)
            if pending is not None:
                try:
                    pending.resolve(msg)
                except ProtocolError as e:
                    log.warning("%s: %s", transport, e)
            return None
        self.agent.requests += 1
        self.processed += 1
        op = msg.operation.name.lower()
        self.by_op[op] = self.by_op.get(op, 0) + 1
        try:
            reply = self._dispatch(msg, audit=transport != "ring", peer=peer)
            status = "ok"
        except Error as e:
            reply = P.error_reply(msg, _status_for(e), str(e))
            status = e.kind
        except Exception as e:  # noqa: BLE001 - answer INTERNAL, keep serving
            log.exception("%s: %s request failed", transport, op)
            reply = P.error_reply(msg, P.Status.INTERNAL, f"internal error: {type(e).__name__}")
            status = "internal"
        if self.agent.metrics:
            self.agent.metrics.requests.labels(transport=transport, operation=op,
                                               status=status).inc()
        return P.encode(reply)

    # ---------------------------------------------------------------------------------------
    def _dispatch(self, msg: P.Message, *, audit: bool = True, peer: Any = None) -> P.Message:
        op = msg.operation
        if op == P.Operation.HEALTH_CHECK:
            from .. import __version__

            return P.reply(msg, P.HealthCheckResponse(
                agent_version=_version(__version__),
                uptime_seconds=int(time.time() - self.agent.started) & 0xFFFFFFFF,
                active_workers=self.agent.inflight, processed_requests=self.processed & 0xFFFFFFFF))
        if op == P.Operation.POLICY_CHECK:
            return self._policy_check(msg, audit=audit)
        if op == P.Operation.KEY_REQUEST:
            return self._key_request(msg, peer)
        if op == P.Operation.AUDIT_EVENT:
            return self._audit(msg)
        if op in (P.Operation.ENCRYPT, P.Operation.DECRYPT):
            refused = self._key_refusal(msg.payload.key_id, 0, peer)
            if refused:
                self._audit_key(msg, peer, msg.payload.key_id, msg.payload.key_version,
                                "deny", refused)
                return P.error_reply(msg, P.Status.DENIED, refused)
            return self._crypto(msg)
        return P.error_reply(msg, P.Status.INVALID,
                             f"{op.name} is sent by the agent, not to it")

    def _guard_for_bytes(self, path: bytes) -> Any:
        """Guard point of an already normalised absolute path (fast path), or None."""
        cfg = self.agent.config
        if self._roots_for is not cfg:
            roots = []
            for gp in cfg.guard_points:
                if gp.enabled:
                    r = os.fsencode(os.path.normpath(gp.path))
                    roots.append((r, r.rstrip(b"/") + b"/", gp))
            roots.sort(key=lambda t: -len(t[0]))
            self._roots, self._roots_for = roots, cfg
        if b"//" in path or b"/." in path or path.endswith(b"/") or not path.startswith(b"/"):
            return None  # not normalised: the full path handles it
        for root, prefix, gp in self._roots:
            if path == root or path.startswith(prefix):
                return gp
        return None

    def _guard_for_path(self, path_s: str) -> tuple[Any, str] | None:
        path = os.path.normpath(path_s)
        best = None
        for gp in self.agent.config.guard_points:
            if not gp.enabled:
                continue
            root = os.path.normpath(gp.path)
            if path == root or path.startswith(root.rstrip("/") + "/"):
                if best is None or len(root) > len(os.path.normpath(best.path)):
                    best = gp
        if best is None:
            return None
        rel = os.path.relpath(path, os.path.normpath(best.path))
        return best, "" if rel == "." else rel

    def _guard_for(self, req: P.PolicyCheckRequest) -> tuple[Any, str] | None:
        if req.guard_point_id:
            if 1 <= req.guard_point_id <= len(self.agent.config.guard_points):
                gp = self.agent.config.guard_points[req.guard_point_id - 1]
                rel = os.path.relpath(os.path.normpath(req.path), os.path.normpath(gp.path))
                if not rel.startswith(".."):
                    return gp, "" if rel == "." else rel
            return None
        return self._guard_for_path(req.path)

    def _policy_check(self, msg: P.Message, *, audit: bool = True) -> P.Message:
        req: P.PolicyCheckRequest = msg.payload  # type: ignore[assignment]
        found = self._guard_for(req)
        if found is None:
            return P.error_reply(msg, P.Status.NOT_FOUND, "path is not in a guard point")
        gp, rel = found
        action = req.action.policy_name
        cache = self.agent.cache
        ckey = (req.uid, req.gid, req.pid, req.start_time, req.exe_dev, req.exe_ino,
                os.fsencode(req.path), int(req.action))
        if cache is not None and req.start_time:
            hit = cache.lookup(*ckey)
            if hit is not None:
                effects, rule, key_version, _flags = hit
                if effects & P.Effect.AUDIT and audit:
                    self._audit_hit(req, gp, effects, rule)
                return P.reply(msg, P.PolicyCheckResponse.from_effects(
                    P.Effect(effects), key_id=gp.key if effects & P.Effect.APPLY_KEY else "",
                    key_version=key_version, policy=gp.policy, rule_index=rule,
                    cache_ttl_ms=int(cache.default_ttl * 1000)))
        generation = cache.generation if cache is not None else 0
        if req.start_time:
            try:
                if procinfo.start_time_of(req.pid) != req.start_time:
                    raise procinfo.ProcessGone(req.pid)
            except procinfo.ProcessGone:
                return P.reply(msg, P.PolicyCheckResponse.from_effects(
                    P.Effect.DENY | P.Effect.AUDIT, policy=gp.policy,
                    reason="process exited or pid reused"))
        d = self.agent.decide(gp.policy, req.uid, req.gid, req.tid or req.pid, rel, action,
                              guard=gp.path, key=gp.key, audit=audit,
                              exe=(req.exe_dev, req.exe_ino) if req.exe_ino else None)
        effects = effects_of(d)
        key_version = 0
        if effects & P.Effect.APPLY_KEY:
            key_version = self.agent.keys.current_version(gp.key)
        ttl = d.cache_ttl if d.cache_ttl is not None else (cache.default_ttl if cache is not None else 0)
        if cache is not None and req.start_time and ttl > 0:
            cache.insert(*ckey, int(effects), d.rule, key_version, 0, ttl=ttl,
                         generation=generation)
        return P.reply(msg, P.PolicyCheckResponse.from_effects(
            effects, key_id=gp.key if effects & P.Effect.APPLY_KEY else "",
            key_version=key_version, policy=d.policy, rule_index=d.rule,
            reason="; ".join(d.explanation)[:200], cache_ttl_ms=int(ttl * 1000)))

    def _audit_hit(self, req: P.PolicyCheckRequest, gp: Any, effects: int, rule: int) -> None:
        self._audit_hit_fields(req.uid, req.pid, req.process, req.path,
                               req.action.policy_name, gp, effects, rule)

    def _audit_hit_fields(self, uid: int, pid: int, process: str, path: str, action: str,
                          gp: Any, effects: int, rule: int) -> None:
        from ..audit import event as ev

        if self.agent.audit is None:
            return
        verdict = ("would-deny" if effects & P.Effect.WOULD_DENY else
                   "permit" if effects & P.Effect.PERMIT else "deny")
        names = [n for n, b in _EFFECT_BITS.items() if effects & b]
        self.agent.audit.log(ev.access_event(
            uid=uid, pid=pid, exe=process, path=path,
            operation=action, decision=verdict, effects=names,
            policy=gp.policy, rule=rule, key=gp.key if effects & P.Effect.APPLY_KEY else None,
            reason="cached decision"))

    # key services ----------------------------------------------------------------------
    # Raw keys (KEY_REQUEST) and key use (ENCRYPT/DECRYPT, an oracle as good as the key)
    # are served to the kernel (generic netlink), or when agent.key_requests is on to a
    # root peer (or the agent's own uid); in both cases only for the key of an enabled
    # guard point (the one named by guard_point_id, if given).  Every KEY_REQUEST is
    # audited, served or not; the record names key, version and peer, never key bytes.
    # docs/protocol.md "Who may ask for keys".
    def _key_refusal(self, key_id: str, gp_id: int, peer: Any) -> str:
        cfg = self.agent.config
        kernel = isinstance(peer, KernelPeer)
        if not kernel and not cfg.agent.key_requests:
            return "key requests are disabled (agent.key_requests: false)"
        if peer is None or not (kernel or peer_allowed(peer)):
            return "key requests are served to root only"
        gps = cfg.guard_points
        if gp_id:
            if not (1 <= gp_id <= len(gps) and gps[gp_id - 1].enabled
                    and gps[gp_id - 1].key == key_id):
                return f"key {key_id!r} is not the key of guard point {gp_id}"
        elif not any(gp.enabled and gp.key == key_id for gp in gps):
            return f"key {key_id!r} is not the key of any enabled guard point"
        return ""

    def _audit_key(self, msg: P.Message, peer: Any, key_id: str, version: int | None,
                   decision: str, reason: str) -> None:
        from ..audit import event as ev

        if self.agent.audit is None:
            return
        pid, uid = (peer.pid, peer.uid) if peer is not None else (0, -1)
        exe = "kernel" if isinstance(peer, KernelPeer) else exe_of(pid) if pid else ""
        self.agent.audit.log(ev.system_event(
            ev.KEY_REQUEST, reason, uid=uid, pid=pid, exe=exe,
            operation=msg.operation.name.lower(), decision=decision, key=key_id,
            key_version=version or None))

    def _key_request(self, msg: P.Message, peer: Any) -> P.Message:
        req: P.KeyRequest = msg.payload  # type: ignore[assignment]
        refused = self._key_refusal(req.key_id, req.guard_point_id, peer)
        if refused:
            self._audit_key(msg, peer, req.key_id, req.key_version, "deny", refused)
            return P.error_reply(msg, P.Status.DENIED, refused)
        try:
            version = req.key_version or self.agent.keys.current_version(req.key_id)
            key = self.agent.keys.get(req.key_id, version)
        except Error as e:
            self._audit_key(msg, peer, req.key_id, req.key_version, "error", str(e))
            raise
        self._audit_key(msg, peer, req.key_id, version, "permit", "key released")
        try:
            return P.reply(msg, P.KeyResponse(key_id=req.key_id, key_version=version,
                                              key=bytes(key)))
        finally:
            key[:] = bytes(len(key))

    def _audit(self, msg: P.Message) -> P.Message:
        """AUDIT_EVENT from an enforcement point (the kernel module): the record the FUSE
        engine writes for the same happening (agent.guards), plus ``detail.engine``
        ("kernel") and, for an event the sender coalesced, ``detail.count``:

        - ACCESS: an access record (user, groups, pid, exe, absolute path, operation,
          decision, effects, policy, rule, key if the view is plaintext, learn mode);
        - AGENT_UNAVAILABLE: the access record of a fail-closed deny, reason "agent
          unavailable", as the FUSE engine's for a decision it could not get;
        - INTEGRITY, FORMAT, KEY_UNAVAILABLE: an ``integrity`` system event, path and
          ``detail`` {uid, pid, action}, as the FUSE engine's for a bad tag or header or
          a file key it cannot have."""
        from ..audit import event as ev

        req: P.AuditEventRequest = msg.payload  # type: ignore[assignment]
        if self.agent.audit is None:
            return P.reply(msg, P.AuditEventResponse())
        found = self._audit_guard(req)
        gp = found[0] if found else None
        path = os.path.join(os.path.normpath(gp.path), found[1]) if found and found[1] \
            else (os.path.normpath(gp.path) if gp is not None else req.path)
        action = req.action.policy_name if req.action else ""
        extra: dict[str, Any] = {"engine": "kernel"}
        if req.count > 1:
            extra["count"] = req.count
        uid = req.uid if req.uid != 0xFFFFFFFF else -1
        if req.kind in (P.AuditKind.ACCESS, P.AuditKind.AGENT_UNAVAILABLE):
            if req.kind == P.AuditKind.AGENT_UNAVAILABLE:
                effects, rule, reason = int(P.Effect.DENY | P.Effect.AUDIT), -1, \
                    req.detail or _AGENT_UNAVAILABLE
            else:
                effects, rule, reason = int(req.effects), req.rule_index, req.detail
            pol = self.agent.config.policies.get(gp.policy) if gp is not None else None
            applies = bool(effects & P.Effect.APPLY_KEY)
            self.agent.audit.log(ev.access_event(
                uid=uid, pid=req.pid, exe=req.process or (exe_of(req.pid) if req.pid else ""),
                path=path, operation=action, decision=verdict_of(effects),
                effects=[n for n, b in EFFECT_NAMES if effects & b],
                policy=gp.policy if gp is not None else "", rule=rule,
                key=gp.key if applies and gp is not None else None,
                learn_mode=bool(pol is not None and pol.learn_mode), reason=reason,
                groups=(req.gid,) if req.gid != 0xFFFFFFFF else (), detail=extra))
        else:
            self.agent.audit.log(ev.system_event(
                ev.INTEGRITY, req.detail or _INTEGRITY_REASON.get(req.kind, "integrity"),
                path=path, detail={"uid": uid, "pid": req.pid, "action": action, **extra}))
        return P.reply(msg, P.AuditEventResponse())

    def _audit_guard(self, req: P.AuditEventRequest) -> tuple[Any, str] | None:
        """(guard point, path relative to it) of an audit event: the one its id names
        (its path under that guard point's, absolute or relative), else the one whose
        path holds it."""
        gps = self.agent.config.guard_points
        if 1 <= req.guard_point_id <= len(gps):
            gp = gps[req.guard_point_id - 1]
            root = os.path.normpath(gp.path)
            rel = os.path.relpath(os.path.normpath(os.path.join(root, req.path)), root)
            if rel != ".." and not rel.startswith("../"):
                return gp, "" if rel == "." else rel
        if req.path and os.path.isabs(req.path):
            return self._guard_for_path(req.path)
        return None

    def _crypto(self, msg: P.Message) -> P.Message:
        """The seed's ENCRYPT/DECRYPT: a measured fallback, never the data path default."""
        from .._aesgcm import BlockCipher

        req = msg.payload
        if req.algorithm != P.Algorithm.AES_256_GCM:
            return P.error_reply(msg, P.Status.INVALID, f"unknown algorithm {req.algorithm}")
        version = req.key_version or self.agent.keys.current_version(req.key_id)
        key = self.agent.keys.get(req.key_id, version)
        try:
            c = BlockCipher(key, block_size=1 << 20)
        finally:
            key[:] = bytes(len(key))
        with c:
            if msg.operation == P.Operation.ENCRYPT:
                if len(req.data) > (1 << 20):
                    return P.error_reply(msg, P.Status.INVALID, "data too large")
                sealed = c.encrypt(req.data, req.metadata, 0) if req.data else b""
                self.agent.crypto_bytes["encrypt"] += len(req.data)
                return P.reply(msg, P.EncryptResponse(encrypted=sealed, iv_len=12, tag_len=16,
                                                      key_version=version))
            sealed = req.iv + req.encrypted + req.tag
            try:
                plain = c.decrypt(sealed, req.metadata, 0) if req.encrypted else b""
            except Error:
                return P.error_reply(msg, P.Status.CRYPTO, "authentication failed")
            self.agent.crypto_bytes["decrypt"] += len(plain)
            return P.reply(msg, P.DecryptResponse(plaintext=plain))


def _status_for(e: Error) -> P.Status:
    from ..errors import BackendUnavailable, KeyNotFound

    if isinstance(e, KeyNotFound):
        return P.Status.NOT_FOUND
    if isinstance(e, BackendUnavailable):
        return P.Status.NETWORK
    if isinstance(e, ProtocolError):
        return P.Status.INVALID
    return P.Status.INTERNAL
