"""The run's report: ranks merged into per-task bits per byte, the paper's table, and plots."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttt.aggregate import best_mixing_weights, bootstrap, cost_and_loss, median_rule
from ttt.bpb import pile_weighted_mean
from ttt.results import RESULTS, ResultsError, merge_records, parse_results, task_totals
from ttt.store import StoreError

log = logging.getLogger(__name__)

REPORT_FILES = ("summary.json", "table.md", "bpb_vs_neighbors.png", "before_after.png")
PHASES = ("retrieve", "train", "score")


def summarize(records: Sequence[dict[str, Any]], checkpoints: Sequence[int]) -> dict[str, Any]:
    """Every figure of the report, from deduplicated result records (the one place they come from).

    Per task and checkpoint: bits per byte, byte and word perplexity over summed logliks,
    bytes and words (lm-evaluation-harness); before = the first checkpoint, after = the last;
    the Pile-weighted mean over tasks; retrieval facts; seconds spent per phase.
    """
    if not records:
        raise ResultsError("no result records to summarize")
    checkpoints = sorted({int(c) for c in checkpoints})
    first, last = checkpoints[0], checkpoints[-1]
    # the interpolation baseline: each task at its best mixing weight (as the reference)
    records, mixing = best_mixing_weights(records, checkpoints)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    at = {n: task_totals(records, n) for n in checkpoints}
    tasks: dict[str, Any] = {}
    for task in sorted(by_task):
        rows = by_task[task]
        curve = {}
        for n in checkpoints:
            totals = at[n][task]
            curve[str(n)] = {
                "bits_per_byte": totals.bits_per_byte,
                "byte_perplexity": totals.byte_perplexity,
                "word_perplexity": totals.word_perplexity,
                "loglik": totals.loglik,
            }
        seconds = {p: sum(r.get("seconds", {}).get(p, 0.0) for r in rows) for p in PHASES}
        tasks[task] = {
            "documents": len(rows),
            "bytes": sum(int(r["bytes"]) for r in rows),
            "words": sum(int(r["words"]) for r in rows),
            "tokens": sum(int(r["tokens"]) for r in rows),
            "checkpoints": curve,
            "before": curve[str(first)]["bits_per_byte"],
            "after": curve[str(last)]["bits_per_byte"],
            "difference": curve[str(last)]["bits_per_byte"] - curve[str(first)]["bits_per_byte"],
            "neighbors_used": sum(int(r.get("neighbors", 0)) for r in rows),
            "neighbors_excluded": sum(int(r.get("excluded", 0)) for r in rows),
            "partial_retrievals": sum(bool(r.get("partial")) for r in rows),
            "seconds": seconds,
        }
    test_bytes = {t: v["bytes"] for t, v in tasks.items()}
    mean_curve = {
        str(n): pile_weighted_mean(
            {t: v["checkpoints"][str(n)]["bits_per_byte"] for t, v in tasks.items()}, test_bytes
        )
        for n in checkpoints
    }
    bars = bootstrap(records, checkpoints)
    for task, v in tasks.items():
        v["error_bars"] = bars["tasks"][task]  # bootstrap 10-90 % per checkpoint
        if task in mixing:
            v["mixing_weight"] = mixing[task]
    n_docs = len(records)
    total_seconds = {p: sum(v["seconds"][p] for v in tasks.values()) for p in PHASES}
    extra = {
        "reference_aggregation": _reference_aggregation(records, checkpoints),
        "training_loss_by_rank": {},
    }
    fits = [r["fits_window"] for r in records if "fits_window" in r]
    if fits:
        extra["in_context"] = {
            "documents": len(fits),
            "with_context": sum(fits),
            "note": "as the reference, only texts that fit one window get neighbors' text; "
            "longer ones are scored without context",
        }
    paper_cost = cost_and_loss(records)
    extra["training_loss_by_rank"] = paper_cost.pop("training_loss_by_rank")
    return {
        **extra,
        "checkpoints": checkpoints,
        "documents": n_docs,
        "tasks": tasks,
        "mean": {
            "bits_per_byte": mean_curve,
            "before": mean_curve[str(first)],
            "after": mean_curve[str(last)],
            "difference": mean_curve[str(last)] - mean_curve[str(first)],
            "error_bars": bars["mean"],
        },
        "neighbors_excluded": sum(v["neighbors_excluded"] for v in tasks.values()),
        "partial_retrievals": sum(v["partial_retrievals"] for v in tasks.values()),
        "cost": {
            "seconds": total_seconds,
            "seconds_per_document": {p: s / n_docs for p, s in total_seconds.items()},
            # the paper's Figure 9: training plus one scoring pass, per neighbor; ours: training
            **paper_cost,
        },
    }


def _reference_aggregation(
    records: Sequence[dict[str, Any]], checkpoints: Sequence[int]
) -> dict[str, Any]:
    """The reference's figures: documents shorter than their task's median curve dropped."""
    first, last = checkpoints[0], checkpoints[-1]
    kept = median_rule(records, last)
    at = {n: task_totals(kept, n) for n in checkpoints}
    tasks = {}
    for task in sorted(at[first]):
        curve = {str(n): at[n][task].bits_per_byte for n in checkpoints}
        tasks[task] = {
            "documents": at[first][task].documents,
            "bits_per_byte": curve,
            "before": curve[str(first)],
            "after": curve[str(last)],
        }
    test_bytes = {t: at[first][t].bytes for t in tasks}
    mean = {
        str(n): pile_weighted_mean(
            {t: v["bits_per_byte"][str(n)] for t, v in tasks.items()}, test_bytes
        )
        for n in checkpoints
    }
    return {
        "rule": "per task, only documents whose curve has the median length (tttlm)",
        "documents": len(kept),
        "tasks": tasks,
        "mean": {"bits_per_byte": mean, "before": mean[str(first)], "after": mean[str(last)]},
    }


def format_table(summary: dict[str, Any]) -> str:
    """The paper's table in Markdown: before and after with 10-90 % bootstrap bars, our
    aggregation (every document) beside the reference's (median rule), then notes."""
    first, last = summary["checkpoints"][0], summary["checkpoints"][-1]
    ref = summary.get("reference_aggregation", {"tasks": {}, "mean": {}, "documents": 0})
    lines = [
        (
            f"| task | docs | before (k={first}) | after (k={last}) | difference "
            "| after 10-90 % | ref. docs | ref. before | ref. after |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, docs: int, v: dict[str, Any], r: dict[str, Any]) -> str:
        bars = v.get("error_bars", {}).get(str(last))
        interval = f"{bars[0]:.3f}-{bars[1]:.3f}" if bars else "-"
        ref_cells = (
            f"| {r['documents']} | {r['before']:.3f} | {r['after']:.3f} |" if r else "| 0 | - | - |"
        )
        return (
            f"| {name} | {docs} | {v['before']:.3f} | {v['after']:.3f} "
            f"| {v['difference']:+.3f} | {interval} " + ref_cells
        )

    for task, v in summary["tasks"].items():
        lines.append(row(task, v["documents"], v, ref["tasks"].get(task, {})))
    m = summary["mean"]
    ref_mean = {**ref["mean"], "documents": ref["documents"]} if ref["mean"] else {}
    lines.append(row("**Pile-weighted mean**", summary["documents"], m, ref_mean))
    notes = [
        "",
        (
            f"Every document counts in the first columns ({summary['documents']} documents); "
            "the reference's rule (tttlm) drops those whose curve is shorter than their task's "
            f"median ({ref['documents']} documents remain). Bars: bootstrap over documents, "
            "1,000 resamples, 10-90 % quantiles."
        ),
    ]
    # seconds (per neighbor, as the paper counts them and training only) are in summary.json
    # and the CLI's output, not here: this table is the same on every re-run of a spec
    losses = summary.get("training_loss_by_rank", {})
    if losses:
        ranks = sorted(losses, key=int)
        notes.append(
            f"Mean training loss by neighbor rank: {losses[ranks[0]]:.3f} (rank {ranks[0]}) -> "
            f"{losses[ranks[-1]]:.3f} (rank {ranks[-1]})."
        )
    if "in_context" in summary:
        ic = summary["in_context"]
        notes.append(
            f"In-context: {ic['with_context']} of {ic['documents']} documents fit one window and "
            "got their neighbors' text; the others are scored without context (as the reference)."
        )
    mixing = {t: v["mixing_weight"] for t, v in summary["tasks"].items() if "mixing_weight" in v}
    if mixing:
        chosen = ", ".join(f"{t} {w[str(last)]:.2f}" for t, w in mixing.items())
        notes.append(f"Interpolation: the best mixing weight per task at k={last}: {chosen}.")
    return "\n".join(lines + notes) + "\n"


def _figure(width: float, height: float) -> Any:
    # A Figure with an Agg canvas, not pyplot: no global backend state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_bpb_vs_neighbors(summary: dict[str, Any], path: str | Path) -> Path:
    """Bits per byte against the number of neighbors trained on, one line per task."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    xs = summary["checkpoints"]
    for task, v in summary["tasks"].items():
        ax.plot(xs, [v["checkpoints"][str(n)]["bits_per_byte"] for n in xs], marker="o", label=task)
    ax.plot(
        xs,
        [summary["mean"]["bits_per_byte"][str(n)] for n in xs],
        color="black",
        linestyle="--",
        linewidth=2,
        label="weighted mean",
    )
    bars = summary["mean"].get("error_bars")
    if bars:  # bootstrap 10-90 % of the weighted mean
        ax.fill_between(
            xs,
            [bars[str(n)][0] for n in xs],
            [bars[str(n)][1] for n in xs],
            color="black",
            alpha=0.15,
            label="mean 10-90 %",
        )
    ax.set_xticks(xs)  # the checkpoints of evalAfter, not a continuous axis
    ax.set_xlabel("neighbors trained on")
    ax.set_ylabel("bits per byte")
    ax.set_title("TTT-NN: bits per byte vs neighbors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_before_after(summary: dict[str, Any], path: str | Path) -> Path:
    """Bits per byte per task before and after test-time training, as paired bars."""
    tasks = list(summary["tasks"]) + ["mean"]
    before = [v["before"] for v in summary["tasks"].values()] + [summary["mean"]["before"]]
    after = [v["after"] for v in summary["tasks"].values()] + [summary["mean"]["after"]]
    first, last = summary["checkpoints"][0], summary["checkpoints"][-1]
    fig = _figure(max(6, 0.7 * len(tasks) + 2), 4.5)
    ax = fig.add_subplot()
    xs = range(len(tasks))
    ax.bar(
        [x - 0.2 for x in xs],
        before,
        width=0.4,
        yerr=_yerr(summary, str(first), before),
        label=f"before (k={first})",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        after,
        width=0.4,
        yerr=_yerr(summary, str(last), after),
        label=f"after (k={last})",
    )
    ax.set_xticks(list(xs), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("bits per byte")
    ax.set_title("bits per byte before and after TTT-NN")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _yerr(summary: dict[str, Any], n: str, values: list[float]) -> Any:
    """Bootstrap 10-90 % bars as matplotlib's (below, above) offsets; None without bars."""
    rows = [*summary["tasks"].values(), summary["mean"]]
    bars = [r.get("error_bars", {}).get(n) for r in rows]
    if any(b is None for b in bars):
        return None
    below = [max(v - b[0], 0.0) for v, b in zip(values, bars, strict=True)]
    above = [max(b[1] - v, 0.0) for v, b in zip(values, bars, strict=True)]
    return [below, above]


def read_results(
    run: Any, store: Any, *, allow_incomplete: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every rank's records of this spec, a document seen twice counted once; and rank facts.

    A finished rank's results file must match its manifest (sha256 and record count), and
    every rank 0..world_size-1 must be finished: otherwise ResultsError names the rank, so a
    lost or overwritten results file can never pass for a complete evaluation. With
    `allow_incomplete`, unfinished ranks' results (and their attempts' files) are read as
    they are, for a look at a running evaluation; a checksum mismatch still refuses.
    """
    from ttt.results import rank_results

    spec_hash = run.stage_hash("eval")
    names = sorted(
        {m.group(1) for k in store.list(f"{run.prefix}/eval/") if (m := _RANK.search(k))}
    )
    groups, ranks, missing, worlds = [], {}, [], {}
    for name in names:
        prefix = f"{run.prefix}/eval/{name}"
        manifest = store.read_manifest(prefix)
        finished = bool(manifest and manifest.get("spec_hash") == spec_hash)
        if finished:
            group = _verified_results(store, prefix, manifest)
            worlds[name] = manifest.get("world_size")
        elif allow_incomplete:
            group = rank_results(store, prefix)
        else:
            group = []
            missing.append(name)
        groups.append(group)
        ranks[name] = {
            "records": len(group),
            "finished": finished,
            "world_size": (manifest or {}).get("world_size"),
        }
    world = _world_size(run, worlds)
    absent = [f"rank-{r:05d}" for r in range(world) if f"rank-{r:05d}" not in worlds]
    wrong = [n for n, w in worlds.items() if w != world and int(n[5:]) < world]
    if not allow_incomplete and names and (absent or wrong):
        why = [f"{n}: no finished results of this spec" for n in absent]
        why += [f"{n}: finished with world size {worlds[n]}, not {world}" for n in wrong]
        raise ResultsError(
            f"run {run.name}: the evaluation is incomplete ({world} ranks): "
            + "; ".join(why)
            + " (finish them with `ttt eval`, or report anyway with --allow-incomplete)"
        )
    records = merge_records(groups, spec_hash)
    raw = sum(len(g) for g in groups)
    complete = not absent and not wrong and all(v["finished"] for v in ranks.values())
    facts = {"ranks": ranks, "duplicates_or_stale": raw - len(records), "complete": complete}
    return records, facts


_RANK = re.compile(r"/eval/(rank-\d{5})/")


def _world_size(run: Any, worlds: dict[str, Any]) -> int:
    """The world size the finished ranks agree on (rank 0's), else the spec's workers."""
    if "rank-00000" in worlds and isinstance(worlds["rank-00000"], int):
        return worlds["rank-00000"]
    known = [w for w in worlds.values() if isinstance(w, int)]
    return max(known) if known else run.spec.eval.workers


def _verified_results(store: Any, prefix: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished rank's records, checked against its manifest's sha256 and count."""
    key = f"{prefix}/{RESULTS}"
    name = prefix.rsplit("/", 1)[-1]
    recorded = manifest.get("files", {}).get(RESULTS, {})
    try:
        data = store.get_bytes(key)
    except StoreError as exc:
        raise ResultsError(f"{name}: finished, but its results file is unreadable: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if recorded.get("sha256") != digest:
        raise ResultsError(
            f"{name}: {key} does not match its manifest (sha256 {digest[:12]}..., manifest "
            f"{str(recorded.get('sha256'))[:12]}...): overwritten or corrupt; run `ttt eval` "
            "for this rank again"
        )
    group = parse_results(data, key)
    if manifest.get("count") is not None and len(group) != manifest["count"]:
        raise ResultsError(
            f"{name}: {key} holds {len(group)} records, its manifest says {manifest['count']}"
        )
    return group


def build_report(
    run: Any, store: Any, *, out_dir: str | Path | None = None, allow_incomplete: bool = False
) -> dict[str, Any]:
    """Merge the ranks, write summary.json, table.md and the two plots to `report/`.

    Refuses (ResultsError naming the rank) unless every rank finished and its results match
    its manifest; `allow_incomplete` reports what is there, marked "complete": false.
    """
    records, facts = read_results(run, store, allow_incomplete=allow_incomplete)
    if not records:
        raise ResultsError(
            f"run {run.name}: no eval results of this spec under {run.prefix}/eval/ "
            "(run `ttt eval` first)"
        )
    unfinished = [r for r, v in facts["ranks"].items() if not v["finished"]]
    if unfinished:
        log.warning("report over unfinished rank(s) %s: figures are partial", unfinished)
    summary = summarize(records, run.spec.ttt.eval_after or [0])
    summary.update(run=run.name, spec_hash=run.stage_hash("eval"), **facts)
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"ttt-report-{run.name}-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, sort_keys=True))
    (out / "table.md").write_text(format_table(summary))
    plot_bpb_vs_neighbors(summary, out / "bpb_vs_neighbors.png")
    plot_before_after(summary, out / "before_after.png")
    store.publish(
        f"{run.prefix}/report",
        {name: out / name for name in REPORT_FILES},
        {"stage": "report", "spec_hash": run.stage_hash("report"), "documents": len(records)},
    )
    summary["local_dir"] = str(out)
    summary["table_markdown"] = format_table(summary)
    return summary


def _finite(value: Any) -> Any:
    """JSON has no NaN: a task without bytes or words reports null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
