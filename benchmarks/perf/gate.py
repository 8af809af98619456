"""The performance-regression gate: the deterministic signals of a tree against the
committed baseline (docs/performance.md, "Performance gate").

    python benchmarks/perf/gate.py [--baseline FILE] [--current FILE | --tree DIR]
    python benchmarks/perf/gate.py --write-baseline [--tree DIR]

Every signal counts work (instructions, requests, system calls), so higher is worse.
A signal fails when ``new > baseline * (1 + rel) + abs`` for its tolerance below; a
signal better than ``baseline * (1 - rel) - abs`` passes with a hint to refresh the
baseline (``make perf-baseline``; the diff of benchmarks/baseline.json is the review).

Exit status: 0 every signal within its tolerance, 1 a signal regressed (or is missing
from the new measurement), 2 the signals could not be measured.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASELINE = REPO / "benchmarks" / "baseline.json"


@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.0   # fraction of the baseline
    abs: float = 0.0   # in the signal's unit

    def limit(self, base: float) -> float:
        return base * (1 + self.rel) + self.abs

    def floor(self, base: float) -> float:
        return base * (1 - self.rel) - self.abs

    def __str__(self) -> str:
        parts = ([f"+{self.rel * 100:g} %"] if self.rel else []) + \
            ([f"+{self.abs:g}"] if self.abs else [])
        return " ".join(parts) or "exact"


# First match wins.  Why each is what it is: docs/performance.md, "Performance gate"
# (ten runs of the unchanged tree and their spread).
TOLERANCES: list[tuple[str, Tolerance]] = [
    # Python: counts depend a little on where objects land in memory (method cache,
    # pymalloc pools): spread up to 0.55 % in ten runs, 1.1 % across process layouts
    ("ir.policy_*", Tolerance(rel=0.02)),
    ("ir.protocol_*", Tolerance(rel=0.02)),
    ("ir.*", Tolerance(rel=0.005)),                          # C: no spread at all
    # requests: exact but for entries expiring under load (rm -rf: +0.034 once)
    ("fuse.*.requests_per_entry", Tolerance(abs=0.05)),
    ("fuse.*.requests_per_transaction", Tolerance(abs=0.05)),  # spread 0.01
    # system calls per request: about twice the largest spread seen, each below the
    # +1 of one more system call per request
    ("fuse.untar.syscalls_per_request", Tolerance(abs=0.1)),      # spread 0.014
    ("fuse.lsR_cold.syscalls_per_request", Tolerance(abs=0.5)),   # spread 0.27
    ("fuse.lsR_warm.syscalls_per_request", Tolerance(abs=0.2)),   # spread 0.06
    ("fuse.rmrf.syscalls_per_request", Tolerance(abs=0.3)),       # spread 0.14
    ("fuse.pgbench.syscalls_per_request", Tolerance(abs=0.25)),   # spread 0.09
]


# Which recorded tools each signal family's counts depend on.  Counts are comparable
# only on the same machine image: where one of these differs from the baseline's, the
# family is measured and shown but not gated ("other tools"), and the gate says to
# refresh the baseline on that image -- a kernel or OpenSSL security update must not
# read as our regression, nor block every commit until someone refreshes it.
DEPENDS: list[tuple[str, tuple[str, ...]]] = [
    ("ir.policy_*", ("python", "valgrind")),
    ("ir.protocol_*", ("python", "valgrind")),
    ("ir.*", ("valgrind", "gcc", "libssl", "ipsec_mb", "OPENSSL_ia32cap", "ipsec_mb_arch")),
    ("fuse.*", ("kernel", "python", "libfuse", "gcc")),
]


def moved_tools(name: str, baseline: dict, current: dict) -> list[str]:
    """The tools of ``name``'s family that differ between the two measurements."""
    bt, ct = baseline.get("tools", {}), current.get("tools", {})
    for pat, keys in DEPENDS:
        if fnmatch.fnmatchcase(name, pat):
            return [k for k in keys if k in bt and k in ct and bt[k] != ct[k]]
    return []


def tolerance(name: str) -> Tolerance:
    for pat, tol in TOLERANCES:
        if fnmatch.fnmatchcase(name, pat):
            return tol
    raise KeyError(f"no tolerance for signal {name!r}")


@dataclass
class Row:
    name: str
    base: float | None
    new: float | None
    unit: str
    tol: Tolerance | None
    verdict: str            # "ok", "better", "REGRESSED", "MISSING", "new", "other tools"

    @property
    def change(self) -> str:
        if self.base is None or self.new is None:
            return ""
        if self.base == 0:
            return f"{self.new - self.base:+g}"
        return f"{(self.new - self.base) / self.base * 100:+.2f} %"


def compare(baseline: dict, current: dict) -> list[Row]:
    """One row per signal of either side, in the baseline's order."""
    bs, cs = baseline["signals"], current["signals"]
    rows: list[Row] = []
    for name, b in bs.items():
        tol = tolerance(name)
        c = cs.get(name)
        if c is None:
            rows.append(Row(name, b["value"], None, b["unit"], tol, "MISSING"))
            continue
        new, base = float(c["value"]), float(b["value"])
        verdict = ("REGRESSED" if new > tol.limit(base) else
                   "better" if new < tol.floor(base) else "ok")
        if verdict != "ok" and moved_tools(name, baseline, current):
            verdict = "other tools"  # not comparable: shown, not gated
        rows.append(Row(name, base, new, b["unit"], tol, verdict))
    for name, c in cs.items():
        if name not in bs:
            rows.append(Row(name, None, c["value"], c["unit"], None, "new"))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"


def table(rows: list[Row]) -> str:
    w = max(len(r.name) for r in rows)
    out = [f"{'signal':<{w}}  {'baseline':>14}  {'new':>14}  {'change':>9}  "
           f"{'tolerance':>9}  verdict"]
    for r in rows:
        out.append(f"{r.name:<{w}}  {_fmt(r.base):>14}  {_fmt(r.new):>14}  {r.change:>9}  "
                   f"{str(r.tol or ''):>9}  {r.verdict}")
    return "\n".join(out)


def explain(row: Row, baseline: dict, current: dict) -> str:
    """Why a signal failed: the numbers, where to look, and what grew most."""
    b = baseline["signals"][row.name]
    c = current["signals"].get(row.name)
    if c is None:
        return (f"{row.name}: in the baseline ({_fmt(row.base)} {row.unit}) but not "
                f"measured now")
    lines = [f"{row.name}: {_fmt(row.base)} -> {_fmt(row.new)} {row.unit} ({row.change}; "
             f"tolerance {row.tol}, limit {_fmt(row.tol.limit(row.base))})"]  # type: ignore[union-attr]
    lines.append(f"  likely place: {c.get('where') or b.get('where') or '?'}")
    bd, cd = b.get("detail", {}), c.get("detail", {})
    what = "callgrind's top functions (Ir/op)" if row.name.startswith("ir.") else \
        "by kind (per unit of the signal)"
    deltas = sorted(((k, cd.get(k, 0.0) - bd.get(k, 0.0)) for k in set(bd) | set(cd)),
                    key=lambda kv: -kv[1])
    grew = [(k, d) for k, d in deltas if d > 0][:5]
    if grew:
        lines.append("  grew most: " + ", ".join(f"{k} {d:+,.4g}" for k, d in grew))
    lines.append(f"  {what} now:")
    for k, v in list(cd.items())[:6]:
        lines.append(f"    {v:>14,.4g}  {k}  (baseline {bd.get(k, 0):,.4g})")
    return "\n".join(lines)


def report(baseline: dict, current: dict, out=sys.stdout) -> int:
    """Print the table and the verdict; return the exit status."""
    rows = compare(baseline, current)
    print(f"baseline: commit {baseline.get('commit')}"
          f"{' (dirty)' if baseline.get('dirty') else ''}, taken {baseline.get('taken')}",
          file=out)
    print(f"new:      commit {current.get('commit')}"
          f"{' (dirty)' if current.get('dirty') else ''}, taken {current.get('taken')}",
          file=out)
    bt, ct = baseline.get("tools", {}), current.get("tools", {})
    moved = [f"{k} {bt[k]!r} -> {ct[k]!r}" for k in sorted(set(bt) & set(ct)) if bt[k] != ct[k]]
    if moved:
        print("note: measured with other tools than the baseline (" + "; ".join(moved)
              + "): counts can move with them; refresh the baseline for a new machine image",
              file=out)
    print(table(rows), file=out)
    other = [r.name for r in rows if r.verdict == "other tools"]
    if other:
        print(f"\nnot gated: {', '.join(other)} moved beyond their tolerance, but were "
              f"measured with other tools than the baseline (above); take a baseline on "
              f"this machine image (`make perf-baseline`) to gate them again", file=out)
    bad = [r for r in rows if r.verdict in ("REGRESSED", "MISSING")]
    for r in bad:
        print("\nFAIL " + explain(r, baseline, current), file=out)
    if bad:
        print(f"\nperformance gate: FAILED ({len(bad)} signal(s) worse than the baseline "
              f"by more than the tolerance)", file=out)
        return 1
    better = [r.name for r in rows if r.verdict in ("better", "new")]
    if better:
        print(f"\nhint: {', '.join(better)} improved or new: refresh the baseline with "
              f"`make perf-baseline` and commit benchmarks/baseline.json", file=out)
    print("\nperformance gate: passed", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gate.py", description=__doc__.split("\n\n")[0],
                                 epilog="Exit status: 0 passed, 1 regression, 2 not measured.")
    ap.add_argument("--baseline", type=Path, default=BASELINE,
                    help="baseline JSON (default: benchmarks/baseline.json)")
    ap.add_argument("--current", type=Path,
                    help="signals already collected (collect.py --out); default: collect now")
    ap.add_argument("--tree", type=Path, default=REPO,
                    help="source tree to measure (default: this checkout)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--save", type=Path, help="also write the new signals here")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="skip the FUSE counts (they need root, /dev/fuse, tracefs, strace, "
                    "PostgreSQL 15) and leave them out of the comparison")
    ap.add_argument("--write-baseline", action="store_true",
                    help="measure and write the baseline instead of comparing")
    a = ap.parse_args(argv)
    if a.current is not None:
        current = json.loads(a.current.read_text())
    else:
        sys.path.insert(0, str(HERE))
        import collect

        try:
            current = collect.collect(
                a.tree.resolve(), a.python, fuse=a.fuse,
                progress=lambda n: print(f"measuring {n}", file=sys.stderr, flush=True))
        except collect.CollectError as e:
            print(f"gate.py: {e}", file=sys.stderr)
            return 2
    if a.save:
        a.save.write_text(json.dumps(current, indent=1) + "\n")
    if a.write_baseline:
        if not a.fuse:
            ap.error("a baseline needs every signal: no --no-fuse")
        old = json.loads(a.baseline.read_text()) if a.baseline.exists() else None
        a.baseline.write_text(json.dumps(current, indent=1) + "\n")
        print(f"wrote {a.baseline} (commit {current.get('commit')})")
        if old is not None:
            print(table(compare(old, current)))
        return 0
    if not a.baseline.exists():
        print(f"gate.py: no baseline at {a.baseline} (make perf-baseline)", file=sys.stderr)
        return 2
    baseline = json.loads(a.baseline.read_text())
    if not a.fuse:
        baseline["signals"] = {k: v for k, v in baseline["signals"].items()
                               if not k.startswith("fuse.")}
    return report(baseline, current)


if __name__ == "__main__":
    sys.exit(main())
