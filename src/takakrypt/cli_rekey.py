"""``takakrypt rekey`` and ``takakrypt keys versions|retire``: rotation's CLI side
(docs/operations.md, "Rotating keys and live rekey").  The work runs in takakryptd;
these commands ask it over the control socket and show what it answers."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .errors import AgentUnavailable, KeyInUse, RekeyError, UsageError

REKEY_HELP = """\
Re-encrypt every file of a mounted guard point to its key's current version while
applications keep using it (live rekey).  takakryptd does the work, a file at a time:
each file is copied under its new per-file key beside the original and swapped in
atomically; open descriptors follow; readers see the whole old or the whole new file.
The run survives a restart of takakryptd (it resumes by itself) and writes an audit
event per file and per run.

  start   begin a run (refused while one is running or paused; --restart begins anew)
  status  progress of the guard point's run (all runs without GUARDPOINT)
  pause   stop after the current chunk; the file being copied is done again on resume
  resume  continue a paused run (optionally at another --rate)

The rate limit (MB/s of ciphertext written) comes from the guard point's rekey_rate in
the configuration (default 32) unless --rate says otherwise; 0 means unlimited.
Engine fuse guard points only.
"""


def _guard(args: argparse.Namespace) -> str:
    return os.path.abspath(args.guardpoint)


def _line(st: dict[str, Any]) -> str:
    if st.get("state") == "none":
        return f"{st['guard']}: no rekey started"
    pct = 100.0 * float(st.get("progress", 0.0))
    limit = f"{st['rate'] / 1e6:g} MB/s" if st["rate"] else "none"
    s = (f"{st['guard']}: {st['state']}, key {st['key']} -> version {st['target_version']}, "
         f"{st['files_done']}/{st['files_total']} files ({pct:.1f}% of "
         f"{st['bytes_total'] / 1e6:.1f} MB), {st['files_rekeyed']} rekeyed, "
         f"{st['files_current']} already current, {st['files_skipped']} skipped, "
         f"{st['files_failed']} failed, {st['busy']} busy; "
         f"{st['rate_reached'] / 1e6:.1f} MB/s (limit {limit})")
    if st.get("phase") == "sweep" and st.get("state") == "running":
        s += f"; checking the headers again (sweep {st.get('sweeps', 0)})"
    if st.get("files_swept"):
        s += f"; {st['files_swept']} found on an older version after the walk (renamed)"
    if st.get("reason"):
        s += f"; {st['reason']}"
    for e in st.get("errors") or []:
        s += f"\n  {e['path']}: {e['error']}"
    return s


def _wait(args: argparse.Namespace, live: Any, st: dict[str, Any]) -> dict[str, Any]:
    from .progress import Bar

    bar = Bar(st.get("bytes_total") or None, f"rekey {st['guard']}",
              enabled=None if not args.quiet else False)
    shown = 0
    try:
        while st["state"] == "running":
            time.sleep(0.5)
            st = live("rekey", op="status", guard=st["guard"])
            if st.get("bytes_total") and not bar.total:
                bar.start_total(st["bytes_total"])
            done = int(st.get("bytes_rekeyed", 0))
            bar(done - shown)
            shown = done
    finally:
        bar.close()
    return st


def _finish(args: argparse.Namespace, st: dict[str, Any]) -> int:
    from .cli import _out

    _out(args, st, _line(st))
    if getattr(args, "wait", False):
        if st["state"] != "done":
            raise RekeyError(f"rekey of {st['guard']} is {st['state']}"
                             + (f": {st['reason']}" if st.get("reason") else ""))
        if st["files_failed"]:
            raise RekeyError(f"rekey of {st['guard']} finished with {st['files_failed']} "
                             "file(s) not rekeyed (listed above); they still use older "
                             "versions")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from .cli import _live, _out

    def live(cmd: str, **kw: Any) -> Any:
        return _live(args, cmd, **kw)

    op = args.rekey_command
    if op == "status" and args.guardpoint is None:
        sts = live("rekey", op="status")["rekeys"]
        _out(args, sts, "\n".join(_line(s) for s in sts) or "(no rekey on any guard point)")
        return 0
    if args.guardpoint is None:
        raise UsageError(f"rekey {op}: name the guard point")
    kw: dict[str, Any] = {"op": op, "guard": _guard(args)}
    if op in ("start", "resume") and args.rate is not None:
        kw["rate"] = args.rate
    if op == "start":
        kw["version"] = args.version or 0
        kw["restart"] = args.restart
    st = live("rekey", **kw)
    if getattr(args, "wait", False) and st.get("state") == "running":
        st = _wait(args, live, st)
    return _finish(args, st)


def _usage(args: argparse.Namespace, name: str) -> dict[str, Any] | None:
    from .cli import _live

    if not args.usage:
        return None
    try:
        return _live(args, "key_usage", guard=os.path.abspath(args.usage), key=name)  # type: ignore[no-any-return]
    except AgentUnavailable:
        # no takakryptd: the guard point is not mounted, its directory holds the files
        from .agent.rekey import usage

        path = os.path.abspath(args.usage)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            from .guard import fuse_mounts

            if path in fuse_mounts():
                raise UsageError(f"{path} is mounted but no takakryptd answers on its "
                                 "control socket (--control-socket?)") from None
            return usage(fd, name) | {"guard": path, "read": "directly (no takakryptd)"}
        finally:
            os.close(fd)


def cmd_keys_versions(args: argparse.Namespace) -> int:
    from .cli import _keys_backend, _out

    with _keys_backend(args) as ks:
        info = ks.info(args.name)
    use = _usage(args, args.name)
    rows = []
    for v in info.versions:
        n = None if use is None else use["versions"].get(str(v.version),
                                                           use["versions"].get(v.version, 0))
        rows.append({"version": v.version, "created": v.created, "state": v.state,
                     "current": v.version == info.current_version, "files": n})
    text = [f"key {info.name} ({info.backend}), current version {info.current_version}"]
    for r in rows:
        text.append(f"  v{r['version']:<5} {r['state']:<8} created {r['created']}"
                    + ("  current" if r["current"] else "")
                    + (f"  {r['files']} file(s) in {use['guard']}" if use is not None else ""))
    if use is not None:
        if use["other_keys"]:
            text.append("  other keys named by files: " + ", ".join(
                f"{k} ({n})" for k, n in use["other_keys"].items()))
        if use["unreadable"]:
            text.append(f"  {use['unreadable']} file(s) without a readable TAKA header")
    _out(args, {"key": info.name, "current_version": info.current_version,
                "versions": rows, "usage": use}, "\n".join(text))
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    from .cli import _keys_backend, _out

    with _keys_backend(args) as ks:
        info = ks.info(args.name)
        if args.version == info.current_version:
            raise KeyInUse(f"version {args.version} is the current version of key "
                           f"{args.name}: rotate first (takakrypt keys rotate {args.name}), "
                           "then rekey the guard points")
        if not args.usage:
            raise UsageError("keys retire: name every guard point that uses the key with "
                             "--usage GUARDPOINT (repeatable); retiring is checked against "
                             "their files")
        users: list[str] = []
        for gp in args.usage:
            ns = argparse.Namespace(**{**vars(args), "usage": gp})
            use = _usage(ns, args.name)
            assert use is not None
            n = use["versions"].get(str(args.version), use["versions"].get(args.version, 0))
            if n:
                users.append(f"{use['guard']}: {n} file(s), e.g. "
                             f"{use['examples'].get(str(args.version), use['examples'].get(args.version, '?'))}")
            if use["unreadable"]:
                users.append(f"{use['guard']}: {use['unreadable']} file(s) whose header "
                             "cannot be read (they might use it)")
        if users:
            raise KeyInUse(f"version {args.version} of key {args.name} is still in use: "
                           + "; ".join(users) + " (takakrypt rekey start GUARDPOINT)")
        out = ks.retire(args.name, args.version)
    _out(args, _key_info(out), f"retired version {args.version} of key {args.name}: its "
         "material is destroyed; files naming it can no longer be read")
    return 0


def _key_info(info: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(info)  # type: ignore[no-any-return]


def add_parsers(sub: Any, ksub: Any, *, common: Any, keysp: Any, jsonp: Any, agentp: Any,
                formatter: Any, environment: str, exit_table: str) -> None:
    from .cli import cmd_keys_rotate  # noqa: F401  (rotation lives there)

    sp = ksub.add_parser(
        "versions", parents=[common, keysp, jsonp, agentp], formatter_class=formatter,
        help="a key's versions, and with --usage how many files use each",
        description="List the versions of key NAME. With --usage GUARDPOINT, count the "
        "files of that guard point naming each version in their header (asks the running "
        "takakryptd, which reads the backing files under the mount; without takakryptd "
        "the unmounted directory is read directly).", epilog=environment)
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--usage", metavar="GUARDPOINT", help="count the guard point's files")
    sp.set_defaults(func=cmd_keys_versions)
    sp = ksub.add_parser(
        "retire", parents=[common, keysp, jsonp, agentp], formatter_class=formatter,
        help="destroy an old key version no file uses any more",
        description="Retire version N of key NAME: its material is destroyed for good "
        "(local keystore: erased from the file; KMIP: revoked and destroyed), so files "
        "still naming it could never be read again. Refused (exit 18) for the current "
        "version, and while any file of the guard points named with --usage still uses "
        "it or has a header that cannot be read: run takakrypt rekey first.",
        epilog=environment + "\n" + exit_table)
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--version", type=int, required=True, metavar="N")
    sp.add_argument("--usage", metavar="GUARDPOINT", action="append",
                    help="a guard point using the key (repeat for each)")
    sp.set_defaults(func=cmd_keys_retire)

    sp = sub.add_parser("rekey", help="re-encrypt a guard point to the key's current version",
                        formatter_class=formatter, description=REKEY_HELP,
                        epilog=exit_table)
    rsub = sp.add_subparsers(dest="rekey_command", metavar="ACTION", required=True)
    for op, help_ in (("start", "begin a live rekey of GUARDPOINT"),
                      ("status", "progress of a rekey"),
                      ("pause", "pause a running rekey"),
                      ("resume", "resume a paused rekey")):
        rp = rsub.add_parser(op, parents=[jsonp, agentp], formatter_class=formatter,
                             help=help_, description=REKEY_HELP, epilog=exit_table)
        rp.add_argument("guardpoint", metavar="GUARDPOINT", nargs="?" if op == "status" else None)
        if op in ("start", "resume"):
            rp.add_argument("--rate", type=float, metavar="MB/S",
                            help="MB/s of ciphertext written (0: unlimited)")
            rp.add_argument("--wait", action="store_true",
                            help="wait for the end, with a progress bar on a terminal; exit "
                            "17 unless every file was rekeyed")
            rp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if op == "start":
            rp.add_argument("--version", type=int, metavar="N",
                            help="target version (default: the key's current version)")
            rp.add_argument("--restart", action="store_true",
                            help="begin anew even if a run is paused or running")
        rp.set_defaults(func=cmd_rekey)
