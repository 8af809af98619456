"""Prometheus metrics of the agent, on a configurable localhost address.

Labels never carry a uid, pid or file path (unbounded cardinality, and they identify
people): only effect, action, transport, operation, check and sink names, and the
configured guard point paths of the rekey metrics (as many as the configuration has).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                   50e-3, 100e-3, 250e-3, 1.0, 5.0)


class _StatsCollector:
    """Reads live counters (decision cache, audit logger, breaker) at scrape time."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self):  # type: ignore[no-untyped-def]
        s = self.source()
        cache = s.get("cache") or {}
        for key in ("hits", "misses", "evictions", "expirations", "inserts"):
            if key in cache:
                c = CounterMetricFamily(f"takakrypt_cache_{key}", f"decision cache {key}")
                c.add_metric([], float(cache[key]))
                yield c
        if "entries" in cache:
            g = GaugeMetricFamily("takakrypt_cache_entries", "decision cache entries")
            g.add_metric([], float(cache["entries"]))
            yield g
        audit = s.get("audit") or {}
        g = GaugeMetricFamily("takakrypt_audit_queue_depth", "audit events waiting")
        g.add_metric([], float(audit.get("queue_depth", 0)))
        yield g
        c = CounterMetricFamily("takakrypt_audit_dropped", "audit events dropped (queue full)")
        c.add_metric([], float(audit.get("dropped", 0)))
        yield c
        for key, what in (("coalesced", "audit events counted in a coalesced summary"),
                          ("rate_limited", "audit events held back by the per-caller limit")):
            c = CounterMetricFamily(f"takakrypt_audit_{key}", what)
            c.add_metric([], float(audit.get(key, 0)))
            yield c
        c = CounterMetricFamily("takakrypt_audit_written", "audit events written by sink",
                                labels=["sink"])
        for name, st in (audit.get("sinks") or {}).items():
            c.add_metric([str(name)], float(st.get("written", 0)))
        yield c
        g = GaugeMetricFamily("takakrypt_health_ok", "1 if the health check passes",
                              labels=["check"])
        for name, ok in (s.get("health") or {}).items():
            g.add_metric([name], 1.0 if ok else 0.0)
        yield g
        g = GaugeMetricFamily("takakrypt_key_backend_circuit_open",
                              "1 if the key backend circuit breaker is open or half-open")
        g.add_metric([], 0.0 if s.get("breaker_state", "closed") == "closed" else 1.0)
        yield g
        g = GaugeMetricFamily("takakrypt_guard_points_mounted", "guard points mounted")
        g.add_metric([], float(s.get("guard_points_mounted", 0)))
        yield g
        c = CounterMetricFamily("takakrypt_crypto_bytes", "bytes through block crypto",
                                labels=["direction"])
        for d in ("encrypt", "decrypt"):
            c.add_metric([d], float((s.get("crypto_bytes") or {}).get(d, 0)))
        yield c
        yield from _kernel(s.get("kernel"))
        yield from _keys(s.get("keys"))
        yield from _rekeys(s.get("rekeys") or [])


REKEY_STATES = ("running", "paused", "done", "failed")


def _rekeys(runs: list[dict[str, Any]]) -> Any:
    """Live rekeys (docs/operations.md): state, files by outcome, bytes, progress."""
    g = GaugeMetricFamily("takakrypt_rekey_state", "1 for the state the guard point's rekey "
                          "is in", labels=["guard", "state"])
    c = CounterMetricFamily("takakrypt_rekey_files", "files the guard point's rekey handled, "
                            "by outcome", labels=["guard", "outcome"])
    b = CounterMetricFamily("takakrypt_rekey_bytes", "ciphertext bytes the guard point's "
                            "rekey wrote", labels=["guard"])
    p = GaugeMetricFamily("takakrypt_rekey_progress", "share of the stored bytes rekeyed "
                          "(0..1)", labels=["guard"])
    for r in runs:
        guard = str(r.get("guard", ""))
        if r.get("state") not in REKEY_STATES:
            continue
        for st in REKEY_STATES:
            g.add_metric([guard, st], 1.0 if r["state"] == st else 0.0)
        for outcome in ("rekeyed", "current", "skipped", "failed"):
            c.add_metric([guard, outcome], float(r.get(f"files_{outcome}", 0)))
        b.add_metric([guard], float(r.get("bytes_rekeyed", 0)))
        p.add_metric([guard], float(r.get("progress", 0.0)))
    yield from (g, c, b, p)


#: the key manager's counters (docs/keys.md, "Key cache and offline operation")
KEY_COUNTERS = (
    ("cache_hits", "hits", "keys served from the key cache"),
    ("cache_misses", "misses", "keys not in the key cache, asked of the backend"),
    ("cache_expired", "expired", "keys dropped (wiped) after cache_ttl without the backend"),
    ("cache_dropped", "dropped", "keys the data path was told to drop (expired or gone)"),
    ("cache_revalidations", "revalidations", "held keys confirmed by the backend"),
    ("cache_revalidation_failures", "revalidation_failures",
     "confirmations of held keys the backend failed"),
    ("offline_serves", "offline_serves", "keys served from the offline key cache"),
    ("offline_stores", "offline_stores", "keys stored (sealed) in the offline key cache"),
    ("offline_errors", "offline_errors", "offline key cache writes that failed"),
)


def _keys(st: Any) -> Any:
    """``takakrypt_key_*``: the key backend's state, the key cache, the offline cache."""
    if not isinstance(st, dict):
        return
    g = GaugeMetricFamily("takakrypt_key_backend_available",
                          "1 while the key backend answers")
    g.add_metric([], 1.0 if st.get("available") else 0.0)
    yield g
    g = GaugeMetricFamily("takakrypt_key_cache_keys", "data keys held in the key cache")
    g.add_metric([], float((st.get("cache") or {}).get("keys", 0)))
    yield g
    g = GaugeMetricFamily("takakrypt_key_cache_oldest_age_seconds",
                          "seconds since the backend confirmed the oldest held key")
    g.add_metric([], float((st.get("cache") or {}).get("oldest_age") or 0.0))
    yield g
    off = st.get("offline_cache") or {}
    g = GaugeMetricFamily("takakrypt_key_offline_in_use",
                          "1 while keys are served from the offline key cache")
    g.add_metric([], 1.0 if off.get("in_use") else 0.0)
    yield g
    g = GaugeMetricFamily("takakrypt_guard_points_closed",
                          "guard points closed for want of a key")
    g.add_metric([], float(len(st.get("closed") or {})))
    yield g
    counters = st.get("counters") or {}
    for name, key, what in KEY_COUNTERS:
        c = CounterMetricFamily(f"takakrypt_key_{name}", what)
        c.add_metric([], float(counters.get(key, 0)))
        yield c


#: the kernel module's STATUS_REQUEST counters (docs/protocol.md) -> metric, help
KERNEL_COUNTERS = (
    ("requests_sent", "requests the kernel module sent to the agent"),
    ("requests_timed_out", "kernel module requests that got no answer in time"),
    ("cache_hits", "kernel module decision cache hits"),
    ("cache_misses", "kernel module decision cache misses"),
    ("fail_closed_denials", "accesses the kernel module denied for want of a decision or key"),
    ("policy_denials", "accesses the kernel module denied by the agent's decisions"),
    ("integrity_errors", "kernel module EIO for a bad header, tag or length"),
    ("audit_events", "audit events the kernel module sent"),
    ("audit_drops", "audit events the kernel module dropped"),
)
KERNEL_GAUGES = (
    ("cache_entries", "kernel module decision cache entries"),
    ("cache_capacity", "kernel module decision cache size"),
    ("pending_requests", "kernel module requests waiting for the agent"),
    ("agent_connected", "1 if the kernel module has an agent registered"),
    ("guard_point_count", "guard points the kernel module holds"),
)


def _kernel(st: Any) -> Any:
    """``takakrypt_kernel_*``: only when the module answered (not loaded: no series)."""
    if not isinstance(st, dict):
        return
    for key, what in KERNEL_COUNTERS:
        c = CounterMetricFamily(f"takakrypt_kernel_{key}", what)
        c.add_metric([], float(st.get(key, 0)))
        yield c
    for key, what in KERNEL_GAUGES:
        g = GaugeMetricFamily(f"takakrypt_kernel_{key}", what)
        g.add_metric([], float(st.get(key, 0)))
        yield g


class Metrics:
    def __init__(self, stats_source: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter("takakrypt_decisions", "policy decisions by effect",
                                 ["effect"], registry=self.registry)
        self.requests = Counter("takakrypt_requests", "protocol requests",
                                ["transport", "operation", "status"], registry=self.registry)
        self.latency = Histogram("takakrypt_request_latency_seconds",
                                 "time to answer a protocol request",
                                 ["transport", "operation"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.decision_latency = Histogram("takakrypt_decision_latency_seconds",
                                          "policy evaluation time", buckets=LATENCY_BUCKETS,
                                          registry=self.registry)
        self.reloads = Counter("takakrypt_reloads", "configuration reloads", ["result"],
                               registry=self.registry)
        self.up = Gauge("takakrypt_up", "1 while the agent runs", registry=self.registry)
        self.up.set(1)
        self.registry.register(_StatsCollector(stats_source))
        self.server: Any = None
        self.address: tuple[str, int] | None = None

    def serve(self, address: str, port: int) -> tuple[str, int]:
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self.server = server
        self.address = server.server_address[:2]
        return self.address  # type: ignore[return-value]

    def close(self) -> None:
        """Stop serving.  The server's thread looks at its stop flag between polls of
        half a second: it is woken by connecting to it, so that a stopping takakryptd
        (and with it a restart's stall) does not wait out the poll."""
        if self.server is None:
            return
        stopper = threading.Thread(target=self.server.shutdown, daemon=True)
        stopper.start()
        host, port = self.address or ("127.0.0.1", 0)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        for _ in range(50):
            with contextlib.suppress(OSError):
                socket.create_connection((host, port), timeout=0.1).close()
            stopper.join(0.02)
            if not stopper.is_alive():
                break
        stopper.join()
        self.server.server_close()
        self.server = None
