"""The paper's ways of aggregating result records: its median rule, bootstrap error bars, cost.

ttt.report's figures count every document; these add the reference code's (tttlm
process_results.py) side by side: documents whose curve is shorter than the task's median
dropped, bootstrap 10-90 % quantiles over documents, seconds per neighbor including one
scoring pass, the mean training loss per neighbor rank, and the interpolation baseline's
best mixing weight per task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ttt.bpb import task_weights
from ttt.eval.records import checkpoint_score

RESAMPLES = 1000
QUANTILES = (0.1, 0.9)
_CHUNK = 100  # resamples drawn at once (memory: CHUNK x documents)


def curve_length(record: dict[str, Any], last: int) -> int:
    """How many scores the reference would hold for this document: 1 + neighbors trained on."""
    used = record.get("checkpoint_neighbors")
    if used:
        return 1 + max(int(v) for v in used.values())
    return 1 + min(int(record.get("neighbors", 0)), last)


def median_rule(records: Sequence[dict[str, Any]], last: int) -> list[dict[str, Any]]:
    """The reference's filter: per task, only documents whose curve is the median's length.

    tttlm keeps `len(curve) == int(median)`: in practice it drops every document that got
    fewer than k neighbors (past the threshold, or a short retrieval) from every figure.
    """
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    kept = []
    for rows in by_task.values():
        lengths = [curve_length(r, last) for r in rows]
        median = int(np.median(lengths))
        kept += [r for r, n in zip(rows, lengths, strict=True) if n == median]
    return kept


def _matrix(rows: Sequence[dict[str, Any]], checkpoints: Sequence[int]) -> np.ndarray:
    return np.array([[checkpoint_score(r, n).loglik for n in checkpoints] for r in rows], float)


def bootstrap(
    records: Sequence[dict[str, Any]],
    checkpoints: Sequence[int],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap 10-90 % quantiles of bits per byte, per task and of the Pile-weighted mean.

    Each resample draws every task's documents with replacement (as tttlm's bootstrap) and
    recomputes bits per byte from the summed logliks and bytes; the mean's interval comes from
    the weighted mean of the same resamples (tttlm averages the tasks' quantiles instead).
    Returns {"tasks": {task: {n: [lo, hi]}}, "mean": {n: [lo, hi]}}.
    """
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    tasks = sorted(by_task)
    draws: dict[str, np.ndarray] = {}
    for task in tasks:
        rows = by_task[task]
        ll, nbytes = _matrix(rows, checkpoints), np.array([r["bytes"] for r in rows], float)
        m = len(rows)
        out = np.empty((resamples, len(checkpoints)))
        for start in range(0, resamples, _CHUNK):
            size = min(_CHUNK, resamples - start)
            counts = rng.multinomial(m, np.full(m, 1.0 / m), size=size).astype(float)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[start : start + size] = (
                    -(counts @ ll) / (counts @ nbytes)[:, None] / math.log(2)
                )
        draws[task] = out
    test_bytes = {t: sum(int(r["bytes"]) for r in by_task[t]) for t in tasks}
    weights = task_weights(tasks, test_bytes)
    mean = sum(weights[t] * draws[t] for t in tasks)

    def bounds(values: np.ndarray) -> dict[str, list[float]]:
        q = np.nanquantile(values, QUANTILES, axis=0)
        return {str(n): [float(q[0, i]), float(q[1, i])] for i, n in enumerate(checkpoints)}

    return {"tasks": {t: bounds(draws[t]) for t in tasks}, "mean": bounds(mean)}


def best_mixing_weights(
    records: Sequence[dict[str, Any]], checkpoints: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """The interpolation baseline per task: the mixing weight a with the lowest bits per byte.

    Records with `mix_loglik` (loglik at each a of ttt.baselines.MIX_WEIGHTS) come back with
    `loglik` set to the task's best a at each checkpoint, as tttlm reports min over a per
    task; other records are returned unchanged. Also {task: {checkpoint: a}}.
    """
    from ttt.baselines import MIX_WEIGHTS

    mixed = [r for r in records if "mix_loglik" in r]
    if not mixed:
        return list(records), {}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in mixed:
        by_task.setdefault(r["task"], []).append(r)
    best: dict[str, dict[str, int]] = {}
    for task, rows in by_task.items():
        best[task] = {}
        for n in checkpoints:
            totals = np.zeros(len(MIX_WEIGHTS))
            for r in rows:
                reached = max(int(c) for c in r["mix_loglik"] if int(c) <= n)
                totals += np.asarray(r["mix_loglik"][str(reached)], float)
            best[task][str(n)] = int(np.argmax(totals))  # most likely = fewest bits per byte
    out = []
    for r in records:
        if "mix_loglik" in r:
            choice = best[r["task"]]
            loglik = {}
            for c in r["mix_loglik"]:
                # the record's own checkpoints, each at the weight its task chose there
                i = choice.get(c, choice[max(choice, key=int)])
                loglik[c] = float(r["mix_loglik"][c][i])
            r = {**r, "loglik": loglik}
        out.append(r)
    weights = {t: {n: MIX_WEIGHTS[i] for n, i in b.items()} for t, b in best.items()}
    return out, weights


def _task_curves(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """A task's documents the reference keeps for its cost and loss curves, and their length.

    tttlm keeps, per task, the documents whose list of per-neighbor losses (and costs) has
    the median length (`len(l) == int(median)`); a document without neighbors has length 0.
    """
    lengths = [len(r.get("train_losses", [])) for r in rows]
    median = int(np.median(lengths)) if lengths else 0
    return [r for r, n in zip(rows, lengths, strict=True) if n == median], median


def _one_pass(r: dict[str, Any]) -> float:
    return float(r.get("seconds", {}).get("score", 0.0)) / max(int(r.get("score_passes", 0)), 1)


def cost_and_loss(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per neighbor and the mean training loss per neighbor rank, as tttlm aggregates.

    Per task (tttlm process_results.py): the documents whose curve has the task's median
    length; at each neighbor rank the mean over them (training plus one scoring pass of the
    test document, the paper's cost; and the training loss); a task's seconds per neighbor is
    the mean of its per-rank means. Over tasks: the Pile-weighted mean of the per-task
    figures (ttt.bpb.task_weights; test bytes for names outside the Pile), over the tasks whose
    curve has the median length among tasks (tttlm's compute_pile_all; the weights are
    renormalized over them, which on the full Pile changes nothing). Records hold a document's
    total training and scoring seconds, so a rank's cost is the document's mean; with equal
    curve lengths the mean of per-rank means equals the pooled mean over the kept documents.
    Also `train_seconds_per_neighbor` (training only) by the same rule, and
    `training_loss_by_rank_pooled`: every document's loss at each rank, pooled.
    """
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    tasks: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[float]] = {}
    for task, rows in sorted(by_task.items()):
        kept, length = _task_curves(rows)
        if not length:
            tasks[task] = {"paper_seconds_per_neighbor": None, "train_seconds_per_neighbor": None}
            continue
        train = [float(r.get("seconds", {}).get("train", 0.0)) / length for r in kept]
        paper = [t + _one_pass(r) for t, r in zip(train, kept, strict=True)]
        tasks[task] = {
            "documents": len(kept),
            "paper_seconds_per_neighbor": float(np.mean(paper)),
            "train_seconds_per_neighbor": float(np.mean(train)),
        }
        losses = np.array([r["train_losses"] for r in kept], float)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rank with no finite loss: NaN
            curves[task] = [float(v) for v in np.nanmean(losses, axis=0)]
    test_bytes = {t: sum(int(r["bytes"]) for r in rows) for t, rows in by_task.items()}

    def weighted(values: dict[str, float]) -> float | None:
        if not values:
            return None
        weights = task_weights(sorted(values), test_bytes)
        return float(sum(weights[t] * v for t, v in values.items()))

    out: dict[str, Any] = {
        key: weighted({t: v[key] for t, v in tasks.items() if v[key] is not None and t in curves})
        for key in ("paper_seconds_per_neighbor", "train_seconds_per_neighbor")
    }
    by_rank: dict[str, float] = {}
    if curves:
        median = int(np.median([len(c) for c in curves.values()]))
        same = {t: c for t, c in curves.items() if len(c) == median}
        for i in range(median):
            finite_at = {t: c[i] for t, c in same.items() if math.isfinite(c[i])}
            value = weighted(finite_at)
            if value is not None:
                by_rank[str(i + 1)] = value
    pooled: dict[int, list[float]] = {}
    for r in records:
        for rank, loss in enumerate(r.get("train_losses", []), start=1):
            if math.isfinite(loss):
                pooled.setdefault(rank, []).append(float(loss))
    return {
        **out,
        "aggregation": "tttlm: per task the median-length curves' mean per rank, then the "
        "Pile-weighted mean of the per-task figures",
        "tasks": tasks,
        "training_loss_by_rank": by_rank,
        "training_loss_by_rank_pooled": {
            str(k): float(np.mean(v)) for k, v in sorted(pooled.items())
        },
    }
