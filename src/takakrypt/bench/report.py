"""The text table, the JSON file, and ``--compare``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from . import SCHEMA, machine
from ..errors import UsageError


def fmt_value(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _cell(res: dict[str, Any] | None, unit: str) -> str:
    if not res:
        return "-"
    return (f"{fmt_value(res['median'], unit)} "
            f"[{fmt_value(res['min'], unit)}-{fmt_value(res['max'], unit)}]")


def _ratio(r: dict[str, float] | None) -> str:
    return "-" if not r else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def measured_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in doc["targets"] if t.get("status") == "ok"]


def text(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    fs = m["filesystem"]
    head = [f"takakrypt bench: {s['directory']} ({fs['type']} on {fs['source'] or '?'}), "
            f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
            f"{' (quick sizes)' if s['quick'] else ''}, {doc['seconds']:.0f} s",
            f"machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['kernel']}; takakrypt "
            f"{m['takakrypt_version']} ({m['takakrypt_commit'] or 'no git commit'})"]
    targets = measured_targets(doc)
    hdr = ["workload", "unit"]
    for t in targets:
        hdr.append(t["label"])
        if t["name"] != "native":
            hdr.append("x native")
    rows = [hdr]
    notes = []
    for w in doc["workloads"]:
        row = [w["name"], w["unit"]]
        if w["status"] == "skipped":
            row.append(f"skipped: {w['reason']}")
            rows.append(row + [""] * (len(hdr) - len(row)))
            continue
        for t in targets:
            row.append(_cell(w["results"].get(t["name"]), w["unit"]))
            if t["name"] != "native":
                row.append(_ratio(w["ratios"].get(t["name"])))
        rows.append(row)
        for tn, err in (w.get("errors") or {}).items():
            notes.append(f"{w['name']} on {tn}: FAILED: {err}")
    lines = head + ["", _table(rows), ""]
    for t in doc["targets"]:
        if t.get("status") != "ok":
            lines.append(f"{t['name']} engine: {t['reason']}")
    lines += sorted(set(notes))
    lines.append("values: median [min-max] over the rounds; x native: speed relative to "
                 "native (1.00 = as fast, 0.50 = half as fast), median [min-max] of the "
                 "per-round ratios")
    if not s["cold_reads"]:
        lines.append("note: the page cache could not be dropped: seq-read and ls-lR read "
                     "from a warm cache")
    return "\n".join(lines)


def default_save_path() -> Path | None:
    """benchmarks/results/bench-STAMP.json when running from the source tree."""
    if not machine.in_source_tree():
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return machine.SOURCE_TREE / "benchmarks" / "results" / f"bench-{stamp}.json"


def save(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a takakrypt bench result ({SCHEMA})")
    return doc


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per workload and guard target: the ratio to native in A and in B and B's change
    against A; native's own median change too (the disk, not takakrypt)."""
    rows = []
    wb = {w["name"]: w for w in b["workloads"]}
    for w in a["workloads"]:
        other = wb.get(w["name"])
        if other is None:
            continue
        na, nb = w["results"].get("native"), other["results"].get("native")
        if na and nb:
            rows.append({"workload": w["name"], "target": "native", "unit": w["unit"],
                         "a": na["median"], "b": nb["median"],
                         "change": _change(na["median"], nb["median"], w["higher_is_better"])})
        for t, ra in w["ratios"].items():
            rb = other["ratios"].get(t)
            if rb:
                rows.append({"workload": w["name"], "target": t, "unit": "x native",
                             "a": ra["median"], "b": rb["median"],
                             "change": rb["median"] / ra["median"] - 1 if ra["median"]
                             else None})
    differs = [k for k in ("cpu_model", "cpus", "kernel")
               if a["machine"].get(k) != b["machine"].get(k)]
    if a["machine"]["filesystem"]["type"] != b["machine"]["filesystem"]["type"]:
        differs.append("filesystem")
    return {"a": {"started": a["started"], "commit": a["machine"].get("takakrypt_commit")},
            "b": {"started": b["started"], "commit": b["machine"].get("takakrypt_commit")},
            "machine_differs": differs, "rows": rows}


def _change(a: float, b: float, higher_is_better: bool) -> float | None:
    """Speed change from a to b: +0.10 = 10 % faster."""
    if a <= 0 or b <= 0:
        return None
    return b / a - 1 if higher_is_better else a / b - 1


def compare_text(c: dict[str, Any]) -> str:
    rows = [["workload", "target", "A", "B", "change"]]
    for r in c["rows"]:
        f = (lambda v: f"{v:.2f}") if r["target"] != "native" else \
            (lambda v, u=r["unit"]: f"{fmt_value(v, u)} {u}")
        ch = "-" if r["change"] is None else f"{r['change'] * 100:+.0f}%"
        rows.append([r["workload"], r["target"], f(r["a"]), f(r["b"]), ch])
    lines = [f"A: {c['a']['started']} ({c['a']['commit'] or '?'})",
             f"B: {c['b']['started']} ({c['b']['commit'] or '?'})", "", _table(rows), "",
             "guard rows: speed relative to native in each run (the comparable figure); "
             "change: B against A, + = faster", "native rows: the disk itself (MiB/s, s, "
             "IOPS, TPS); change: + = faster"]
    if c["machine_differs"]:
        lines.append("WARNING: the runs differ in " + ", ".join(c["machine_differs"]) +
                     ": compare ratios only, with care")
    return "\n".join(lines)
