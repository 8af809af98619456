"""The audit trail: every audited decision and every deny, to files and to a SIEM.

Public API::

    from takakrypt.audit import access_event, build_logger

    logger = build_logger({"sinks": [{"type": "file", "path": "/var/log/takakrypt/audit.json"}]})
    logger.log(access_event(uid=1000, pid=4242, exe="/usr/bin/cat", path="/data/pg/x",
                            operation="read", decision="deny", policy="pg", rule=-1,
                            reason="no rule matched"))   # never blocks
    logger.stats()         # {"enqueued": 1, "dropped": 0, "queue_depth": 0, "sinks": {...}}
    logger.close(timeout=5)

Events never carry key material.  Formats, fields and the drop semantics are in
docs/audit.md.
"""

from .coalesce import Coalescer
from .config import (
    AuditConfig,
    FileSinkConfig,
    SyslogSinkConfig,
    build_logger,
    build_sink,
    load_audit_config,
)
from .event import (
    Event,
    access_event,
    dropped_event,
    group_names,
    now_rfc3339,
    sanitize,
    system_event,
    user_name,
)
from .formats import from_json, to_cef, to_json, to_syslog
from .logger import AuditLogger
from .sinks import FileSink, Sink, SyslogSink

__all__ = [
    "AuditConfig",
    "AuditLogger",
    "Coalescer",
    "Event",
    "FileSink",
    "FileSinkConfig",
    "Sink",
    "SyslogSink",
    "SyslogSinkConfig",
    "access_event",
    "build_logger",
    "build_sink",
    "dropped_event",
    "from_json",
    "group_names",
    "load_audit_config",
    "now_rfc3339",
    "sanitize",
    "system_event",
    "to_cef",
    "to_json",
    "to_syslog",
    "user_name",
]
