"""`takakrypt`: the command-line interface.

Every command reports user errors as one line on stderr (``takakrypt: error: ...``)
and exits with the code of the error class (errors.EXIT_CODES); ``--json`` output is
for scripts and is the only thing printed on stdout in that mode.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from . import __version__
from . import format as fmt
from .errors import EXIT_CODES, Error, UsageError

PROG = "takakrypt"

ENVIRONMENT = """\
environment:
  TAKAKRYPT_KEYSTORE          keystore file (default: /var/lib/takakrypt/keystore.json
                              for root, ~/.local/share/takakrypt/keystore.json otherwise)
  TAKAKRYPT_PASSPHRASE        keystore passphrase (prefer --passphrase-file)
  TAKAKRYPT_PASSPHRASE_FILE   file whose first line is the keystore passphrase
  TAKAKRYPT_MASTER_KEY_FILE   32-byte master key file unlocking the keystore instead
  TAKAKRYPT_CONFIG            keys commands: use this configuration's key backend
"""


def _exit_table() -> str:
    rows = "\n".join(f"  {code:<3} {text}" for code, text in sorted(EXIT_CODES.items()))
    return f"exit status:\n{rows}\n"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=92)


# keystore access ---------------------------------------------------------------------------

def _default_keystore() -> str:
    if os.geteuid() == 0:
        return "/var/lib/takakrypt/keystore.json"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "takakrypt", "keystore.json")


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            line = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from None
    if not line:
        raise UsageError(f"passphrase file {path} is empty")
    return line


def _unlock_args(args: argparse.Namespace, *, creating: bool) -> dict[str, Any]:
    pfile = args.passphrase_file or os.environ.get("TAKAKRYPT_PASSPHRASE_FILE")
    mfile = args.master_key_file or os.environ.get("TAKAKRYPT_MASTER_KEY_FILE")
    if pfile and mfile:
        raise UsageError("give either a passphrase or a master key file, not both")
    if mfile:
        return {"master_key_file": mfile}
    if pfile:
        return {"passphrase": _read_secret_file(pfile)}
    env = os.environ.get("TAKAKRYPT_PASSPHRASE")
    if env:
        return {"passphrase": env.encode()}
    if sys.stdin.isatty():
        p1 = getpass.getpass("Keystore passphrase: ")
        if creating:
            if getpass.getpass("Repeat passphrase: ") != p1:
                raise UsageError("passphrases do not match")
        if not p1:
            raise UsageError("empty passphrase")
        return {"passphrase": p1.encode()}
    raise UsageError("no passphrase: use --passphrase-file, TAKAKRYPT_PASSPHRASE or "
                     "--master-key-file")


def _keystore_path(args: argparse.Namespace) -> tuple[str, str]:
    """The keystore file and where it was named."""
    if args.keystore:
        return args.keystore, "--keystore"
    if os.environ.get("TAKAKRYPT_KEYSTORE"):
        return os.environ["TAKAKRYPT_KEYSTORE"], "TAKAKRYPT_KEYSTORE"
    return _default_keystore(), "the default keystore"


def _keystore(args: argparse.Namespace, *, create: bool = False):  # type: ignore[no-untyped-def]
    from .keys import open_keystore

    path = _keystore_path(args)[0]
    creating = create and not os.path.exists(path)
    if not create and not os.path.exists(path):
        raise UsageError(f"no keystore at {path} (create a key first: takakrypt keys create NAME)")
    return open_keystore(path, create=creating, **_unlock_args(args, creating=creating))


def _keys_backend(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The key backend the command works on: the configuration's (``--config``, local
    or KMIP, as takakryptd opens it) or the local keystore of the keystore options."""
    cfg = getattr(args, "config", None) or os.environ.get("TAKAKRYPT_CONFIG")
    if not cfg:
        return _keystore(args)
    if args.keystore or args.passphrase_file or args.master_key_file:
        raise UsageError("give either --config or the keystore options, not both")
    from .agent.keymanager import load_config, open_backend

    return open_backend(load_config(cfg, check_keys=False).keys)


def _key_info_dict(info: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(info)


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        print(text)


def _describe_key(info: Any) -> str:
    lines = [f"name:            {info.name}",
             f"algorithm:       {info.algorithm}",
             f"backend:         {info.backend}",
             f"current version: {info.current_version}",
             "versions:"]
    lines += [f"  {v.version:>4}  created {v.created}  {v.state}" for v in info.versions]
    return "\n".join(lines)


DEFAULT_CONTROL_SOCKET = "/run/takakrypt/control.sock"


def _control_socket(args: argparse.Namespace) -> str:
    return (getattr(args, "control_socket", None) or os.environ.get("TAKAKRYPT_CONTROL_SOCKET")
            or DEFAULT_CONTROL_SOCKET)


def _live(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    from .agent.control import call

    return call(_control_socket(args), cmd, **kw)


def cmd_status(args: argparse.Namespace) -> int:
    st = _live(args, "status")
    state = st.get("state") or ("healthy" if st["healthy"] else "unhealthy")
    lines = [f"takakryptd {st['version']} pid {st['pid']}, up {st['uptime_seconds']:.0f} s, "
             f"{state if state == 'healthy' else state.upper()}",
             f"config:      {st['config']}",
             f"key backend: {st['key_backend'].get('type')} (circuit "
             f"{st['key_backend'].get('state')})",
             *_keys_lines(st.get("keys")),
             f"requests:    {st['requests']} ({st['inflight']} in flight)",
             f"reloads:     {st['reloads']['ok']} ok, {st['reloads']['failed']} failed"
             + (f" (last error: {st['last_reload_error']})" if st["last_reload_error"] else "")]
    if st.get("denying_all"):
        lines.append(f"DENYING EVERY ACCESS: {st['denying_all']}")
    lines.append("health:")
    why = st.get("problems") or {}
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {why[name]}" if name in why else "")
              for name, ok in st["health"].items()]
    lines.append("guard points:")
    lines += [f"  {'mounted  ' if g['mounted'] else 'unmounted'} {g['path']} (engine "
              f"{g.get('engine', 'fuse')}, policy {g['policy']}, key {g['key']})"
              + (" CLOSED" if g.get("closed") else "")
              + (f" error: {g['error']}" if g["error"] else "")
              for g in st["guard_points"]] or ["  (none)"]
    lines.append(f"kernel:      {_kernel_line(st.get('kernel'))}")
    if st.get("metrics"):
        lines.append(f"metrics:     {st['metrics']}")
    _out(args, st, "\n".join(lines))
    return 0 if st["healthy"] else 1


def _keys_lines(k: dict[str, Any] | None) -> list[str]:
    """The key cache's part of `status` (docs/keys.md): counts and ages, never keys."""
    if not k:
        return []
    c = k.get("cache") or {}
    age = c.get("oldest_age")
    ttl = c.get("ttl") or 0
    out = [f"keys:        {'available' if k.get('available') else 'BACKEND UNAVAILABLE'}"
           + (f" ({k.get('last_error')})" if k.get("last_error") else "")
           + f"; {c.get('keys', 0)} held"
           + (f", oldest confirmed {age:.0f} s ago" if age is not None else "")
           + (f", expire after {ttl:g} s" if ttl else ", held until stop")]
    off = k.get("offline_cache")
    if off:
        out.append("offline:     " + (f"{off.get('path')} ({off.get('keys', 0)} keys)"
                                      if off.get("usable") else "NOT USED")
                   + (f"; SERVING {', '.join(off.get('serving') or [])}"
                      if off.get("in_use") else "")
                   + (f"; problem: {off['problem']}" if off.get("problem") else ""))
    out += [f"CLOSED:      {path}: {why}" for path, why in (k.get("closed") or {}).items()]
    return out


def _kernel_line(k: dict[str, Any] | None) -> str:
    """The kernel module's part of `status`: its STATUS_REQUEST counters."""
    if not k or not k.get("loaded"):
        return "takakryptfs not loaded"
    st = k.get("status")
    if not st:
        return f"takakryptfs loaded; no status: {k.get('error') or 'not asked'}"
    v = st.get("impl_version", 0)
    return (f"takakryptfs {v >> 16}.{(v >> 8) & 255}.{v & 255}, agent "
            f"{'connected' if st.get('agent_connected') else 'NOT connected'}, "
            f"{st.get('guard_point_count', 0)} guard point(s) (generation "
            f"{st.get('config_generation', 0)}); requests {st.get('requests_sent', 0)} sent, "
            f"{st.get('requests_timed_out', 0)} timed out, {st.get('pending_requests', 0)} "
            f"pending; cache {st.get('cache_hits', 0)} hits, {st.get('cache_misses', 0)} "
            f"misses, {st.get('cache_entries', 0)}/{st.get('cache_capacity', 0)} entries; "
            f"denials {st.get('policy_denials', 0)} by policy, "
            f"{st.get('fail_closed_denials', 0)} fail-closed; {st.get('integrity_errors', 0)} "
            f"integrity errors; audit {st.get('audit_events', 0)} sent, "
            f"{st.get('audit_drops', 0)} dropped")


def cmd_reload(args: argparse.Namespace) -> int:
    r = _live(args, "reload")
    if not r.get("reloaded"):
        from .errors import ConfigError

        raise ConfigError(f"reload rejected, the running configuration stays: {r.get('error')}")
    _out(args, r, f"configuration reloaded (cache generation {r.get('generation')})")
    return 0


def cmd_guard_list(args: argparse.Namespace) -> int:
    gps = _live(args, "guard_list")
    text = "\n".join(f"{'mounted  ' if g['mounted'] else 'unmounted'} {g['path']:<40} "
                     f"engine {g.get('engine', 'fuse'):<6} policy {g['policy']:<16} key "
                     f"{g['key']}" + (f"  error: {g['error']}" if g["error"] else "")
                     for g in gps) or "(no guard points)"
    _out(args, gps, text)
    return 0


def cmd_guard_release(args: argparse.Namespace) -> int:
    r = _live(args, "guard_release", path=os.path.abspath(args.path))
    _out(args, r, f"{r['released']} released" + (f"; WARNING: {r['warning']}"
                                                  if r.get("warning") else ""))
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Start a new takakryptd that takes the guard points over (--upgrade)."""
    import subprocess

    st = _live(args, "status")
    argv = [sys.executable, "-m", "takakrypt.agent.daemon", "--config", st["config"],
            "--upgrade"]
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # a background start reports through its pipe
    r = subprocess.run(argv, env=env)
    if r.returncode == 0:
        new = _live(args, "status")
        _out(args, {"old_pid": st["pid"], "pid": new["pid"]},
             f"takakryptd restarted: pid {st['pid']} -> {new['pid']}, guard points kept")
    return r.returncode


def cmd_audit_stats(args: argparse.Namespace) -> int:
    st = _live(args, "audit_stats")
    lines = [f"queue:    {st.get('queue_depth', 0)} waiting (capacity {st.get('queue_size')})",
             f"enqueued: {st.get('enqueued', 0)}, dropped: {st.get('dropped', 0)}"]
    for name, s2 in (st.get("sinks") or {}).items():
        lines.append(f"sink {name}: " + ", ".join(f"{k} {v}" for k, v in s2.items()))
    _out(args, st, "\n".join(lines))
    return 0


# commands ----------------------------------------------------------------------------------

def cmd_keys_create(args: argparse.Namespace) -> int:
    with (_keys_backend(args) if getattr(args, "config", None) or os.environ.get(
            "TAKAKRYPT_CONFIG") else _keystore(args, create=True)) as ks:
        info = ks.create(args.name)
    _out(args, _key_info_dict(info), f"created key {info.name} version {info.current_version}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    if args.live:
        import msgspec

        from .keys import KeyInfo

        infos = [msgspec.convert(i, KeyInfo) for i in _live(args, "keys_list")]
    else:
        with _keys_backend(args) as ks:
            infos = ks.list()
    text = "\n".join(f"{i.name:<32} v{i.current_version:<5} {len(i.versions)} version(s)  "
                     f"{i.algorithm}" for i in infos) or "(no keys)"
    _out(args, [_key_info_dict(i) for i in infos], text)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    with _keys_backend(args) as ks:
        info = ks.info(args.name)
    _out(args, _key_info_dict(info), _describe_key(info))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    with _keys_backend(args) as ks:
        info = ks.rotate(args.name)
    # a running agent learns it at once (it also looks every 10 s by itself)
    from .agent.control import call
    from .errors import AgentUnavailable, Error

    try:
        call(_control_socket(args), "keys_changed", timeout=10)
        agent = "the running takakryptd re-read the keystore"
    except AgentUnavailable:
        agent = ("no takakryptd answered on its control socket; a running agent picks "
                 "it up within 10 s (or at once: takakrypt reload)")
    except Error as e:
        agent = f"takakryptd could not re-read the keystore ({e}): run takakrypt reload"
    _out(args, _key_info_dict(info) | {"agent": agent},
         f"rotated key {info.name}: new files, and blocks written again into files of "
         f"TAKA format 2, use version {info.current_version}; older versions stay "
         f"available for existing files; {agent}")
    return 0


def _input_size(path: str) -> int | None:
    if path == "-":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if st.st_size else None


def cmd_encrypt(args: argparse.Namespace) -> int:
    from .progress import Bar
    from .stream import encrypt_file

    if not fmt.MIN_BLOCK_SIZE <= args.block_size <= fmt.MAX_BLOCK_SIZE \
            or args.block_size & (args.block_size - 1):
        raise UsageError(f"--block-size {args.block_size}: must be a power of two from "
                         f"{fmt.MIN_BLOCK_SIZE} to {fmt.MAX_BLOCK_SIZE}")
    with _keystore(args) as ks:
        info = ks.info(args.key)
        data_key = ks.get(args.key, info.current_version)
    bar = Bar(_input_size(args.input), "encrypt", enabled=False if args.quiet else None)
    try:
        header = encrypt_file(args.input, args.output, info.name, info.current_version,
                              data_key, block_size=args.block_size, force=args.force,
                              progress=bar, allow_taka_input=args.allow_taka_input,
                              format_version=args.taka_version)
    finally:
        data_key[:] = bytes(len(data_key))
        bar.close()
    _out(args, {"output": args.output, "key_id": header.key_id,
                "key_version": header.key_version, "plaintext_size": header.plaintext_size,
                "file_id": header.file_id.hex()},
         f"encrypted {header.plaintext_size} bytes to {args.output} "
         f"(key {header.key_id} v{header.key_version})")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    from .progress import Bar
    from .stream import decrypt_file, is_stdout

    with _keystore(args) as ks:
        bar = Bar(None, "decrypt", enabled=False if args.quiet else None)
        try:
            header = decrypt_file(args.input, args.output, ks.get, force=args.force,
                                  progress=bar, on_header=lambda h: bar.start_total(
                                      h.plaintext_size))
        finally:
            bar.close()
    if not is_stdout(args.output):  # the summary would follow the plaintext there
        _out(args, {"output": args.output, "plaintext_size": header.plaintext_size,
                    "key_id": header.key_id, "key_version": header.key_version},
             f"decrypted {header.plaintext_size} bytes to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .stream import decrypt_file, inspect_file

    info = inspect_file(args.file)
    if args.verify:
        with _keystore(args) as ks:
            decrypt_file(args.file, None, ks.get)
        info["verified"] = True
    width = max(len(k) for k in info)
    _out(args, info, "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in info.items()))
    return 0


def _xform_own_files(args: argparse.Namespace) -> list[Any]:
    from . import ownfiles

    return ownfiles.collect(
        keystore=_keystore_path(args),
        passphrase_file=args.passphrase_file or os.environ.get("TAKAKRYPT_PASSPHRASE_FILE"),
        master_key_file=args.master_key_file or os.environ.get("TAKAKRYPT_MASTER_KEY_FILE"),
        configs=args.config or ())


def cmd_xform(args: argparse.Namespace) -> int:
    from . import xform
    from .errors import XformError
    from .progress import Bar

    if args.abandon:
        s = xform.abandon(args.path)
        _out(args, s.as_dict(), (f"abandoned an interrupted {s.direction} run: " if s.abandoned
                                 else "no interrupted run to abandon; ")
             + f"removed {s.cleaned_temporaries} temporary file(s)")
        return 0
    with _keystore(args) as ks:
        version = None
        if not args.decrypt:
            if not args.key:
                raise UsageError("--key NAME is required to encrypt")
            version = ks.info(args.key).current_version
        bar = Bar(None, "decrypt" if args.decrypt else "encrypt",
                  enabled=False if args.quiet else None)
        try:
            summary = xform.run(args.path, keys=ks.get, key_name=args.key, key_version=version,
                                decrypt=args.decrypt, progress=bar, wipe=args.wipe,
                                own=_xform_own_files(args), on_total=bar.start_total,
                                allow_taka_input=args.allow_taka_input,
                                format_version=args.taka_version)
        except XformError as e:  # name every file left unconverted, one line each
            e.all = [str(e)] + [  # type: ignore[attr-defined]
                f"not converted: {f['path']}: {f['reason']}" for f in e.summary.failed]
            raise
        finally:
            bar.close()
    d = summary.as_dict()
    text = (f"{summary.direction}ed {summary.converted} file(s), {summary.bytes} bytes; "
            f"{summary.already} already done; {len(summary.skipped)} skipped"
            + (f"; {summary.linked} other hard link name(s) re-pointed" if summary.linked
               else "")
            + (" (resumed an interrupted run)" if summary.resumed else ""))
    for s in summary.skipped:
        text += f"\n  skipped {s['path']}: {s['reason']}"
    if args.wipe:
        text += f"\noverwrote the original blocks of {summary.wiped} file(s)"
    elif not args.decrypt and summary.converted:
        text += ("\nthe originals' blocks were freed, not overwritten: see --wipe and "
                 "docs/operations.md")
    for s in summary.not_wiped:
        text += f"\n  not overwritten {s['path']}: {s['reason']}"
    _out(args, d, text)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from . import config
    from .agent.keymanager import load_config
    from .errors import ConfigError

    # what takakryptd checks at start and reload; a key backend that is down is a warning
    # (takakryptd starts with its guard points closed, docs/keys.md section 9)
    outages: list[str] = []
    cfg = load_config(args.file, outage_ok=True, outages=outages)
    warnings = config.identity_warnings(cfg) + [
        f"the key backend is down ({o}): the guard points' keys were not checked; takakryptd "
        "would start with its guard points closed until it answers" for o in outages]
    if warnings and args.strict:
        err = ConfigError(f"{args.file}: {warnings[0]}" + (
            f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""))
        err.all = [f"{args.file}: {w}" for w in warnings]  # type: ignore[attr-defined]
        raise err
    for w in warnings:
        print(f"{PROG}: WARNING: {args.file}: {w}", file=sys.stderr)
    engines, notes = _engine_report(cfg)
    summary = {"file": args.file, "valid": True, "policies": sorted(cfg.policies),
               "guard_points": [g.path for g in cfg.guard_points],
               "engines": engines,
               "rules": sum(len(p.rules) for p in cfg.policies.values()),
               "warnings": warnings}
    _out(args, summary, "\n".join([
        f"{args.file}: OK ({len(cfg.policies)} policies, {summary['rules']} rules, "
        f"{len(cfg.guard_points)} guard points)", *notes]))
    return 0


def _engine_report(cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Each guard point's engine; for ``engine: kernel`` whether takakryptfs is usable on
    this machine (loaded, loadable, absent) and what takakryptd will do about it."""
    from .agent.kmount import mount_data, module_state

    kernel = any(g.engine == "kernel" for g in cfg.guard_points)
    state = module_state() if kernel else None
    out, notes = [], []
    for i, g in enumerate(cfg.guard_points, 1):
        e: dict[str, Any] = {"path": g.path, "engine": g.engine, "enabled": g.enabled}
        if g.engine == "kernel" and state is not None:
            what = state.consequence()
            if state.state == "loaded":
                src = g.backing or g.path
                opts = mount_data(g.key, i, g.key_grace, g.format)
                what = (f"takakryptd mounts it (mount -t takakryptfs -o {opts} "
                        f"{src} {g.path}) once it has registered with the module")
            if not g.enabled:
                what = "disabled (enabled: false): takakryptd does not mount it"
            e["module"] = {"state": state.state, "detail": state.detail, "takakryptd": what}
            said = {"loaded": "is loaded", "loadable": "is not loaded but can be",
                    "absent": "is absent"}[state.state]
            notes.append(f"guard point {g.path}: engine kernel: takakryptfs {said} "
                         f"({state.detail}): {what}")
        out.append(e)
    return out, notes


def _resolve_user(spec: str) -> tuple[int, int, str | None]:
    import pwd

    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        if spec.isdigit():
            return int(spec), int(spec), None
        raise UsageError(f"unknown user {spec!r}") from None
    return pw.pw_uid, pw.pw_gid, pw.pw_name


def _resolve_group(spec: str) -> int:
    import grp

    if spec.isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise UsageError(f"unknown group {spec!r}") from None


def policy_check_request(cfg, a: dict[str, Any]):  # type: ignore[no-untyped-def]
    """(Request, policy name) for a policy check described by ``a`` (user, group, exe,
    name, cmdline, path, policy, op, at) — shared by the CLI and the live agent."""
    import datetime as dt

    from . import config, policy, procinfo

    uid, gid, name = _resolve_user(str(a["user"]))
    groups = tuple(os.getgrouplist(name, gid)) if name else (gid,)
    if a.get("group"):
        extra = [_resolve_group(str(g)) for g in a["group"]]
        gid, groups = extra[0], tuple(dict.fromkeys([*extra, *groups]))
    exe = os.path.realpath(a["exe"])
    try:
        exe_id = procinfo.file_identity(exe)
    except OSError as e:
        raise UsageError(f"--exe {a['exe']}: {e.strerror}") from None
    if not os.path.isfile(exe):
        raise UsageError(f"--exe {a['exe']}: not a regular file (the executable of the "
                         "process)")
    comm = a.get("name") or os.path.basename(exe)[:15]
    argv0 = tuple(a["cmdline"].split()) if a.get("cmdline") else (exe,)
    proc = procinfo.Process(pid=0, start_time=0, exe=exe, comm=comm, cmdline=argv0, uid=uid,
                            gid=gid, groups=groups, exe_id=exe_id,
                            database=procinfo.detect_database(exe))
    pol_name, rel = _policy_for_path(cfg, a["path"], a.get("policy"))
    when = None
    if a.get("at"):
        try:
            when = dt.datetime.fromisoformat(a["at"])
        except ValueError:
            raise UsageError(f"--at: not an ISO 8601 time: {a['at']!r}") from None
        if when.tzinfo is None:
            when = when.astimezone()
    if a["op"] not in config.ACTIONS:
        raise UsageError(f"unknown operation {a['op']!r} (one of {', '.join(config.ACTIONS)})")
    req = policy.Request(uid=uid, gid=gid, groups=groups, process=proc, path=rel,
                         action=a["op"], when=when)
    return req, pol_name


_CHECK_FIELDS = ("user", "group", "exe", "name", "cmdline", "path", "policy", "op", "at")


def cmd_policy_check(args: argparse.Namespace) -> int:
    from . import config, policy

    fields = {k: getattr(args, k) for k in _CHECK_FIELDS}
    if args.config:
        cfg = config.load(args.config)
        req, pol_name = policy_check_request(cfg, fields)
        out = policy.Engine(cfg).evaluate(pol_name, req, explain=True).as_dict()
        out |= {"path": req.path, "uid": req.uid, "groups": list(req.groups),
                "exe": req.process.exe, "database": req.process.database, "source": args.config}
    else:
        from .agent.control import call

        out = call(_control_socket(args), "policy_check", **fields)
        out["source"] = "live agent"
    view = ("plaintext" if out["apply_key"] else "ciphertext") if out["permit"] else "EACCES"
    out["view"] = view
    text = "\n".join([f"decision: {out['decision']} ({view})",
                      f"policy:   {out['policy']}, rule {out['rule']}",
                      f"effects:  {', '.join(out['effects'])}", "explanation:",
                      *(f"  - {n}" for n in out["explanation"])])
    _out(args, out, text)
    return 0


def _policy_for_path(cfg, path: str, policy_name: str | None) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    if policy_name:
        if policy_name not in cfg.policies:
            raise UsageError(f"unknown policy {policy_name!r}")
        if os.path.isabs(path):
            raise UsageError("with --policy, --path is relative to the guard point")
        return policy_name, os.path.normpath(path).lstrip("./") if path not in ("", ".") else ""
    if not os.path.isabs(path):
        raise UsageError("--path must be absolute (inside a guard point) unless --policy is given")
    norm = os.path.normpath(path)
    best = None
    for gp in cfg.guard_points:
        root = os.path.normpath(gp.path)
        if norm == root or norm.startswith(root.rstrip("/") + "/"):
            if best is None or len(root) > len(os.path.normpath(best.path)):
                best = gp
    if best is None:
        raise UsageError(f"{path} is not under any guard point of the configuration")
    rel = os.path.relpath(norm, os.path.normpath(best.path))
    return best.policy, "" if rel == "." else rel


# bench -------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .bench import html, report, runner
    from .bench.workloads import WORKLOAD_NAMES, Sizes
    from .errors import BenchError

    if args.compare:
        c = report.compare(report.load(args.compare[0]), report.load(args.compare[1]))
        _out(args, c, report.compare_text(c))
        return 0
    only: tuple[str, ...] = ()
    if args.workloads:
        only = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
        unknown = [w for w in only if w not in WORKLOAD_NAMES]
        if unknown:
            raise UsageError(f"unknown workload {', '.join(unknown)} (known: "
                             f"{', '.join(WORKLOAD_NAMES)})")
    sizes = Sizes.quick() if args.quick else Sizes()
    for flag, fld in (("size", "seq_mib"), ("files", "files"), ("fio_size", "fio_mib"),
                      ("fio_seconds", "fio_seconds"), ("pg_scale", "pg_scale"),
                      ("pg_seconds", "pg_seconds")):
        v = getattr(args, flag)
        if v is not None:
            if v < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
            sizes = replace(sizes, **{fld: v})
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    if rounds < 1:
        raise UsageError("--rounds must be at least 1")
    opts = runner.Options(directory=Path(args.dir), rounds=rounds, sizes=sizes, only=only,
                          allow_all=not args.no_allow_all, cold=not args.warm,
                          threads=args.threads, progress=False if args.quiet else None,
                          quick=args.quick)
    doc = runner.run(opts)
    saved = Path(args.save) if args.save else (None if args.no_save
                                               else report.default_save_path())
    if saved is not None:
        report.save(doc, saved)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(html.render(doc))
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(report.text(doc))
        if saved is not None:
            print(f"results: {saved}")
        if args.html:
            print(f"report: {args.html}")
    failed = [w["name"] for w in doc["workloads"] if w.get("errors")]
    if failed:
        raise BenchError(f"workloads failed: {', '.join(failed)} (see the table)")
    return 0


# parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("keystore")
    g.add_argument("--keystore", metavar="PATH", help="keystore file ($TAKAKRYPT_KEYSTORE)")
    g.add_argument("--passphrase-file", metavar="FILE",
                   help="read the keystore passphrase from the first line of FILE")
    g.add_argument("--master-key-file", metavar="FILE",
                   help="unlock the keystore with a 32-byte master key file instead")
    keysp = argparse.ArgumentParser(add_help=False)
    keysp.add_argument("--config", metavar="FILE",
                       help="use the key backend of this takakryptd configuration (local "
                            "keystore or KMIP) instead of the keystore options "
                            "($TAKAKRYPT_CONFIG)")
    jsonp = argparse.ArgumentParser(add_help=False)
    jsonp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    agentp = argparse.ArgumentParser(add_help=False)
    agentp.add_argument("--control-socket", metavar="PATH",
                        help="takakryptd control socket ($TAKAKRYPT_CONTROL_SOCKET, default "
                             f"{DEFAULT_CONTROL_SOCKET})")

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Takakrypt: transparent, policy-driven file encryption for Linux.\n\n"
                    "Offline tools for TAKA files (AES-256-GCM in 4 KiB authenticated blocks) "
                    "and the local keystore.",
        epilog=ENVIRONMENT + "\n" + _exit_table() + "\nSee docs/ for the file format, "
               "keystore format and security notes.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = sub.add_parser("keys", help="manage keys (local keystore or --config's backend)",
                          formatter_class=_Formatter,
                          description="Create, list, show, rotate and retire named 256-bit "
                                      "keys in the local keystore, or with --config in the "
                                      "key backend of a takakryptd configuration (local or "
                                      "KMIP). Key material is never printed.")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for name, func, help_, desc in (
        ("create", cmd_keys_create, "create a new key (and the keystore if missing)",
         "Create key NAME (version 1). Creates the keystore if it does not exist; the "
         "passphrase is then asked twice on a terminal."),
        ("show", cmd_keys_show, "show a key's versions and metadata", None),
        ("rotate", cmd_keys_rotate, "add a new version; new files and rewritten blocks "
                                    "use it",
         "Add version N+1 of key NAME. Existing files keep naming the version they were "
         "written with, which stays in the keystore so they can still be decrypted."),
    ):
        sp = ksub.add_parser(name, parents=[common, keysp, jsonp], help=help_, description=desc or help_,
                             formatter_class=_Formatter, epilog=ENVIRONMENT)
        sp.add_argument("name", metavar="NAME", help="key name: 1-63 of [A-Za-z0-9._-]")
        sp.set_defaults(func=func)
    from .cli_rekey import add_parsers as _rekey_parsers

    _rekey_parsers(sub, ksub, common=common, keysp=keysp, jsonp=jsonp, agentp=agentp, formatter=_Formatter,
                   environment=ENVIRONMENT, exit_table=_exit_table())
    sp = ksub.add_parser("list", parents=[common, keysp, jsonp, agentp], help="list keys",
                         description="List the keys in the keystore, or with --live those "
                                     "of the running agent's key backend.",
                         formatter_class=_Formatter, epilog=ENVIRONMENT)
    sp.add_argument("--live", action="store_true", help="ask the running takakryptd")
    sp.set_defaults(func=cmd_keys_list)

    io = argparse.ArgumentParser(add_help=False)
    io.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    io.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sp = sub.add_parser(
        "encrypt", parents=[common, jsonp, io], formatter_class=_Formatter,
        help="encrypt a file into TAKA format",
        description="Encrypt IN (- for stdin) into a new TAKA file OUT under the current "
                    "version of key NAME. Streams with bounded memory; OUT appears only "
                    "when complete.", epilog=ENVIRONMENT + "\n" + _exit_table())
    sp.add_argument("--key", required=True, metavar="NAME", help="key to encrypt under")
    sp.add_argument("--block-size", type=int, default=fmt.DEFAULT_BLOCK_SIZE, metavar="N",
                    help="plaintext bytes per block (power of two, 512..1048576; default 4096)")
    sp.add_argument("--allow-taka-input", action="store_true",
                    help="encrypt IN even if it is already a TAKA file (refused otherwise, "
                         "exit 2: re-keying belongs to key rotation)")
    sp.add_argument("--taka-version", type=int, choices=(1, 2), default=2, metavar="{1,2}",
                    help="TAKA format of OUT: 2 (default) gives each block its key version, "
                         "1 one version per file, for readers older than version 2 "
                         "(docs/file-format.md)")
    sp.add_argument("input", metavar="IN")
    sp.add_argument("output", metavar="OUT")
    sp.set_defaults(func=cmd_encrypt)

    sp = sub.add_parser(
        "decrypt", parents=[common, jsonp, io], formatter_class=_Formatter,
        help="decrypt a TAKA file",
        description="Decrypt TAKA file IN into OUT (- for stdout), checking the header and "
                    "every block. On any failure OUT is not created and the failing block "
                    "is named.", epilog=ENVIRONMENT + "\n" + _exit_table())
    sp.add_argument("input", metavar="IN")
    sp.add_argument("output", metavar="OUT")
    sp.set_defaults(func=cmd_decrypt)

    sp = sub.add_parser(
        "inspect", parents=[common, jsonp], formatter_class=_Formatter,
        help="show a TAKA file's header (never key material)",
        description="Print the header fields and layout of a TAKA file. Needs no key unless "
                    "--verify is given.", epilog=ENVIRONMENT + "\n" + _exit_table())
    sp.add_argument("--verify", action="store_true",
                    help="also check the header tag and every block (needs the keystore)")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_inspect)
    sp = sub.add_parser(
        "xform", parents=[common, jsonp], formatter_class=_Formatter,
        help="encrypt (or --decrypt) a directory's files in place before guarding it",
        description="Convert every regular file below PATH to a TAKA file under the current "
                    "version of key NAME (or back to plaintext with --decrypt). Each file is "
                    "written to a temporary beside it, verified by reading it back, given the "
                    "original owner, mode, times and user.* xattrs, and renamed over the "
                    "original. A journal in PATH makes an interrupted run resumable: run the "
                    "same command again. Refuses a mounted guard point (unmount first). "
                    "Refuses (exit 2, before converting anything) a PATH holding files Takakrypt itself "
                    "needs (the keystore, its lock, master-key and passphrase files, agent "
                    "configurations and the state, run and audit files they name) and TAKA "
                    "files under another key (--allow-taka-input). Every name of a hard-linked "
                    "file below PATH ends up on the one converted file; one with names outside "
                    "PATH is left as it is and makes the run fail (exit 14). Non-regular files "
                    "are skipped and listed. After a failure or an interruption, run the same "
                    "command again, or --abandon an interrupted run. "
                    "The rename frees the original's blocks WITHOUT overwriting them: the "
                    "plaintext stays readable on the device (raw image, undelete tools) "
                    "until reused. --wipe overwrites them in place (best effort, ext2/3/4, "
                    "xfs, jfs, FAT only); SSDs, copy-on-write file systems, snapshots and "
                    "backups can still hold copies. To leave no plaintext behind, encrypt "
                    "into a fresh file system and retire the old one: docs/operations.md, "
                    "\"Encrypting existing data\".",
        epilog=ENVIRONMENT + "\n" + _exit_table())
    sp.add_argument("path", metavar="PATH", help="directory to transform")
    sp.add_argument("--key", metavar="NAME", help="key to encrypt under")
    sp.add_argument("--decrypt", action="store_true", help="convert TAKA files back to "
                                                           "plaintext")
    sp.add_argument("--wipe", action="store_true",
                    help="overwrite each original's blocks with random bytes after the "
                         "rename (best effort; refused on copy-on-write file systems)")
    sp.add_argument("--allow-taka-input", action="store_true",
                    help="encrypt TAKA files under another key again, nesting them (refused "
                         "otherwise; files already under --key are always skipped)")
    sp.add_argument("--config", action="append", metavar="FILE",
                    help="an agent configuration whose files must not be transformed "
                         "(repeatable; /etc/takakrypt/*.yaml are always read)")
    sp.add_argument("--abandon", action="store_true",
                    help="give up an interrupted run: remove its temporary files and "
                         "journal, convert nothing (converted files stay converted)")
    sp.add_argument("--taka-version", type=int, choices=(1, 2), default=2, metavar="{1,2}",
                    help="TAKA format of the files made: 2 (default) or 1 (as the guard "
                         "point's `format`; docs/file-format.md)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_xform)

    sp = sub.add_parser("config", help="configuration tools", formatter_class=_Formatter,
                        description="Validate an agent configuration file.")
    csub = sp.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cp = csub.add_parser("check", parents=[jsonp], formatter_class=_Formatter,
                         help="validate a configuration without starting anything",
                         description="Decode and validate FILE. Every error names the field "
                                     "path and line; exit status 3 if invalid. A permit "
                                     "whose process set names callers only by name or "
                                     "database type (both chosen by the caller) is invalid; "
                                     "an exclusion by name only is reported with a WARNING, "
                                     "and refused with --strict (docs/policy.md, \"Process "
                                     "identity\"). A key backend that is down (KMS "
                                     "unreachable, keystore unreadable) is a WARNING too: "
                                     "takakryptd starts with its guard points closed "
                                     "(docs/keys.md, section 9).",
                         epilog=_exit_table())
    cp.add_argument("file", metavar="FILE")
    cp.add_argument("--strict", action="store_true",
                    help="refuse (exit 3) what is otherwise a warning")
    cp.set_defaults(func=cmd_config_check)

    live_desc = "Talks to the running takakryptd over its control socket (root only)."
    for name, func, help_ in (("status", cmd_status, "agent status and health "
                                                      "(exit 1 if unhealthy)"),
                              ("reload", cmd_reload, "reload the agent's configuration")):
        sp = sub.add_parser(name, parents=[jsonp, agentp], help=help_, formatter_class=_Formatter,
                            description=f"{help_[0].upper()}{help_[1:]}. {live_desc}",
                            epilog=_exit_table())
        sp.set_defaults(func=func)
    sp = sub.add_parser("guard", help="guard points of the running agent",
                        formatter_class=_Formatter, description=live_desc)
    gsub = sp.add_subparsers(dest="guard_command", metavar="ACTION", required=True)
    for name in ("list", "status"):
        gp = gsub.add_parser(name, parents=[jsonp, agentp], formatter_class=_Formatter,
                             help="guard points: mounted or not, policy, key, counters",
                             description="Guard points of the running agent. " + live_desc)
        gp.set_defaults(func=cmd_guard_list)
    gp = gsub.add_parser("release", parents=[jsonp, agentp], formatter_class=_Formatter,
                         help="take a guard point down (refused while its files are open)",
                         description="Unmount a guard point of the running agent: the "
                         "directory shows its backing files (ciphertext) again and is no "
                         "longer protected. Refused, naming the processes, while any holds "
                         "a file, a mapping or its working directory under it. Until the "
                         "next start or reload; set enabled: false to keep it down. "
                         + live_desc, epilog=_exit_table())
    gp.add_argument("path", metavar="PATH")
    gp.set_defaults(func=cmd_guard_release)
    sp = sub.add_parser("restart", parents=[jsonp, agentp], formatter_class=_Formatter,
                        help="restart takakryptd without unmounting (takakryptd --upgrade)",
                        description="Start a new takakryptd (this installation's code, the "
                        "running one's configuration) that takes every guard point's "
                        "connection over; the running one then exits. Applications keep "
                        "their open files; requests wait during the handover. If the new "
                        "one fails, the running one keeps serving. Under systemd use "
                        "`systemctl restart takakryptd` instead. " + live_desc,
                        epilog=_exit_table())
    sp.set_defaults(func=cmd_restart)
    sp = sub.add_parser("audit", help="audit trail of the running agent",
                        formatter_class=_Formatter, description=live_desc)
    asub = sp.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    ap = asub.add_parser("stats", parents=[jsonp, agentp], formatter_class=_Formatter,
                         help="audit queue depth, drops, per-sink counters",
                         description="Audit counters of the running agent. " + live_desc)
    ap.set_defaults(func=cmd_audit_stats)

    sp = sub.add_parser("policy", help="policy tools", formatter_class=_Formatter,
                        description="Ask the policy engine for a decision, with explanation.")
    psub = sp.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    pc = psub.add_parser(
        "check", parents=[jsonp], formatter_class=_Formatter,
        help="decide one access offline and explain it",
        description="Evaluate one access against the policy of a configuration file and "
                    "print the decision, the matching rule, and for every earlier rule "
                    "why it did not match. The executable is hashed from disk for SHA-256 "
                    "process sets.", epilog=_exit_table())
    pc.add_argument("--config", metavar="FILE",
                    help="configuration file (default: ask the running takakryptd, i.e. "
                         "the live policy)")
    pc.add_argument("--control-socket", metavar="PATH",
                    help="takakryptd control socket, without --config")
    pc.add_argument("--user", required=True, metavar="USER", help="user name or uid")
    pc.add_argument("--group", action="append", metavar="GROUP",
                    help="group name or gid (repeatable; the first is the primary group; "
                         "default: the user's groups)")
    pc.add_argument("--exe", required=True, metavar="PATH", help="executable of the process")
    pc.add_argument("--name", metavar="COMM", help="process name (default: exe basename)")
    pc.add_argument("--cmdline", metavar="ARGS", help="command line (for database detection)")
    pc.add_argument("--path", required=True, metavar="P",
                    help="absolute path inside a guard point (or relative with --policy)")
    pc.add_argument("--policy", metavar="NAME", help="policy to use instead of the guard "
                                                     "point's")
    pc.add_argument("--op", required=True, metavar="OP", help="action: read, write, create, ...")
    pc.add_argument("--at", metavar="TIME", help="ISO 8601 time (default: now; naive = local)")
    pc.set_defaults(func=cmd_policy_check)

    sp = sub.add_parser(
        "bench", parents=[jsonp], formatter_class=_Formatter,
        help="benchmark your disk: native against takakrypt guard points",
        description=textwrap.fill(width=88, text="Run the workloads a user cares about on DIR (your own disk) -- "
                    "sequential write and read (dd), small-file create (untar of a tree), "
                    "ls -lR, rm -rf, fio 4 KiB random read and write, pgbench when "
                    "PostgreSQL is installed -- over native DIR and over FUSE guard points "
                    "below it, in interleaved rounds, and print medians, spread (min-max) "
                    "and the speed of each guard point relative to native measured in the "
                    "same run. The guard point 'fuse (policy)' uses the policy a deployment "
                    "would write (each workload program permitted by path and SHA-256 with "
                    "the key applied, everything else denied) and is shown first; 'fuse "
                    "(allow-all)' is the engine alone. The kernel engine is measured when "
                    "it is loaded (reported as not loaded otherwise). A throwaway random "
                    "key is used; everything mounted and written is removed at the end, "
                    "also after Ctrl-C. Needs root. Results (with machine information) "
                    "are saved to benchmarks/results/bench-STAMP.json when run from the "
                    "source tree, or to --save PATH. Compare two runs with --compare A B. "
                    "See docs/benchmarking.md."),
        epilog="examples:\n"
               "  takakrypt bench --quick --html report.html        # a one-minute look\n"
               "  takakrypt bench --dir /srv/data --rounds 7         # on the disk you use\n"
               "  takakrypt bench --workloads pgbench --pg-seconds 60\n"
               "  takakrypt bench --compare old.json new.json\n\n" + _exit_table())
    sp.add_argument("--dir", default="/var/tmp", metavar="DIR",
                    help="directory on the disk to measure (default /var/tmp); a work "
                         "directory is made below it and removed at the end")
    sp.add_argument("--quick", action="store_true",
                    help="small sizes and 3 rounds: about a minute")
    sp.add_argument("--rounds", type=int, metavar="N",
                    help="rounds (default 5, 3 with --quick)")
    sp.add_argument("--size", type=int, metavar="MIB",
                    help="sequential file size in MiB (default 1024, 64 with --quick)")
    sp.add_argument("--files", type=int, metavar="N",
                    help="files in the untar tree (default 20000, 1000 with --quick)")
    sp.add_argument("--fio-size", type=int, metavar="MIB",
                    help="fio file per job in MiB (default 256, 32 with --quick)")
    sp.add_argument("--fio-seconds", type=int, metavar="S",
                    help="fio run time per round (default 10, 1 with --quick)")
    sp.add_argument("--pg-scale", type=int, metavar="N",
                    help="pgbench scale factor (default 20, 1 with --quick)")
    sp.add_argument("--pg-seconds", type=int, metavar="S",
                    help="pgbench run time per round (default 20, 2 with --quick)")
    sp.add_argument("--workloads", metavar="LIST",
                    help="comma-separated subset: seq-write, seq-read, untar, ls-lR, rm-rf, "
                         "fio-randread, fio-randwrite, pgbench (a workload brings its "
                         "group: seq-*, the tree, fio-*)")
    sp.add_argument("--no-allow-all", action="store_true",
                    help="measure the policy guard point only")
    sp.add_argument("--warm", action="store_true",
                    help="do not drop the page cache before the reads (it drops the whole "
                         "machine's cache)")
    sp.add_argument("--threads", type=int, default=4, metavar="N",
                    help="guard point engine threads (default 4)")
    sp.add_argument("--html", metavar="FILE",
                    help="write a self-contained HTML report with plots to FILE")
    sp.add_argument("--save", metavar="PATH", help="write the JSON results to PATH")
    sp.add_argument("--no-save", action="store_true",
                    help="do not write benchmarks/results/bench-STAMP.json")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sp.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="print how each workload's ratio to native changed from run A to "
                         "run B (JSON files written by earlier runs); runs nothing")
    sp.set_defaults(func=cmd_bench)
    return p


def harden_process() -> None:
    """No core dumps and no ptrace by other users' processes: key material lives in
    this process's memory while it runs."""
    import ctypes
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    harden_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("encrypt", "decrypt", "inspect"):
            from . import selftest

            selftest.run()
        return int(args.func(args))
    except Error as e:
        if getattr(args, "json", False):
            summary = getattr(e, "summary", None)  # xform: one document, the summary too
            doc = summary.as_dict() if summary is not None else {}
            doc.update(error=e.kind, message=str(e), exit_code=e.exit_code)
            print(json.dumps(doc, indent=2 if summary is not None else None, sort_keys=True))
        for line in getattr(e, "all", None) or [str(e)]:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:
        name = f"{e.filename}: " if e.filename else ""
        if getattr(args, "json", False):
            print(json.dumps({"error": "os", "message": f"{name}{e.strerror or e}",
                              "exit_code": 1}))
        print(f"{PROG}: error: {name}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
