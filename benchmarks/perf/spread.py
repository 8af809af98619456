"""Run-to-run spread of the performance signals, the evidence for the gate's tolerances.

    python benchmarks/perf/spread.py RUN.json RUN.json ...   (collect.py --out, same tree)
    python benchmarks/perf/spread.py --runs 10 --dir DIR     (collect ten times first)

Per signal: min, max, the spread (max - min, absolute and relative to min), the
gate's tolerance, and whether every run, taken as the baseline against every other,
stays inside it.  Exit status 1 if one does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gate  # noqa: E402


def spread(runs: list[dict]) -> tuple[list[str], bool]:
    names = list(runs[0]["signals"])
    lines = [f"{'signal':<36} {'min':>12} {'max':>12} {'spread':>10} {'rel':>8} "
             f"{'tolerance':>9}  all pairs inside"]
    ok_all = True
    for n in names:
        vals = [float(r["signals"][n]["value"]) for r in runs]
        lo, hi = min(vals), max(vals)
        tol = gate.tolerance(n)
        ok = all(b <= tol.limit(a) for a, b in itertools.permutations(vals, 2))
        ok_all &= ok
        rel = (hi - lo) / lo * 100 if lo else 0.0
        lines.append(f"{n:<36} {lo:>12.4f} {hi:>12.4f} {hi - lo:>10.4f} {rel:>7.2f}% "
                     f"{str(tol):>9}  {'yes' if ok else 'NO'}")
    return lines, ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spread.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, help="collect this many runs first")
    ap.add_argument("--dir", type=Path, help="where --runs writes run-N.json")
    a = ap.parse_args(argv)
    files = list(a.files)
    if a.runs:
        if a.dir is None:
            ap.error("--runs needs --dir")
        a.dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, a.runs + 1):
            f = a.dir / f"run-{i}.json"
            subprocess.run([sys.executable, str(HERE / "collect.py"), "--out", str(f)],
                           check=True)
            print(f"run {i} of {a.runs}: {f}", file=sys.stderr)
            files.append(f)
    if len(files) < 2:
        ap.error("give at least two runs")
    runs = [json.loads(f.read_text()) for f in files]
    lines, ok = spread(runs)
    print(f"{len(runs)} runs, commit {runs[0].get('commit')}")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
