"""report.html: one self-contained page (no network) with the table, curves and every document."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ttt.report.summary import finite

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;
text-align:right}td:first-child,th:first-child{text-align:left}tr.task{cursor:pointer}
tr.task:hover,tr.doc:hover{background:#eef}tr.doc{cursor:pointer}.mean{font-weight:bold}
.gain{color:#070}.loss{color:#a00}.flag{background:#fd8;padding:0 .3em;border-radius:3px}
.panel{border-left:3px solid #99c;padding-left:1em;margin:.5em 0 1em}svg{background:#fafafa}
.side{display:flex;gap:2em;flex-wrap:wrap}input{margin:.3em .5em .3em 0}small{color:#666}
"""

# Task documents are embedded as JSON, one <script> per task, and parsed and drawn only when
# the task is opened: a 42,916-document run is not one giant DOM.
_SCRIPT = r"""
"use strict";
const S = JSON.parse(document.getElementById("summary").textContent);
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "-" : Number(v).toFixed(d);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};
function curve(points, w = 260, h = 120, bars = null) {
  const pts = points.filter(p => p[1] !== null);
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  if (!pts.length) return svg;
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]).concat(bars ? bars.flat() : []);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = x => 30 + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - 40);
  const Y = y => h - 20 - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (h - 35);
  const add = (tag, a) => { const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(a)) e.setAttribute(k, v); svg.append(e); return e; };
  if (bars) pts.forEach((p, i) => bars[i] && add("line", {x1: X(p[0]), x2: X(p[0]),
    y1: Y(bars[i][0]), y2: Y(bars[i][1]), stroke: "#99c", "stroke-width": 3}));
  add("polyline", {points: pts.map(p => X(p[0]) + "," + Y(p[1])).join(" "), fill: "none",
    stroke: "#36c", "stroke-width": 2});
  pts.forEach(p => add("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: "#36c"}));
  const t = add("text", {x: 2, y: 12, "font-size": 10}); t.textContent = fmt(y1) + " bpb";
  const b = add("text", {x: 2, y: h - 4, "font-size": 10});
  b.textContent = "neighbors " + x0 + " to " + x1 + "; low " + fmt(y0);
  return svg;
}
function neighborTable(ns) {
  const t = el("table", {class: "neighbors"}, el("tr", {}, el("th", {}, "#"), el("th", {}, "neighbor"),
    el("th", {}, "distance"), el("th", {}, "title or first line"), el("th", {}, "training loss"),
    el("th", {}, "bpb after")));
  ns.forEach((n, i) => t.append(el("tr", {class: "neighbor"}, el("td", {}, i + 1), el("td", {}, n.id),
    el("td", {}, fmt(n.distance)), el("td", {style: "text-align:left"}, n.title),
    el("td", {}, fmt(n.loss)), el("td", {}, fmt(n.bpb_after)))));
  return t;
}
function drill(d) {
  const p = el("div", {class: "panel drill"});
  p.append(el("h4", {}, d.id + " ", el("small", {}, d.title)));
  const flags = el("p", {});
  if (d.partial) flags.append(el("span", {class: "flag"}, "partial: shards " + d.failed_shards.join(", ") + " failed"), " ");
  flags.append("retrieval " + fmt(d.retrieve_seconds, 2) + " s (waits included), training " +
    fmt(d.train_seconds, 1) + " s, " + d.bytes + " bytes, selection " + d.selection);
  p.append(flags, curve(d.curve));
  const side = el("div", {class: "side"});
  const mine = el("div", {}, el("h5", {}, S.run + " (" + d.selection + "): after " + fmt(d.after)),
    neighborTable(d.neighbors));
  side.append(mine);
  for (const [name, o] of Object.entries(d.compare || {}))
    side.append(el("div", {class: "compare"}, el("h5", {}, name + " (" + o.selection + "): after " + fmt(o.after)),
      neighborTable(o.neighbors)));
  p.append(side);
  const ex = d.excluded_count;
  if (ex) p.append(el("p", {}, ex + " neighbor(s) excluded (closer than the identical-distance " +
    "guard, or beyond the distance threshold)" + (d.excluded.length ? ": " +
    d.excluded.map(e => e.id + (e.title ? " (" + e.title + ")" : "")).join("; ") : "")));
  return p;
}
function documents(task, box) {
  const docs = JSON.parse(document.getElementById("docs-" + S.taskIds[task]).textContent);
  const filter = el("input", {type: "search", placeholder: "filter documents", class: "docfilter"});
  const order = el("select", {}, el("option", {value: "gain"}, "largest gain first"),
    el("option", {value: "-gain"}, "smallest gain first"), el("option", {value: "id"}, "by id"));
  const table = el("table", {class: "docs"});
  const draw = () => {
    const q = filter.value.toLowerCase(), o = order.value;
    const rows = docs.filter(d => (d.id + " " + d.title).toLowerCase().includes(q));
    rows.sort(o === "id" ? (a, b) => a.id.localeCompare(b.id)
      : (a, b) => (o === "gain" ? 1 : -1) * ((a.gain ?? 0) - (b.gain ?? 0)));
    table.replaceChildren(el("tr", {}, el("th", {}, "document"), el("th", {}, "title or first line"),
      el("th", {}, "bytes"), el("th", {}, "before"), el("th", {}, "after"), el("th", {}, "difference"),
      el("th", {}, "flags")));
    for (const d of rows) {
      const tr = el("tr", {class: "doc", "data-doc": d.id}, el("td", {}, d.id),
        el("td", {style: "text-align:left"}, d.title), el("td", {}, d.bytes), el("td", {}, fmt(d.before)),
        el("td", {}, fmt(d.after)), el("td", {class: (d.gain ?? 0) < 0 ? "gain" : "loss"}, fmt(d.gain)),
        el("td", {}, (d.partial ? "partial " : "") + (d.excluded_count ? d.excluded_count + " excluded" : "")));
      tr.addEventListener("click", () => {
        const next = tr.nextElementSibling;
        if (next && next.classList.contains("drillrow")) { next.remove(); return; }
        tr.after(el("tr", {class: "drillrow"}, el("td", {colspan: 7, style: "text-align:left"}, drill(d))));
      });
      table.append(tr);
    }
  };
  filter.addEventListener("input", draw); order.addEventListener("change", draw);
  draw();
  box.append(el("div", {}, filter, order), table);
}
function main() {
  const tasks = document.getElementById("tasks");
  const names = Object.keys(S.tasks);
  for (const task of names) {
    const v = S.tasks[task], bars = v.error_bars || {}, last = String(S.checkpoints.at(-1));
    const tr = el("tr", {class: "task", "data-task": task}, el("td", {}, "▸ " + task), el("td", {}, v.documents),
      el("td", {}, fmt(v.before)), el("td", {}, fmt(v.after)), el("td", {}, fmt(v.difference)),
      el("td", {}, bars[last] ? fmt(bars[last][0]) + "-" + fmt(bars[last][1]) : "-"),
      el("td", {}, v.neighbors_excluded), el("td", {}, v.partial_retrievals));
    tr.addEventListener("click", () => {
      const next = tr.nextElementSibling;
      if (next && next.classList.contains("taskrow")) { next.remove(); return; }
      const box = el("td", {colspan: 8, style: "text-align:left"});
      const cps = S.checkpoints.map(String);
      box.append(curve(cps.map(n => [Number(n), v.checkpoints[n].bits_per_byte]), 360, 150,
        cps.map(n => bars[n] || null)));
      documents(task, box);
      tr.after(el("tr", {class: "taskrow"}, box));
    });
    tasks.append(tr);
  }
  const m = S.mean, last = String(S.checkpoints.at(-1)), mb = (m.error_bars || {})[last];
  tasks.append(el("tr", {class: "mean"}, el("td", {}, "Pile-weighted mean"), el("td", {}, S.documents),
    el("td", {}, fmt(m.before)), el("td", {}, fmt(m.after)), el("td", {}, fmt(m.difference)),
    el("td", {}, mb ? fmt(mb[0]) + "-" + fmt(mb[1]) : "-"), el("td", {}, S.neighbors_excluded),
    el("td", {}, S.partial_retrievals)));
  document.getElementById("meancurve").append(curve(S.checkpoints.map(n => [n, m.bits_per_byte[String(n)]]),
    360, 150, S.checkpoints.map(n => (m.error_bars || {})[String(n)] || null)));
  const f = document.getElementById("taskfilter");
  f.addEventListener("input", () => document.querySelectorAll("tr.task").forEach(tr => {
    const hide = !tr.dataset.task.toLowerCase().includes(f.value.toLowerCase());
    tr.style.display = hide ? "none" : "";
    const next = tr.nextElementSibling;
    if (hide && next && next.classList.contains("taskrow")) next.remove();
  }));
}
main();
"""


def _json(value: Any) -> str:
    # inside <script>: a "</" in a title must not end the element
    return json.dumps(finite(value), separators=(",", ":")).replace("</", "<\\/")


def render_page(
    summary: dict[str, Any], docs: dict[str, list[dict[str, Any]]], compare: list[str]
) -> str:
    """The page's HTML: summary and per-task documents inline, styles and script inline."""
    tasks = sorted(summary["tasks"])
    task_ids = {t: i for i, t in enumerate(tasks)}
    head = {
        k: summary.get(k)
        for k in ("run", "checkpoints", "documents", "tasks", "mean", "complete")
        + ("neighbors_excluded", "partial_retrievals")
    }
    head.update(taskIds=task_ids, compare=compare)
    first, last = summary["checkpoints"][0], summary["checkpoints"][-1]
    name = html.escape(str(summary.get("run", "")))
    blocks = "\n".join(
        f'<script type="application/json" id="docs-{task_ids[t]}">{_json(docs.get(t, []))}</script>'
        for t in tasks
    )
    complete = "" if summary.get("complete", True) else ' <span class="flag">incomplete</span>'
    vs = f" compared with {html.escape(', '.join(compare))}" if compare else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TTT-NN report: {name}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>TTT-NN report: {name}{complete}</h1>
<p>Bits per byte before (k={first}) and after (k={last}) test-time training on each test
document's nearest neighbors, per task; lower is better. Bars: bootstrap 10-90 % quantiles
over documents. Open a task for its curve and its documents{vs}; open a document for its
neighbors in training order.</p>
<input type="search" id="taskfilter" placeholder="filter tasks">
<table id="taskstable"><thead><tr><th>task</th><th>docs</th><th>before</th><th>after</th>
<th>difference</th><th>after 10-90 %</th><th>excluded</th><th>partial</th></tr></thead>
<tbody id="tasks"></tbody></table>
<h3>Pile-weighted mean against neighbors</h3><div id="meancurve"></div>
<script type="application/json" id="summary">{_json(head)}</script>
{blocks}
<script>{_SCRIPT}</script>
</body></html>
"""


def write_page(
    path: Path,
    summary: dict[str, Any],
    docs: dict[str, list[dict[str, Any]]],
    compare: list[str] | None = None,
) -> Path:
    """Write report.html to `path`."""
    path.write_text(render_page(summary, docs, list(compare or [])), encoding="utf-8")
    return path
