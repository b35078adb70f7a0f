"""The report's Markdown table: the paper's before/after columns, bars, the reference's rule."""

from __future__ import annotations

from typing import Any


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
            + (
                "the reference's rule (tttlm) drops those whose curve is shorter than their "
                f"task's median ({ref['documents']} documents remain). "
                if ref.get("median_rule", True)
                else "so do the ref. columns: the reference's script for this baseline counts "
                "every document (no median rule). "
            )
            + "Bars: bootstrap over documents, 1,000 resamples, 10-90 % quantiles."
        ),
    ]
    # seconds (per neighbor, as the paper counts them and training only) are in summary.json
    # and the CLI's output, not here: this table is the same on every re-run of a spec
    # every document pooled, as the other first columns (summary.json and `ttt report` also
    # give the reference's per-task, Pile-weighted figure, training_loss_by_rank)
    losses = summary.get("training_loss_by_rank_pooled", {})
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
