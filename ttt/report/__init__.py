"""The run's report: ranks merged into per-task bits per byte (summary, aggregate), the paper's
table (table), plots (plots), the page report.html (page, page_data), flat
headline figures for trackers (headline), written by the report
stage (build); runs side by side (compare)."""

from __future__ import annotations

from ttt.report.build import REPORT_FILES, build_report, read_results
from ttt.report.headline import headline_figures
from ttt.report.plots import plot_before_after, plot_bpb_vs_neighbors
from ttt.report.summary import PHASES, summarize
from ttt.report.table import format_table

__all__ = [
    "PHASES",
    "REPORT_FILES",
    "build_report",
    "format_table",
    "headline_figures",
    "plot_before_after",
    "plot_bpb_vs_neighbors",
    "read_results",
    "summarize",
]
