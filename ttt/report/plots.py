"""The report's plots: bits per byte against neighbors per task, and before/after per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any:
    # A Figure with an Agg canvas, not pyplot: no global backend state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_bpb_vs_neighbors(summary: dict[str, Any], path: str | Path) -> Path:
    """Bits per byte against the number of neighbors trained on, one line per task."""
    fig = new_figure(7, 4.5)
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
    fig = new_figure(max(6, 0.7 * len(tasks) + 2), 4.5)
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
