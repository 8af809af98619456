"""The HTML report: one self-contained file (inline CSS and SVG, no code to run, nothing
fetched), readable in any browser.

Plots (``<svg class="tk-plot">``): the speed of each guard point relative to native per
workload on a log scale (bar from 1.0 to the median ratio, whisker = min-max of the
per-round ratios), and per workload the measured figures of every target (bar =
median, whisker = min-max, a dot per round); the result document rides along as JSON.
Bars carry ``class="bar"`` and ``data-workload``/``data-target``.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from .report import fmt_value, measured_targets

COLORS = {"native": "#6b7280", "fuse": "#1f77b4", "fuse-allow-all": "#ff7f0e",
          "kernel": "#2ca02c"}
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#111}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.2em .7em;border-bottom:1px solid #ddd;
text-align:right} th:first-child,td:first-child{text-align:left}
.skip{color:#888} .fail{color:#b00} pre{background:#f6f6f6;padding:.7em;overflow:auto}
.grid{display:flex;flex-wrap:wrap;gap:1em} .legend span{display:inline-block;margin-right:1.2em}
.legend i{display:inline-block;width:12px;height:12px;margin-right:.3em;vertical-align:-1px}
svg text{font:12px system-ui,sans-serif;fill:#222}
"""


def _color(name: str) -> str:
    return COLORS.get(name, "#9467bd")


def ratio_plot(doc: dict[str, Any]) -> str:
    guards = [t for t in measured_targets(doc) if t["name"] != "native"]
    rows = [w for w in doc["workloads"] if w["ratios"]]
    bar_h, gap, left, width = 14, 12, 120, 860
    plot_w = width - left - 60
    # a log scale: half as fast and twice as fast lie equally far from 1.0; a bar runs
    # from 1.0 to the median, left = slower than native
    lo = min([0.25] + [r["min"] for w in rows for r in w["ratios"].values() if r["min"] > 0])
    hi = max([2.0] + [r["max"] for w in rows for r in w["ratios"].values()])
    lo_e, hi_e = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    x = lambda v: left + (math.log2(max(v, 2.0 ** lo_e)) - lo_e) / (hi_e - lo_e) * plot_w  # noqa: E731
    group_h = bar_h * max(len(guards), 1) + gap
    height = 30 + group_h * len(rows) + 20
    out = [f'<svg class="tk-plot" id="ratio-plot" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           '<title>speed relative to native (log scale)</title>',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    for e in range(lo_e, hi_e + 1):
        tick = 2.0 ** e
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="20" y2="{height - 20}" '
                   f'stroke="{"#444" if e == 0 else "#e5e5e5"}" '
                   f'stroke-width="{2 if e == 0 else 1}"/>')
        out.append(f'<text x="{x(tick):.1f}" y="14" text-anchor="middle">{tick:g}×</text>')
    out.append(f'<text x="{x(1) - 6:.1f}" y="{height - 4}" text-anchor="end" fill="#666">'
               '← slower than native</text>')
    out.append(f'<text x="{x(1) + 6:.1f}" y="{height - 4}" fill="#666">faster →</text>')
    for i, w in enumerate(rows):
        y0 = 30 + i * group_h
        out.append(f'<text x="{left - 8}" y="{y0 + group_h / 2 - 2:.1f}" '
                   f'text-anchor="end">{escape(w["name"])}</text>')
        for j, t in enumerate(guards):
            r = w["ratios"].get(t["name"])
            if not r:
                continue
            y = y0 + j * bar_h
            x0, x1 = sorted((x(1.0), x(r["median"])))
            out.append(f'<rect class="bar" data-workload="{escape(w["name"])}" '
                       f'data-target="{t["name"]}" x="{x0:.1f}" y="{y}" '
                       f'width="{max(x1 - x0, 1.0):.1f}" height="{bar_h - 3}" '
                       f'fill="{_color(t["name"])}"><title>{escape(t["label"])}: '
                       f'{r["median"]:.2f} (min {r["min"]:.2f}, max {r["max"]:.2f})</title>'
                       f'</rect>')
            ym = y + (bar_h - 3) / 2
            out.append(f'<line class="whisker" x1="{x(r["min"]):.1f}" x2="{x(r["max"]):.1f}" '
                       f'y1="{ym:.1f}" y2="{ym:.1f}" stroke="#000" stroke-width="1.5"/>')
            for v in (r["min"], r["max"]):
                out.append(f'<line class="whisker" x1="{x(v):.1f}" x2="{x(v):.1f}" '
                           f'y1="{y + 1}" y2="{y + bar_h - 4}" stroke="#000"/>')
            out.append(f'<text x="{max(x(r["max"]), x1) + 6:.1f}" y="{y + bar_h - 4}">'
                       f'{r["median"]:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def workload_plot(doc: dict[str, Any], w: dict[str, Any]) -> str:
    targets = [t for t in measured_targets(doc) if t["name"] in w["results"]]
    width, height, top, bottom, left = 300, 220, 28, 40, 56
    plot_h = height - top - bottom
    hi = max(r["max"] for r in w["results"].values()) * 1.1 or 1.0
    y = lambda v: top + plot_h - v / hi * plot_h  # noqa: E731
    slot = (width - left - 10) / max(len(targets), 1)
    better = "higher is better" if w["higher_is_better"] else "lower is better"
    out = [f'<svg class="tk-plot workload-plot" data-workload="{escape(w["name"])}" '
           f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="14" font-weight="bold">{escape(w["name"])}</text>',
           f'<text x="{width - 6}" y="14" text-anchor="end" fill="#666">'
           f'{escape(w["unit"])}, {better}</text>',
           f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/>',
           f'<line x1="{left}" x2="{width - 6}" y1="{top + plot_h}" y2="{top + plot_h}" '
           f'stroke="#999"/>']
    for k in range(5):
        v = hi * k / 4
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">'
                   f'{escape(fmt_value(v, w["unit"]))}</text>')
    for i, t in enumerate(targets):
        r = w["results"][t["name"]]
        cx = left + slot * (i + 0.5)
        bw = min(48.0, slot * 0.6)
        out.append(f'<rect class="bar" data-workload="{escape(w["name"])}" '
                   f'data-target="{t["name"]}" x="{cx - bw / 2:.1f}" y="{y(r["median"]):.1f}" '
                   f'width="{bw:.1f}" height="{top + plot_h - y(r["median"]):.1f}" '
                   f'fill="{_color(t["name"])}"><title>{escape(t["label"])}: median '
                   f'{fmt_value(r["median"], w["unit"])}</title></rect>')
        out.append(f'<line class="whisker" x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(r["max"]):.1f}" '
                   f'y2="{y(r["min"]):.1f}" stroke="#000" stroke-width="1.5"/>')
        for v in (r["min"], r["max"]):
            out.append(f'<line class="whisker" x1="{cx - 6:.1f}" x2="{cx + 6:.1f}" '
                       f'y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#000"/>')
        for v in r["values"]:
            out.append(f'<circle class="round" cx="{cx + bw / 2 + 6:.1f}" cy="{y(v):.1f}" '
                       f'r="2.5" fill="#000" fill-opacity=".6"/>')
        label = t["label"].replace("fuse ", "")
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                   f'{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(doc: dict[str, Any]) -> str:
    targets = measured_targets(doc)
    head = "<tr><th>workload</th><th>unit</th>" + "".join(
        f"<th>{escape(t['label'])}</th>" + ("" if t["name"] == "native" else "<th>× native</th>")
        for t in targets) + "</tr>"
    rows = []
    for w in doc["workloads"]:
        cells = [f"<td title=\"{escape(w['title'])}\">{escape(w['name'])}</td>",
                 f"<td>{escape(w['unit'])}</td>"]
        if w["status"] == "skipped":
            cells.append(f'<td class="skip" colspan="{2 * len(targets) - 1}">skipped: '
                         f'{escape(w["reason"])}</td>')
        else:
            for t in targets:
                r = w["results"].get(t["name"])
                cells.append("<td>" + (f"{fmt_value(r['median'], w['unit'])} <small>"
                             f"[{fmt_value(r['min'], w['unit'])}–{fmt_value(r['max'], w['unit'])}"
                             "]</small>" if r else '<span class="fail">failed</span>') + "</td>")
                if t["name"] != "native":
                    q = w["ratios"].get(t["name"])
                    cells.append("<td>" + (f"<b>{q['median']:.2f}</b> <small>[{q['min']:.2f}–"
                                 f"{q['max']:.2f}]</small>" if q else "–") + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="ratios-table">{head}{"".join(rows)}</table>'


def render(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    fs = m["filesystem"]
    legend = "".join(f'<span><i style="background:{_color(t["name"])}"></i>'
                     f'{escape(t["label"])}</span>' for t in measured_targets(doc))
    info = [("CPU", f"{m['cpu_model']} ({m['cpus']} CPUs)"), ("kernel", m["kernel"]),
            ("memory", f"{(m['memory_bytes'] or 0) / 2**30:.1f} GiB"),
            ("directory", f"{s['directory']} — {fs['type']} on {fs['source']} "
                          f"({fs['mountpoint']})"),
            ("takakrypt", f"{m['takakrypt_version']} ({m['takakrypt_commit'] or 'no git commit'})"),
            ("run", f"{doc['started']} – {doc['finished']}, {s['rounds']} rounds"
                    f"{', quick sizes' if s['quick'] else ''}, cold reads: "
                    f"{'yes' if s['cold_reads'] else 'no'}")]
    info += [(t["name"] + " engine", t["reason"]) for t in doc["targets"]
             if t.get("status") != "ok"]
    info_rows = "".join(f"<tr><th>{escape(k)}</th><td style='text-align:left'>{escape(str(v))}"
                        "</td></tr>" for k, v in info)
    workloads = "\n".join(f"<div>{workload_plot(doc, w)}</div>" for w in doc["workloads"]
                          if w["results"])
    skipped = "".join(f"<li>{escape(w['name'])}: {escape(w['reason'])}</li>"
                      for w in doc["workloads"] if w["status"] == "skipped")
    data = json.dumps(doc, sort_keys=True).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>takakrypt bench {escape(doc['started'])}</title>
<style>{CSS}</style></head><body>
<h1>takakrypt bench</h1>
<table id="machine">{info_rows}</table>
<h2>Speed relative to native</h2>
<p>1.0 = as fast as native (the same directory without takakrypt, measured in the same run);
0.5 = half as fast. Log scale; bar: median, from 1.0; whisker: min–max of the per-round ratios. The policy
guard point permits each workload program by path and SHA-256 and denies everything else,
as a deployment would; allow-all is the engine alone.</p>
<p class="legend">{legend}</p>
{ratio_plot(doc)}
<h2>Figures</h2>
{_table(doc)}
{f"<ul class='skip'>{skipped}</ul>" if skipped else ""}
<h2>Per workload</h2>
<p>Bar: median; whisker: min–max; dots: the rounds.</p>
<div class="grid">{workloads}</div>
<h2>Policy of the guard point</h2>
<pre>{escape(doc['policy']['realistic'])}</pre>
<script type="application/json" id="bench-data">{data}</script>
</body></html>
"""
