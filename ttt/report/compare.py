"""Runs side by side: bits per byte per task at equal k, and the curves vs neighbors (NN vs SIFT)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttt.eval.records import ResultsError
from ttt.report.build import read_results
from ttt.report.plots import new_figure
from ttt.report.summary import finite, summarize

log = logging.getLogger(__name__)

COMPARE_FILES = ("compare.json", "compare.md", "compare_bpb_vs_neighbors.png")


def _label(run: Any) -> str:
    r = run.spec.retrieval
    if r.selection == "sift":
        return f"{run.name} (sift, K'={r.candidate_count}, lambda={r.sift_lambda:g})"
    return f"{run.name} ({r.selection})"


def compare_records(
    labelled: dict[str, Sequence[dict[str, Any]]], checkpoints: Sequence[int] | None = None
) -> dict[str, Any]:
    """Every run summarized over the documents all runs evaluated, at their common checkpoints.

    Only shared documents are compared, so a run that evaluated more (or is unfinished) does
    not tilt a task's figure; the count left out per run is reported.
    """
    if len(labelled) < 2:
        raise ResultsError("a comparison needs at least two runs")
    empty = [name for name, records in labelled.items() if not records]
    if empty:
        raise ResultsError(f"no result records for {empty}")
    common = set.intersection(*({r["doc"] for r in recs} for recs in labelled.values()))
    if not common:
        raise ResultsError("the runs evaluated no test document in common")
    if checkpoints is None:
        have = [
            set.intersection(*(set(map(int, r["loglik"])) for r in recs))
            for recs in labelled.values()
        ]
        checkpoints = sorted(set.intersection(*have))
    if not checkpoints:
        raise ResultsError("the runs share no checkpoint of evalAfter")
    runs = {}
    for name, records in labelled.items():
        shared = [r for r in records if r["doc"] in common]
        summary = summarize(shared, checkpoints)
        select = sum(r.get("seconds", {}).get("select", 0.0) for r in shared)
        summary["cost"]["seconds"]["select"] = select
        summary["cost"]["seconds_per_document"]["select"] = select / len(shared)
        summary["left_out"] = len(records) - len(shared)
        runs[name] = summary
    return {"checkpoints": list(checkpoints), "documents": len(common), "runs": runs}


def format_comparison(comparison: dict[str, Any]) -> str:
    """Markdown: bits per byte per task of every run at the largest common k, and the cost."""
    k = comparison["checkpoints"][-1]
    names = list(comparison["runs"])
    first = comparison["runs"][names[0]]
    head = " | ".join(f"{n} (k={k})" for n in names)
    diffs = " | ".join(f"{n} - {names[0]}" for n in names[1:])
    lines = [
        f"| task | docs | {head} | {diffs} |",
        "|---|---:|" + "---:|" * (2 * len(names) - 1),
    ]

    def row(label: str, docs: int, values: list[float]) -> str:
        cells = " | ".join(f"{v:.4f}" for v in values)
        delta = " | ".join(f"{v - values[0]:+.4f}" for v in values[1:])
        return f"| {label} | {docs} | {cells} | {delta} |"

    for task, v in first["tasks"].items():
        values = [
            comparison["runs"][n]["tasks"][task]["checkpoints"][str(k)]["bits_per_byte"]
            for n in names
        ]
        lines.append(row(task, v["documents"], values))
    means = [comparison["runs"][n]["mean"]["bits_per_byte"][str(k)] for n in names]
    lines.append(row("**Pile-weighted mean**", comparison["documents"], means))
    lines += [
        "",
        "| run | retrieve s/doc | select s/doc | train s/doc | score s/doc |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        per = comparison["runs"][n]["cost"]["seconds_per_document"]
        lines.append(
            f"| {n} | {per['retrieve']:.3f} | {per['select']:.4f} | {per['train']:.3f} "
            f"| {per['score']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Pile-weighted bits per byte against neighbors trained on, one line per run."""
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    xs = comparison["checkpoints"]
    for name, summary in comparison["runs"].items():
        ys = [summary["mean"]["bits_per_byte"][str(n)] for n in xs]
        ax.plot(xs, ys, marker="o", linewidth=2, label=name)
    ax.set_xticks(xs)
    ax.set_xlabel("neighbors trained on")
    ax.set_ylabel("bits per byte (Pile-weighted mean)")
    ax.set_title(f"bits per byte vs neighbors, {comparison['documents']} shared documents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def compare_runs(
    runs: Sequence[Any], stores: Sequence[Any], *, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Compare runs' eval results; files under the first run's report/compare/ and `out_dir`.

    Run i is read from `stores[i]`; each run's records are those of its own eval spec hash.
    """
    if len(stores) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(stores)} stores")
    labelled = {}
    for run, store in zip(runs, stores, strict=True):
        records, _ = read_results(run, store)
        if not records:
            raise ResultsError(
                f"run {run.name}: no eval results of this spec under {run.prefix}/eval/ "
                "(run `ttt run` or `ttt eval` first)"
            )
        label = _label(run)
        if label in labelled:
            raise ResultsError(f"run {run.name} is given twice")
        labelled[label] = records
    comparison = compare_records(labelled)
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"ttt-compare-{runs[0].name}-"))
    out.mkdir(parents=True, exist_ok=True)
    table = format_comparison(comparison)
    (out / "compare.json").write_text(json.dumps(finite(comparison), indent=2, sort_keys=True))
    (out / "compare.md").write_text(table)
    plot_comparison(comparison, out / "compare_bpb_vs_neighbors.png")
    stores[0].publish(
        f"{runs[0].prefix}/report/compare",
        {name: out / name for name in COMPARE_FILES},
        {"stage": "compare", "runs": [r.name for r in runs], "documents": comparison["documents"]},
    )
    comparison["local_dir"] = str(out)
    comparison["table_markdown"] = table
    return comparison
