"""A report's headline figures as flat name -> number pairs (KFP Metrics, MLflow metrics)."""

from __future__ import annotations

import math
import re
from typing import Any

MEAN = "pile_mean"


def metric_name(task: str) -> str:
    """A task's name as a metric key: letters, digits and underscores (`Generated Math` ->
    `Generated_Math`), so every tracker accepts it."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", task).strip("_") or "task"


def headline_figures(summary: dict[str, Any]) -> dict[str, float]:
    """Bits per byte before and after per task and for the Pile-weighted mean, the after
    value's bootstrap 10-90 % bars, documents, and seconds per neighbor (paper's count and
    training only). Figures that are not finite numbers (no neighbors trained) are left out."""
    last = str(summary["checkpoints"][-1])
    rows = {metric_name(t): v for t, v in summary["tasks"].items()}
    rows[MEAN] = {**summary["mean"], "documents": summary["documents"]}
    out: dict[str, Any] = {}
    for name, v in rows.items():
        bars = (v.get("error_bars") or {}).get(last) or [None, None]
        out[f"bpb_before.{name}"] = v.get("before")
        out[f"bpb_after.{name}"] = v.get("after")
        out[f"bpb_difference.{name}"] = v.get("difference")
        out[f"bpb_after_p10.{name}"], out[f"bpb_after_p90.{name}"] = bars
        out[f"documents.{name}"] = v.get("documents")
    cost = summary.get("cost") or {}
    out["seconds_per_neighbor"] = cost.get("paper_seconds_per_neighbor")
    out["train_seconds_per_neighbor"] = cost.get("train_seconds_per_neighbor")
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
