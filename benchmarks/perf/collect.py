"""Deterministic performance signals of a source tree (docs/performance.md,
"Performance gate").

    python benchmarks/perf/collect.py [--tree DIR] [--out FILE] [--no-fuse] [--only NAME...]

Signals (one JSON object, ``signals`` keyed by name; ``detail`` is where the work goes):

``ir.*``    instructions per operation counted by valgrind's callgrind (no timing):
            the native hot paths in a small C driver (hotpaths.c) built here from
            TREE/src/_native with the extension's flags, counted inside perf_measure()
            only; the Python ones (pyhot.py) as (2N - N) / N with instrumentation off
            during start-up.  ``detail``: callgrind's top functions (Ir per operation).
``fuse.*``  FUSE requests per tree entry and the engine's system calls per request
            for untar / ls -lR / rm -rf of a fixed tree, and the same per transaction
            for a fixed count of pgbench transactions (fusework.py).  ``detail``:
            requests by kind / system calls by name, per entry / per request.

The counts do not depend on this machine's CPU: ipsec-mb is forced to its AVX2 path
(hotpaths.c), OpenSSL to the capability vector valgrind's emulated CPU reports
(OPENSSL_IA32CAP below), and valgrind emulates the same CPU on every host with AVX2.
They do depend on the Debian packages (gcc, OpenSSL, ipsec-mb, Python, the kernel
for the fuse.* counts): a baseline is for the machine image CI runs on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# what OpenSSL 3.0 reads from valgrind's emulated AVX2 CPU (`valgrind openssl version -c`);
# set explicitly so another CPU model under valgrind cannot change OpenSSL's choice
OPENSSL_IA32CAP = "0x7ffaf3ffffebffff:0x427aa"

# name -> (C driver signal, repetitions inside perf_measure, where to look)
NATIVE = {
    "ir.encrypt_ipsecmb_64x4k": ("encrypt_ipsecmb", 4, "tk_gcm_encrypt / imb_encrypt (src/_native/aesgcm_impl.c)"),
    "ir.decrypt_ipsecmb_64x4k": ("decrypt_ipsecmb", 4, "tk_gcm_decrypt / imb_decrypt (src/_native/aesgcm_impl.c)"),
    "ir.encrypt_openssl_64x4k": ("encrypt_openssl", 4, "tk_gcm_encrypt / ossl_encrypt (src/_native/aesgcm_impl.c)"),
    "ir.decrypt_openssl_64x4k": ("decrypt_openssl", 4, "tk_gcm_decrypt / ossl_decrypt (src/_native/aesgcm_impl.c)"),
    "ir.cache_hit": ("cache_hit", 2000, "tk_cache_lookup (src/_native/cache_impl.c)"),
    "ir.cache_miss": ("cache_miss", 2000, "tk_cache_lookup (src/_native/cache_impl.c)"),
    "ir.ring_round_trip": ("ring_round_trip", 2000, "tk_ring_submit / drain / reply / wait_reply (src/_native/ring_impl.c)"),
}
PYTHON = {
    "ir.policy_uncached_20_rules": ("policy_uncached", 50, "takakrypt.policy.Engine.evaluate (src/takakrypt/policy.py)"),
    "ir.protocol_encode": ("protocol_encode", 200, "takakrypt.protocol.encode (src/takakrypt/protocol/messages.py)"),
    "ir.protocol_decode": ("protocol_decode", 200, "takakrypt.protocol.decode (src/takakrypt/protocol/messages.py)"),
}
FUSE_WHERE = {
    "untar": "FUSE CREATE/WRITE/SETATTR path (src/_native/fuse_ops.c, fuse_taka.c)",
    "lsR_cold": "FUSE OPENDIR/READDIRPLUS path (src/_native/fuse_ops.c, fuse_inode.c)",
    "lsR_warm": "FUSE OPENDIR/READDIRPLUS path (src/_native/fuse_ops.c, fuse_inode.c)",
    "rmrf": "FUSE UNLINK/RMDIR/FORGET path (src/_native/fuse_ops.c, fuse_inode.c)",
    "pgbench": "FUSE WRITE/FSYNC path (src/_native/fuse_ops.c, fuse_taka.c)",
}


def fuse_signal_names() -> list[str]:
    return [f"fuse.{p}.{m}" for p in FUSE_WHERE for m in (
        "requests_per_transaction" if p == "pgbench" else "requests_per_entry",
        "syscalls_per_request")]
# time-driven waits, not work: how often they happen depends on how long things take
WAIT_SYSCALLS = frozenset({"futex", "clock_nanosleep", "nanosleep"})
TOP = 8


class CollectError(Exception):
    """A signal could not be measured (message says why)."""


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise CollectError(f"{' '.join(argv[:6])} ... failed ({p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    return p


def _cflags() -> list[str]:
    """The flags setup.py compiles the extensions with (Python's own, then -O2)."""
    py = (sysconfig.get_config_var("CFLAGS") or "").split()
    return [f for f in py if not f.startswith(("-O", "-g", "-W", "-ffile-prefix-map",
                                                "-fdebug-prefix-map"))] + \
        ["-O2", "-g", "-Wall", "-Wextra"]


def build(tree: Path, work: Path) -> tuple[Path, Path]:
    """Compile hotpaths (with TREE's native sources) and perfmark.so into ``work``."""
    if shutil.which("gcc") is None:
        raise CollectError("needs gcc")
    nat = tree / "src" / "_native"
    exe, mark = work / "hotpaths", work / "perfmark.so"
    _run(["gcc", *_cflags(), f"-I{nat}", "-o", str(exe), str(HERE / "hotpaths.c"),
          str(nat / "secmem.c"), str(nat / "cache_impl.c"), str(nat / "ring_impl.c"),
          "-lIPSec_MB", "-lcrypto", "-lpthread"])
    _run(["gcc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(mark),
          str(HERE / "perfmark.c")])
    return exe, mark


_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$")


def _short(fn: str) -> str:
    """``file:function [object]`` -> ``function [object's basename]``."""
    m = re.match(r"^(.*?)(?: \[(.*)\])?$", fn)
    assert m
    name, obj = m.group(1), m.group(2)
    if ":" in name:
        name = name.rsplit(":", 1)[1] if not name.startswith("???:") else name[4:]
    name = re.sub(r"'\d+$", "", name)  # callgrind's recursion depth suffix
    return f"{name} [{os.path.basename(obj)}]" if obj else name


def functions(outfile: Path) -> tuple[int, dict[str, int]]:
    """Total Ir and Ir by function (exclusive) of a callgrind output file."""
    text = _run(["callgrind_annotate", "--threshold=100", "--auto=no", str(outfile)]).stdout
    total = None
    fns: dict[str, int] = {}
    in_list = False
    for line in text.splitlines():
        if line.rstrip().endswith("file:function"):
            in_list = True
            continue
        m = _LINE.match(line)
        if not m:
            continue
        n, what = int(m.group(1).replace(",", "")), m.group(2)
        if what.startswith("PROGRAM TOTALS"):
            total = n
        elif in_list:
            k = _short(what)
            fns[k] = fns.get(k, 0) + n
    if total is None:
        raise CollectError(f"no totals in {outfile}")
    return total, fns


def _top(fns: dict[str, float], n: int | None = TOP) -> dict[str, float]:
    return dict(sorted(fns.items(), key=lambda kv: -kv[1])[:n])


def _valgrind_env() -> dict[str, str]:
    env = dict(os.environ, OPENSSL_ia32cap=OPENSSL_IA32CAP, PYTHONHASHSEED="0",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONMALLOC", None)
    return env


def native_signal(exe: Path, work: Path, name: str) -> dict[str, object]:
    sig, reps, where = NATIVE[name]
    out = work / f"cg.{sig}"
    _run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
          "--toggle-collect=perf_measure", f"--callgrind-out-file={out}", str(exe), sig,
          str(reps)], env=_valgrind_env())
    total, fns = functions(out)
    return {"value": round(total / reps, 1), "unit": "Ir/op", "where": where,
            "detail": _top({k: round(v / reps, 1) for k, v in fns.items()})}


def python_signal(python: str, tree: Path, mark: Path, work: Path, name: str
                  ) -> dict[str, object]:
    sig, n, where = PYTHON[name]
    out = work / f"cg.py.{sig}"
    env = _valgrind_env()
    env["PYTHONPATH"] = str(tree / "src")
    _run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
          f"--callgrind-out-file={out}", python, str(HERE / "pyhot.py"), str(mark), sig,
          str(n)], env=env)
    t1, f1 = functions(Path(f"{out}.1"))
    t2, f2 = functions(Path(f"{out}.2"))
    diff = {k: (f2.get(k, 0) - f1.get(k, 0)) / n for k in set(f1) | set(f2)}
    return {"value": round((t2 - t1) / n, 1), "unit": "Ir/op", "where": where,
            "detail": _top({k: round(v, 1) for k, v in diff.items()})}


def fuse_signals(python: str, tree: Path) -> dict[str, dict[str, object]]:
    sys.path.insert(0, str(HERE))
    import fusework

    try:
        r = fusework.collect(python, tree / "src")
    except fusework.FuseWorkError as e:
        raise CollectError(f"FUSE counts: {e}") from e
    out: dict[str, dict[str, object]] = {}
    for phase, v in r["phases"].items():
        kinds, calls = v["requests"], v["syscalls"]
        nreq = sum(kinds.values())
        work_calls = {k: c for k, c in calls.items() if k not in WAIT_SYSCALLS}
        per, count = ("transaction", r["transactions"]) if phase == "pgbench" else \
            ("entry", r["entries"])
        out[f"fuse.{phase}.requests_per_{per}"] = {
            "value": round(nreq / count, 4), "unit": f"requests/{per}",
            "where": FUSE_WHERE[phase],
            "detail": _top({k: round(c / count, 4) for k, c in kinds.items()}, None)}
        out[f"fuse.{phase}.syscalls_per_request"] = {
            "value": round(sum(work_calls.values()) / nreq, 4), "unit": "syscalls/request",
            "where": FUSE_WHERE[phase],
            "detail": _top({k: round(c / nreq, 4) for k, c in work_calls.items()}, None)}
    return out


def commit_of(tree: Path) -> dict[str, object]:
    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def collect(tree: Path, python: str, *, fuse: bool = True, only: list[str] | None = None,
            progress=None) -> dict[str, object]:
    if shutil.which("valgrind") is None:
        raise CollectError("needs valgrind (Debian: apt-get install valgrind)")
    names = [*NATIVE, *PYTHON]
    if only:
        names = [n for n in names if any(n.startswith(o) or o in n for o in only)]
    signals: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="takakrypt-perf.") as tmp:
        work = Path(tmp)
        exe, mark = build(tree, work)
        for name in names:
            if progress:
                progress(name)
            if name in NATIVE:
                signals[name] = native_signal(exe, work, name)
            else:
                signals[name] = python_signal(python, tree, mark, work, name)
    if fuse and (not only or any(o.startswith("fuse") for o in only)):
        if progress:
            progress("fuse.*")
        signals.update(fuse_signals(python, tree))
    vg = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout
    return {"schema": 1, **commit_of(tree),
            "taken": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"valgrind": vg.strip(), "kernel": os.uname().release,
                      "python": sys.version.split()[0], "OPENSSL_ia32cap": OPENSSL_IA32CAP,
                      "ipsec_mb_arch": "avx2", **package_versions()},
            "signals": signals}


def package_versions() -> dict[str, str]:
    """Debian package versions the instruction counts depend on (a security update of
    OpenSSL changes them as surely as our own code would): gate.py gates a signal
    family only where these match the baseline's."""
    out: dict[str, str] = {}
    for key, pkg in (("gcc", "gcc"), ("libssl", "libssl3"), ("ipsec_mb", "libipsec-mb1"),
                     ("libfuse", "libfuse3-3")):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True)
        out[key] = r.stdout.strip() if r.returncode == 0 else "?"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="collect.py", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 measured, 2 a signal could not be measured.")
    ap.add_argument("--tree", type=Path, default=REPO,
                    help="source tree to measure (default: this checkout); its native "
                    "extensions must be built (the fuse.* counts mount its engine)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the Python signals and the guard point")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="skip the FUSE counts (they need root, /dev/fuse, tracefs, strace)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="only signals whose name starts with or contains NAME")
    a = ap.parse_args(argv)
    try:
        r = collect(a.tree.resolve(), a.python, fuse=a.fuse, only=a.only,
                    progress=lambda n: print(f"collect: {n}", file=sys.stderr, flush=True))
    except CollectError as e:
        print(f"collect.py: {e}", file=sys.stderr)
        return 2
    text = json.dumps(r, indent=1, sort_keys=False) + "\n"
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
