"""The ``audit:`` part of the agent configuration, and building a logger from it.

::

    audit:
      queue_size: 8192
      coalesce:
        window_seconds: 10      # identical events within this are one record + a summary
        max_open: 4096          # windows tracked at once (0: no coalescing)
      rate_limit:
        per_caller: 5           # records per second per uid once the burst is spent
        burst: 200              # 0 per_caller: no rate limit
      sinks:
        - type: file
          path: /var/log/takakrypt/audit.json
          format: json            # json | cef
          max_bytes: 104857600    # rotate above this size; 0 = never
          backups: 5              # keep audit.json.1 ... audit.json.5
        - type: syslog
          transport: tls          # udp | tcp | tls
          host: siem.example.org
          port: 6514              # default 514 (udp, tcp), 6514 (tls)
          format: cef
          facility: local0        # name or 0-23
          app_name: takakrypt
          ca_file: /etc/takakrypt/siem-ca.pem
          cert_file: /etc/takakrypt/client.pem   # optional client certificate
          key_file: /etc/takakrypt/client.key
          server_name: siem.example.org          # default: host

The agent's top-level config embeds :class:`AuditConfig` as a field, so msgspec reports
paths such as ``$.audit.sinks[1].port``; :func:`load_audit_config` does the same for the
audit section alone (``path`` gives the prefix).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from ..errors import ConfigError
from .coalesce import Coalescer
from .formats import parse_facility
from .logger import AuditLogger
from .sinks import FileSink, Sink, SyslogSink

__all__ = [
    "AuditConfig",
    "CoalesceConfig",
    "FileSinkConfig",
    "RateLimitConfig",
    "SinkConfig",
    "SyslogSinkConfig",
    "build_logger",
    "build_sink",
    "load_audit_config",
]

_PRINTUSASCII = frozenset(chr(c) for c in range(0x21, 0x7F))


class FileSinkConfig(
    msgspec.Struct, tag="file", tag_field="type", forbid_unknown_fields=True, kw_only=True,
    frozen=True,
):
    path: Annotated[str, Meta(min_length=1)]
    format: Literal["json", "cef"] = "json"
    max_bytes: Annotated[int, Meta(ge=0)] = 100 * 1024 * 1024
    backups: Annotated[int, Meta(ge=0, le=1000)] = 5
    #: name in ``stats()`` (default ``file:<path>``)
    name: str | None = None

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path):
            raise ValueError(f"path must be absolute, got {self.path!r}")


class SyslogSinkConfig(
    msgspec.Struct, tag="syslog", tag_field="type", forbid_unknown_fields=True, kw_only=True,
    frozen=True,
):
    host: Annotated[str, Meta(min_length=1)]
    transport: Literal["udp", "tcp", "tls"] = "tls"
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    format: Literal["json", "cef"] = "json"
    facility: str | Annotated[int, Meta(ge=0, le=23)] = "local0"
    app_name: Annotated[str, Meta(min_length=1, max_length=48)] = "takakrypt"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    #: messages buffered while the connection is up but slow
    buffer_size: Annotated[int, Meta(ge=1)] = 4096
    connect_timeout: Annotated[float, Meta(gt=0)] = 5.0
    send_timeout: Annotated[float, Meta(gt=0)] = 10.0
    reconnect_min: Annotated[float, Meta(gt=0)] = 0.5
    reconnect_max: Annotated[float, Meta(gt=0)] = 30.0
    name: str | None = None

    def __post_init__(self) -> None:
        parse_facility(self.facility)  # ValueError names the problem
        if not set(self.app_name) <= _PRINTUSASCII:
            raise ValueError("app_name must be printable ASCII without spaces")
        tls_only = [f for f in ("ca_file", "cert_file", "key_file", "server_name")
                    if getattr(self, f) is not None]
        if self.transport != "tls" and tls_only:
            raise ValueError(f"{', '.join(tls_only)} only apply to transport tls")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file given without cert_file")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")


SinkConfig = Union[FileSinkConfig, SyslogSinkConfig]


class CoalesceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    window_seconds: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    max_open: Annotated[int, Meta(ge=0, le=10_000_000)] = 4096


class RateLimitConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    per_caller: Annotated[float, Meta(ge=0)] = 5.0
    burst: Annotated[int, Meta(ge=1, le=10_000_000)] = 200


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    queue_size: Annotated[int, Meta(ge=1, le=10_000_000)] = 8192
    coalesce: CoalesceConfig = msgspec.field(default_factory=CoalesceConfig)
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    sinks: list[SinkConfig] = []


def load_audit_config(obj: Any, *, path: str = "$.audit") -> AuditConfig:
    """Validate the audit section (a dict from YAML/JSON/TOML) into an AuditConfig.

    Raises :class:`~takakrypt.errors.ConfigError` whose message names the field, with
    ``path`` as the prefix (``$.audit.sinks[0].port``).
    """
    try:
        return msgspec.convert(obj, AuditConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(_reroot(str(e), path)) from None


def _reroot(message: str, prefix: str) -> str:
    # msgspec says "... - at `$.sinks[0].port`"; the audit section is not the root
    if "`$" in message:
        return message.replace("`$", "`" + prefix, 1)
    return f"{message} - at `{prefix}`"


def build_sink(cfg: SinkConfig, *, path: str = "$.audit.sinks[?]") -> Sink:
    """Construct the sink described by ``cfg`` (ConfigError if it cannot be opened)."""
    try:
        if isinstance(cfg, FileSinkConfig):
            return FileSink(
                cfg.path, format=cfg.format, max_bytes=cfg.max_bytes, backups=cfg.backups,
                name=cfg.name,
            )
        return SyslogSink(
            cfg.host, cfg.port, transport=cfg.transport, format=cfg.format,
            facility=parse_facility(cfg.facility), app_name=cfg.app_name,
            ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file,
            server_name=cfg.server_name, buffer_size=cfg.buffer_size,
            connect_timeout=cfg.connect_timeout, send_timeout=cfg.send_timeout,
            reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max,
            name=cfg.name,
        )
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot open audit sink: {e} - at `{path}`") from None


def build_logger(
    cfg: AuditConfig | dict[str, Any], host: str | None = None, *, path: str = "$.audit"
) -> AuditLogger:
    """An :class:`AuditLogger` with one sink per entry of ``cfg.sinks``.

    ``cfg`` may be the raw dict of the audit section (validated here).  Sinks already
    built are closed again if a later one fails.
    """
    if not isinstance(cfg, AuditConfig):
        cfg = load_audit_config(cfg, path=path)
    sinks: list[Sink] = []
    names: set[str] = set()
    try:
        for i, sc in enumerate(cfg.sinks):
            sink = build_sink(sc, path=f"{path}.sinks[{i}]")
            sinks.append(sink)
            if sink.name in names:
                sink.name = f"{sink.name}#{i}"
            names.add(sink.name)
    except BaseException:
        for s in sinks:
            s.close(0)
        raise
    coalescer = Coalescer(window=cfg.coalesce.window_seconds, max_open=cfg.coalesce.max_open,
                          rate=cfg.rate_limit.per_caller, burst=cfg.rate_limit.burst)
    return AuditLogger(sinks, queue_size=cfg.queue_size, host=host, coalescer=coalescer)
