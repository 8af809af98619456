"""Ratios and targets from one run of ../shared/bench/peers.sh (a TSV file).

    python benchmarks/peers_report.py benchmarks/results/peers-*.tsv [--json]

Each target is a ratio between takakrypt and a reference measured in the same run.
"""

import json
import sys

# workload, reference target, kind ("higher" is better or "lower" is better), bound
TARGETS = [
    ("seqread", "gocryptfs", "higher", 1.5),
    ("seqwrite", "native", "higher", 0.9),
    ("untar", "securefs", "lower", 0.5),
    ("ls-lR", "native", "lower", 3.0),
    ("rm-rf", "native", "lower", 1.5),
    ("fio-4k-randread", "securefs", "higher", 1.5),
    ("fio-4k-randwrite", "securefs", "higher", 1.5),
    ("pgbench-tpcb-s20-c4", "native", "higher", 0.9),
]


def load(path: str) -> dict[tuple[str, str], float]:
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                try:
                    out[(parts[0], parts[1])] = float(parts[2])
                except ValueError:
                    pass
    return out


def report(rows: dict[tuple[str, str], float]) -> list[dict]:
    res = []
    for wl, ref, kind, bound in TARGETS:
        t, r = rows.get(("takakrypt", wl)), rows.get((ref, wl))
        if t is None or r is None or r == 0:
            res.append({"workload": wl, "reference": ref, "ratio": None, "met": None})
            continue
        ratio = t / r
        met = ratio >= bound if kind == "higher" else ratio <= bound
        res.append({"workload": wl, "reference": ref, "takakrypt": t, "ref_value": r,
                    "ratio": round(ratio, 3), "target": f"{'>=' if kind == 'higher' else '<='} "
                                                      f"{bound}", "met": met})
    return res


def main() -> int:
    rows = load(sys.argv[1])
    res = report(rows)
    if "--json" in sys.argv:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{'workload':<22} {'vs':<10} {'ratio':>7}  target   result")
    for r in res:
        if r["ratio"] is None:
            print(f"{r['workload']:<22} {r['reference']:<10} {'-':>7}  (missing in this run)")
        else:
            print(f"{r['workload']:<22} {r['reference']:<10} {r['ratio']:>7.2f}  {r['target']:<7}  "
                  f"{'MET' if r['met'] else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
