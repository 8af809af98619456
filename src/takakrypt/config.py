"""The agent's configuration: one YAML file decoded into typed structures (msgspec).

Every error names the field path and the line, e.g.::

    config.yaml:14: $.policies.pgdata.rules[2].effects[0]: unknown effect 'alow'

Decoding happens in two passes: msgspec converts each section into its Struct (types,
unknown fields), then :func:`_check` validates meaning (references between sections,
action and effect names, globs, times).  The YAML is composed with position marks so
any path can be mapped back to its line.  docs/policy.md documents every field.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Callable
from typing import Any

import msgspec
import yaml

from .errors import ConfigError

# ---------------------------------------------------------------------------------------
# actions and effects

ACTIONS = ("read", "write", "append", "truncate", "create", "delete", "rename", "link",
           "getattr", "setattr", "list", "mkdir", "rmdir", "getxattr", "setxattr")
ACTION_GROUPS = {
    "read_ops": ("read", "getattr", "list", "getxattr"),
    "write_ops": ("write", "append", "truncate", "create", "delete", "rename", "link",
                  "setattr", "mkdir", "rmdir", "setxattr"),
    "all_ops": ACTIONS,
}
EFFECTS = ("permit", "deny", "apply_key", "audit")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: enforcement points a guard point can use (``engine``); the first is the default
ENGINES = ("fuse", "kernel")
DATABASES = ("postgres", "mysql", "mongodb", "oracle", "redis", "mssql", "db2", "sqlite")


def expand_actions(names: list[str]) -> frozenset[str]:
    out: set[str] = set()
    for n in names:
        out.update(ACTION_GROUPS.get(n, (n,)))
    return frozenset(out)


# ---------------------------------------------------------------------------------------
# structures

class _S(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class UserSet(_S):
    users: list[str | int] = []
    groups: list[str | int] = []


class ProcessSet(_S):
    executables: list[str] = []   # path globs
    names: list[str] = []         # process names (comm / argv[0] basename)
    sha256: list[str] = []        # signatures of the executable
    databases: list[str] = []     # detected database types


class ResourceSet(_S):
    paths: list[str] = []         # globs relative to the guard point
    subdirectories: bool = True   # a pattern naming a directory covers what is below


class TimeSet(_S):
    days: list[str] = msgspec.field(default_factory=lambda: list(DAYS))
    start: str = "00:00"
    end: str = "24:00"
    timezone: str = "UTC"


class Rule(_S):
    effects: list[str]
    actions: list[str] = msgspec.field(default_factory=lambda: ["all_ops"])
    user_set: str | None = None       # "!name" negates
    process_set: str | None = None
    resource_set: str | None = None
    time_set: str | None = None
    description: str = ""


class Policy(_S):
    rules: list[Rule]
    learn_mode: bool = False
    description: str = ""


class GuardPoint(_S):
    path: str
    policy: str
    key: str
    backing: str | None = None    # None: in place (serve from the directory itself)
    enabled: bool = True
    metadata_cache: float = 1.0   # seconds the kernel may cache entries/attributes; 0: none
    io_uring: bool = True         # FUSE over io_uring where the kernel offers it
    read_helpers: bool = True     # large reads decrypted on the other CPUs too
    engine: str = "fuse"          # fuse | kernel (takakryptfs.ko): docs/kernel.md
    key_grace: int = 0            # engine kernel: seconds the module keeps the keys once
    #                               takakryptd died or stopped answering; 0: wiped at once
    rekey_rate: float = 32.0      # MB/s a live rekey writes (takakrypt rekey start --rate);
    #                               0: unlimited
    format: int = 2               # TAKA version of files the guard point creates (or a
    #                               rekey rewrites): 2 = a key version per block, so
    #                               rewritten blocks take a rotated key at once; 1 = one
    #                               per file (docs/file-format.md, "Version 2")


class LocalKeys(_S):
    path: str = "/var/lib/takakrypt/keystore.json"
    passphrase_file: str | None = None
    master_key_file: str | None = None


class KmipKeys(_S):
    host: str
    port: int = 5696
    # mutual TLS is required: the three files are checked in _check (a clearer message
    # than a missing field) and on the host by check_host
    ca_file: str | None = None    # CA (PEM) of the server's certificate
    cert_file: str | None = None  # this client's certificate (PEM)
    key_file: str | None = None   # its private key (PEM, mode 0600)
    timeout: float = 10.0         # seconds one KMIP request may take, connecting included
    retries: int = 3              # further tries after a connection-level failure


class OfflineKeyCache(_S):
    # sealed copies of the keys the agent used, for starts without the backend
    # (docs/keys.md, "Key cache and offline operation"); exactly one local secret
    path: str
    passphrase_file: str | None = None  # first line: the passphrase (file mode 0600/0400)
    key_file: str | None = None         # exactly 32 bytes, root-only (0600/0400)


#: keys.cache_ttl when not given: the local keystore is on this host (keys held for
#: ever, as before the key cache); a remote backend's keys expire within the hour
DEFAULT_CACHE_TTL = {"local": 0.0, "kmip": 3600.0}
MAX_CACHE_TTL = 30 * 86400


class Keys(_S):
    backend: str = "local"
    local: LocalKeys = msgspec.field(default_factory=LocalKeys)
    kmip: KmipKeys | None = None
    cache_ttl: float | None = None  # seconds a key is held without the backend confirming
    #                                 it; 0: for ever (default: local 0, kmip 3600)
    cache_revalidate: float | None = None  # seconds after which a held key is confirmed
    #                                        with the backend again (default cache_ttl / 4)
    offline_cache: OfflineKeyCache | None = None


def key_cache_times(k: Keys) -> tuple[float, float]:
    """(cache_ttl, cache_revalidate) in force for ``k``, defaults applied."""
    ttl = k.cache_ttl if k.cache_ttl is not None else DEFAULT_CACHE_TTL.get(k.backend, 0.0)
    rv = k.cache_revalidate if k.cache_revalidate is not None else ttl / 4
    return float(ttl), float(rv) if ttl else 0.0


class Metrics(_S):
    address: str = "127.0.0.1"
    port: int = 9477
    enabled: bool = True


class Cache(_S):
    ttl_seconds: float = 30.0
    max_entries: int = 65536


class Agent(_S):
    control_socket: str = "/run/takakrypt/control.sock"
    protocol_socket: str = "/run/takakrypt/agent.sock"
    pid_file: str = "/run/takakrypt/takakryptd.pid"
    state_dir: str = "/var/lib/takakrypt"   # engine kernel: live rekey state (0700)
    request_timeout: float = 5.0
    key_requests: bool = False    # serve KEY_REQUEST/ENCRYPT/DECRYPT on the protocol socket
    metrics: Metrics | None = None
    cache: Cache = msgspec.field(default_factory=Cache)
    log_level: str = "info"


class Config(_S):
    version: int = 1
    agent: Agent = msgspec.field(default_factory=Agent)
    keys: Keys = msgspec.field(default_factory=Keys)
    user_sets: dict[str, UserSet] = {}
    process_sets: dict[str, ProcessSet] = {}
    resource_sets: dict[str, ResourceSet] = {}
    time_sets: dict[str, TimeSet] = {}
    policies: dict[str, Policy] = {}
    guard_points: list[GuardPoint] = []
    audit: Any = None  # audit.config.AuditConfig, converted in _convert_audit
    source: str = ""   # file the config came from (not in YAML)


# ---------------------------------------------------------------------------------------
# YAML with line numbers

class _Located:
    """Plain Python data from YAML plus a map from JSON path to line number."""

    MAX_NODES = 200_000  # aliases can multiply nodes ("billion laughs"): cap the total

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.count = 0

    def build(self, node: yaml.Node, path: str) -> Any:
        self.count += 1
        if self.count > self.MAX_NODES:
            raise ConfigError(f"configuration too large (more than {self.MAX_NODES} values, "
                              "aliases included)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                key = self.build(knode, path + ".<key>")
                if not isinstance(key, (str, int)):
                    raise ConfigError(f"{path}: mapping keys must be strings")
                if key in out:
                    raise ConfigError(f"line {knode.start_mark.line + 1}: {path}: duplicate "
                                      f"key {key!r}")
                self.lines.setdefault(f"{path}.{key}", knode.start_mark.line + 1)
                out[key] = self.build(vnode, f"{path}.{key}")
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        return yaml.SafeLoader.construct_object(_LOADER, node)  # scalars

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if path != "$" else ""
        return None


class _ScalarLoader(yaml.SafeLoader):
    def __init__(self) -> None:  # no stream: only used to construct scalars
        yaml.SafeLoader.__init__(self, "")


_LOADER = _ScalarLoader()


class _Errors:
    def __init__(self, source: str, loc: _Located) -> None:
        self.source, self.loc = source, loc
        self.items: list[str] = []
        self.paths: list[str] = []
        # names of sets/policies that failed to decode (references to them are not
        # reported again) and top-level fields left out after an error
        self.broken: set[str] = set()
        self.dropped: set[str] = set()

    def add(self, path: str, msg: str) -> None:
        self.paths.append(path)
        line = self.loc.line(path)
        where = f"{self.source}:{line}: " if line else (f"{self.source}: " if self.source else "")
        self.items.append(f"{where}{path}: {msg}")

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            err = ConfigError(first + more)
            err.all = list(self.items)  # type: ignore[attr-defined]
            raise err


def _convert(obj: Any, typ: Any, path: str, errors: _Errors) -> Any:
    try:
        return msgspec.convert(obj, typ, strict=True)
    except msgspec.ValidationError as e:
        text = str(e)
        m = re.search(r" - at `\$(.*)`$", text)
        sub = m.group(1) if m else ""
        msg = text[: m.start()] if m else text
        unknown = re.match(r"Object contains unknown field `(.*)`$", msg)
        if unknown:
            sub, msg = f"{sub}.{unknown.group(1)}", "unknown field"
        msg = msg.replace("Object missing required field", "missing required field")
        errors.add(path + sub, msg[0].lower() + msg[1:] if msg else msg)
        return None


# ---------------------------------------------------------------------------------------
# loading

#: ``host(cfg, add)``: checks of what the configuration names on this machine (see
#: :func:`check_host`), ``add(path, message)`` records an error.
HostCheck = Callable[["Config", Callable[[str, str], None]], None]


def load(path: str, *, host: HostCheck | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return loads(text, source=path, host=host)


def loads(text: str, *, source: str = "<config>", host: HostCheck | None = None) -> Config:
    """Decode and validate a configuration; raises ConfigError naming path and line,
    with every error found in ``.all``.  ``host``: also check what the file names on
    this machine (the daemon and ``config check`` pass the same one)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}: " if mark else f"{source}: "
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    if node is None:
        raise ConfigError(f"{source}: empty configuration")
    loc = _Located()
    try:
        raw = loc.build(node, "$")
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML value: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    errors = _Errors(source, loc)
    if not isinstance(raw, dict):
        errors.add("$", "the configuration must be a mapping")
        errors.raise_if_any()
    cfg = _decode(raw, errors)
    if cfg is None:
        errors.raise_if_any()
    assert cfg is not None
    _check(cfg, errors)
    if host is not None and not errors.dropped:
        host(cfg, errors.add)
    errors.raise_if_any()
    cfg.source = source
    return cfg


_SECTIONS = {"user_sets": UserSet, "process_sets": ProcessSet, "resource_sets": ResourceSet,
             "time_sets": TimeSet, "policies": Policy}


def _decode(raw: dict[str, Any], errors: _Errors) -> Config | None:
    top: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"$.{key}"
        if key in _SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                errors.add(path, f"expected a mapping of names to {_SECTIONS[key].__name__}")
                continue
            section = {}
            for name, item in value.items():
                if not isinstance(name, str) or not _NAME.fullmatch(name):
                    errors.add(f"{path}.{name}", "names must match [A-Za-z0-9_.-]{1,64}")
                    continue
                conv = _convert(item if item is not None else {}, _SECTIONS[key],
                                f"{path}.{name}", errors)
                if conv is not None:
                    section[name] = conv
                else:
                    errors.broken.add(name)
            top[key] = section
        elif key == "audit":
            top[key] = _convert_audit(value, errors)
        elif key == "source":
            errors.add(path, "unknown field `source`")
        else:
            top[key] = value
    rest = {k: v for k, v in top.items() if k not in _SECTIONS and k != "audit"}
    while True:  # msgspec names one error: leave that field out and convert the rest
        cfg = _convert(rest, Config, "$", errors)
        if cfg is not None:
            break
        m = re.match(r"\$\.([^.\[]+)", errors.paths[-1] if errors.paths else "")
        if not m or m.group(1) not in rest:
            return None
        del rest[m.group(1)]
        errors.dropped.add(m.group(1))
    for key in _SECTIONS:
        if key in top:
            setattr(cfg, key, top[key])
    cfg.audit = top.get("audit")
    return cfg


def _convert_audit(value: Any, errors: _Errors) -> Any:
    try:
        from .audit.config import AuditConfig
    except ImportError:  # pragma: no cover - audit package always ships
        return value
    return _convert(value if value is not None else {}, AuditConfig, "$.audit", errors)


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: a key name the kernel module takes as key= (kernel/super.c key_name_ok)
KERNEL_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
_HHMM = re.compile(r"([01]\d|2[0-3]):[0-5]\d|24:00")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_hhmm(s: str) -> int:
    """Minutes since midnight of "HH:MM" (24:00 = 1440)."""
    h, m = s.split(":")
    return int(h) * 60 + int(m)


def _check_ref(errors: _Errors, path: str, ref: str | None, table: dict[str, Any],
               kind: str) -> None:
    if ref is None:
        return
    name = ref[1:] if ref.startswith("!") else ref
    if name not in table and name not in errors.broken:
        known = ", ".join(sorted(table)) or "none defined"
        errors.add(path, f"unknown {kind} '{name}' (known: {known})")


def _check(cfg: Config, errors: _Errors) -> None:
    if cfg.version != 1:
        errors.add("$.version", f"unsupported configuration version {cfg.version}")
    for name, us in cfg.user_sets.items():
        if not us.users and not us.groups:
            errors.add(f"$.user_sets.{name}", "a user set needs users or groups")
        for i, u in enumerate(us.users):
            if isinstance(u, int) and not 0 <= u < 2**32:
                errors.add(f"$.user_sets.{name}.users[{i}]", f"invalid uid {u}")
        for i, g in enumerate(us.groups):
            if isinstance(g, int) and not 0 <= g < 2**32:
                errors.add(f"$.user_sets.{name}.groups[{i}]", f"invalid gid {g}")
    for name, ps in cfg.process_sets.items():
        p = f"$.process_sets.{name}"
        if not (ps.executables or ps.names or ps.sha256 or ps.databases):
            errors.add(p, "a process set needs executables, names, sha256 or databases")
        for i, e in enumerate(ps.executables):
            if not e.startswith("/"):
                errors.add(f"{p}.executables[{i}]", f"executable glob must be absolute: {e!r}")
        for i, h in enumerate(ps.sha256):
            if not _SHA256.fullmatch(h.lower()):
                errors.add(f"{p}.sha256[{i}]", "expected 64 hex digits (SHA-256)")
        for i, d in enumerate(ps.databases):
            if d not in DATABASES:
                errors.add(f"{p}.databases[{i}]",
                           f"unknown database type '{d}' (known: {', '.join(DATABASES)})")
    for name, rs in cfg.resource_sets.items():
        p = f"$.resource_sets.{name}"
        if not rs.paths:
            errors.add(p, "a resource set needs paths")
        for i, g in enumerate(rs.paths):
            if g.startswith("/") or ".." in g.split("/"):
                errors.add(f"{p}.paths[{i}]",
                           f"paths are relative to the guard point, without '..': {g!r}")
    for name, ts in cfg.time_sets.items():
        p = f"$.time_sets.{name}"
        for i, d in enumerate(ts.days):
            if d.lower() not in DAYS:
                errors.add(f"{p}.days[{i}]", f"unknown day '{d}' (use {', '.join(DAYS)})")
        for fld in ("start", "end"):
            if not _HHMM.fullmatch(getattr(ts, fld)):
                errors.add(f"{p}.{fld}", f"expected HH:MM, got {getattr(ts, fld)!r}")
        try:
            zoneinfo.ZoneInfo(ts.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.add(f"{p}.timezone", f"unknown timezone '{ts.timezone}'")
    for name, pol in cfg.policies.items():
        p = f"$.policies.{name}"
        if not pol.rules:
            errors.add(f"{p}.rules", "a policy needs at least one rule")
        for i, r in enumerate(pol.rules):
            rp = f"{p}.rules[{i}]"
            for j, e in enumerate(r.effects):
                if e not in EFFECTS:
                    errors.add(f"{rp}.effects[{j}]", f"unknown effect '{e}'")
            eff = set(r.effects)
            if not r.effects:
                errors.add(f"{rp}.effects", "a rule needs effects")
            elif len(eff & {"permit", "deny"}) != 1:
                errors.add(f"{rp}.effects", "a rule needs exactly one of permit or deny")
            elif "apply_key" in eff and "deny" in eff:
                errors.add(f"{rp}.effects", "apply_key only goes with permit")
            if not r.actions:
                errors.add(f"{rp}.actions", "a rule needs actions")
            for j, a in enumerate(r.actions):
                if a not in ACTIONS and a not in ACTION_GROUPS:
                    errors.add(f"{rp}.actions[{j}]", f"unknown action '{a}'")
            _check_ref(errors, f"{rp}.user_set", r.user_set, cfg.user_sets, "user set")
            _check_ref(errors, f"{rp}.process_set", r.process_set, cfg.process_sets,
                       "process set")
            _check_ref(errors, f"{rp}.resource_set", r.resource_set, cfg.resource_sets,
                       "resource set")
            _check_ref(errors, f"{rp}.time_set", r.time_set, cfg.time_sets, "time set")
    _check_identity(cfg, errors)
    seen: dict[str, int] = {}
    for i, gp in enumerate(cfg.guard_points):
        p = f"$.guard_points[{i}]"
        if not os.path.isabs(gp.path):
            errors.add(f"{p}.path", f"guard point path must be absolute: {gp.path!r}")
        norm = os.path.normpath(gp.path)
        if norm in seen:
            errors.add(f"{p}.path", f"same path as guard_points[{seen[norm]}]")
        seen[norm] = i
        if gp.policy not in cfg.policies and gp.policy not in errors.broken:
            errors.add(f"{p}.policy", f"unknown policy '{gp.policy}'")
        if gp.backing is not None and not os.path.isabs(gp.backing):
            errors.add(f"{p}.backing", "backing directory must be absolute")
        if not 0 <= gp.metadata_cache <= 60:
            errors.add(f"{p}.metadata_cache", "must be between 0 and 60 seconds")
        if not 0 <= gp.rekey_rate <= 100_000:
            errors.add(f"{p}.rekey_rate", "must be between 0 (unlimited) and 100000 MB/s")
        if gp.format not in (1, 2):
            errors.add(f"{p}.format", "must be 1 or 2 (the TAKA file format version of new "
                       "files)")
        if not 0 <= gp.key_grace <= 86400:
            errors.add(f"{p}.key_grace", "must be between 0 and 86400 seconds")
        elif gp.key_grace and gp.engine != "kernel":
            errors.add(f"{p}.key_grace", "only engine kernel keeps keys without takakryptd "
                       "(a FUSE guard point ends with its process)")
        if gp.engine not in ENGINES:
            errors.add(f"{p}.engine", f"unknown engine {gp.engine!r} (use fuse or kernel)")
        elif gp.engine == "kernel" and not KERNEL_KEY_NAME.fullmatch(gp.key):
            # the key name becomes the mount option key=: a comma would add another one
            errors.add(f"{p}.key", f"engine kernel needs a key name of 1 to 63 characters "
                       f"[A-Za-z0-9._-], not starting with . or -: {gp.key!r}")
    if cfg.keys.backend not in ("local", "kmip"):
        errors.add("$.keys.backend", f"unknown key backend '{cfg.keys.backend}'")
    if cfg.keys.backend == "kmip" and cfg.keys.kmip is None:
        errors.add("$.keys.kmip", "backend kmip needs a kmip section")
    if cfg.keys.kmip is not None:
        _check_kmip(cfg.keys.kmip, cfg.keys.backend == "kmip", errors)
    _check_key_cache(cfg.keys, errors)
    if not os.path.isabs(cfg.agent.state_dir):
        errors.add("$.agent.state_dir", "must be an absolute path")
    if cfg.agent.request_timeout <= 0:
        errors.add("$.agent.request_timeout", "must be positive")
    if cfg.agent.cache.max_entries < 1:
        errors.add("$.agent.cache.max_entries", "must be at least 1")
    if not cfg.agent.cache.ttl_seconds > 0:
        errors.add("$.agent.cache.ttl_seconds", "must be positive")
    if cfg.agent.log_level not in ("debug", "info", "warning", "error"):
        errors.add("$.agent.log_level", f"unknown log level '{cfg.agent.log_level}'")


def _check_key_cache(k: Keys, errors: _Errors) -> None:
    if k.cache_ttl is not None and not 0 <= k.cache_ttl <= MAX_CACHE_TTL:
        errors.add("$.keys.cache_ttl", f"must be between 0 (keys held for ever) and "
                   f"{MAX_CACHE_TTL} seconds, not {k.cache_ttl}")
    elif k.cache_revalidate is not None:
        ttl = key_cache_times(k)[0]
        if not ttl:
            errors.add("$.keys.cache_revalidate", "needs a cache_ttl above 0 (with 0 keys "
                       "are held for ever and never revalidated)")
        elif not 0 < k.cache_revalidate <= ttl:
            errors.add("$.keys.cache_revalidate", f"must be more than 0 and at most "
                       f"cache_ttl ({ttl:g}) seconds, not {k.cache_revalidate}")
    oc = k.offline_cache
    if oc is not None:
        if not os.path.isabs(oc.path):
            errors.add("$.keys.offline_cache.path", "must be absolute")
        if bool(oc.passphrase_file) == bool(oc.key_file):
            errors.add("$.keys.offline_cache", "give exactly one of passphrase_file or "
                       "key_file")


def _check_kmip(k: KmipKeys, used: bool, errors: _Errors) -> None:
    p = "$.keys.kmip"
    if not k.host.strip():
        errors.add(f"{p}.host", "must be a host name or address")
    if not 1 <= k.port <= 65535:
        errors.add(f"{p}.port", f"must be between 1 and 65535, not {k.port}")
    if not 0 < k.timeout <= 3600:
        errors.add(f"{p}.timeout", f"must be more than 0 and at most 3600 seconds, "
                   f"not {k.timeout}")
    if not 0 <= k.retries <= 20:
        errors.add(f"{p}.retries", f"must be between 0 and 20, not {k.retries}")
    if used:
        for fld in ("ca_file", "cert_file", "key_file"):
            if not getattr(k, fld):
                errors.add(f"{p}.{fld}", "required: the KMIP backend needs mutual TLS "
                           "(ca_file, cert_file and key_file)")


def check_host(cfg: Config, add: Callable[[str, str], None],
               key_names: Callable[[Keys], set[str] | None] | None) -> None:
    """What the daemon needs from this machine, each failure through ``add``: usable key
    credentials and backend, the (enabled) guard points' directories, and, through
    ``key_names`` (the names the configured backend holds; it raises an Error when the
    backend cannot be opened, returns None when it is down and that is no error), the
    guard points' keys."""
    k = cfg.keys
    usable = True
    if k.backend == "kmip":
        km = k.kmip
        usable = km is not None  # else reported by _check
        for fld in ("ca_file", "cert_file", "key_file"):
            f = getattr(km, fld) if km is not None else None
            if not f:  # reported by _check
                usable = False
            elif not os.access(f, os.R_OK):
                add(f"$.keys.kmip.{fld}", f"cannot read {f}: "
                    + ("no such file" if not os.path.exists(f) else "permission denied"))
                usable = False
            elif fld == "key_file" and os.stat(f).st_mode & 0o077:
                add(f"$.keys.kmip.{fld}", f"{f} is readable by group or others (mode "
                    f"{os.stat(f).st_mode & 0o777:04o}): the client key must be private "
                    f"(chmod 600 {f})")
                usable = False
    elif k.backend == "local":
        loc = k.local
        if bool(loc.passphrase_file) == bool(loc.master_key_file):
            add("$.keys.local", "give exactly one of passphrase_file or master_key_file")
            usable = False
        for fld in ("passphrase_file", "master_key_file"):
            f = getattr(loc, fld)
            if f and not os.access(f, os.R_OK):
                add(f"$.keys.local.{fld}", f"cannot read {f}: "
                    + ("no such file" if not os.path.exists(f) else "permission denied"))
                usable = False
        if not os.path.isfile(loc.path):
            add("$.keys.local.path", f"no keystore at {loc.path} (create a key first: "
                "takakrypt keys create NAME)")
            usable = False
    oc = k.offline_cache
    if oc is not None:
        from .keys.offline import secret_file_problem

        if oc.key_file and (why := secret_file_problem(oc.key_file, size=32)):
            add("$.keys.offline_cache.key_file", why)
        if oc.passphrase_file and (why := secret_file_problem(oc.passphrase_file)):
            add("$.keys.offline_cache.passphrase_file", why)
        if os.path.lexists(oc.path) and not os.path.isfile(oc.path):
            add("$.keys.offline_cache.path", f"{oc.path} is not a regular file")
    mounted = _mount_points()
    for i, gp in enumerate(cfg.guard_points):
        if not gp.enabled:
            continue
        for fld in ("path", "backing"):
            d = getattr(gp, fld)
            # a mount point exists; and stat on it may ask a FUSE server (the agent itself,
            # which is then blocked in this very check) or hang on a dead one
            if d is not None and os.path.isabs(d) and os.path.normpath(d) not in mounted \
                    and not os.path.isdir(d):
                add(f"$.guard_points[{i}].{fld}", f"{d} is not a directory" if
                    os.path.exists(d) else f"{d} does not exist")
    wanted = [(i, gp.key) for i, gp in enumerate(cfg.guard_points) if gp.enabled]
    if not wanted or key_names is None or not usable:
        return
    from .errors import Error

    try:
        names = key_names(k)
    except Error as e:
        add("$.keys", f"cannot open the key backend to check the guard points' keys: {e}")
        return
    if names is None:  # the backend is down: takakryptd starts closed, checks them later
        return
    for i, name in wanted:
        if name not in names:
            add(f"$.guard_points[{i}].key", f"key '{name}' not found in the key backend "
                f"(create it: takakrypt keys create {name})")


def _mount_points() -> set[str]:
    """Mount points of this mount namespace (/proc/self/mountinfo: no stat of any)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ", 5) for line in f]
    except OSError:
        return set()
    # octal escapes: \040 space, \011 tab, \012 newline, \134 backslash
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), x[4])
            for x in fields if len(x) > 4}


def _name_only(cfg: Config, ref: str | None) -> tuple[str, bool, str] | None:
    """(set name, negated, "names and databases") if ``ref`` names a process set that
    identifies callers only by what they choose (no executables, no sha256)."""
    if ref is None:
        return None
    neg = ref.startswith("!")
    name = ref[1:] if neg else ref
    ps = cfg.process_sets.get(name)
    if ps is None or ps.executables or ps.sha256:
        return None
    return name, neg, " and ".join(k for k in ("names", "databases") if getattr(ps, k))


def _check_identity(cfg: Config, errors: _Errors) -> None:
    """A permit must never rest on a name the caller chooses (docs/policy.md, "Process
    identity"): ``names`` match comm or argv[0], which a program sets as it likes
    (``exec -a postgres``); ``databases`` match the executable's basename, which anyone
    who can copy a file chooses."""
    for pname, pol in cfg.policies.items():
        for i, r in enumerate(pol.rules):
            weak = _name_only(cfg, r.process_set)
            if weak and not weak[1] and "permit" in r.effects:
                errors.add(f"$.policies.{pname}.rules[{i}].process_set",
                           f"process set '{weak[0]}' identifies callers only by {weak[2]}, "
                           "which the caller chooses: a permit must also name executables "
                           "(and preferably sha256)")


def identity_warnings(cfg: Config) -> list[str]:
    """Rules that exclude callers only by name or database type (a negated process set,
    or one in a deny rule): a program that takes another name gets past the exclusion.
    ``config check`` warns, ``config check --strict`` refuses."""
    out = []
    for pname, pol in cfg.policies.items():
        for i, r in enumerate(pol.rules):
            weak = _name_only(cfg, r.process_set)
            if weak and (weak[1] or "permit" not in r.effects):
                out.append(f"$.policies.{pname}.rules[{i}].process_set: process set "
                           f"'{weak[0]}' identifies callers only by {weak[2]}, which the "
                           "caller chooses: a program under another name is not excluded; "
                           "add executables (and sha256)")
    return out
