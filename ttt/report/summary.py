"""A run's records summarized: per-task and Pile-weighted bits per byte per checkpoint, bars, cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ttt.bpb import pile_weighted_mean
from ttt.eval.records import ResultsError, task_totals
from ttt.report.aggregate import best_mixing_weights, bootstrap, cost_and_loss, median_rule

PHASES = ("retrieve", "train", "score")
# The methods whose reference script (tttlm process_results.py, process_results_dynamic_eval.py)
# applies the median rule; its in-context and interpolation scripts count every document.
MEDIAN_RULE_METHODS = ("ttt-nn", "dynamic-eval")


def summarize(
    records: Sequence[dict[str, Any]], checkpoints: Sequence[int], method: str = "ttt-nn"
) -> dict[str, Any]:
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
        "reference_aggregation": _reference_aggregation(records, checkpoints, method),
        "training_loss_by_rank": {},
        "training_loss_by_rank_pooled": {},
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
    # the reference's rule (per-task means, Pile-weighted); the table prints the pooled one
    extra["training_loss_by_rank"] = paper_cost.pop("training_loss_by_rank")
    extra["training_loss_by_rank_pooled"] = paper_cost.pop("training_loss_by_rank_pooled")
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
    records: Sequence[dict[str, Any]], checkpoints: Sequence[int], method: str = "ttt-nn"
) -> dict[str, Any]:
    """The reference's figures for `method`: for TTT-NN and dynamic evaluation, documents
    shorter than their task's median curve dropped; for the baselines, every document."""
    first, last = checkpoints[0], checkpoints[-1]
    median = method in MEDIAN_RULE_METHODS
    kept = median_rule(records, last) if median else list(records)
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
        "median_rule": median,
        "rule": (
            "per task, only documents whose curve has the median length (tttlm)"
            if median
            else f"every document (tttlm's {method} baseline script applies no median rule)"
        ),
        "documents": len(kept),
        "tasks": tasks,
        "mean": {"bits_per_byte": mean, "before": mean[str(first)], "after": mean[str(last)]},
    }


def finite(value: Any) -> Any:
    """JSON has no NaN: a task without bytes or words reports null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
