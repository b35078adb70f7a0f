"""`ttt report`: merge the ranks' results into the summary, the table and the plots."""

from __future__ import annotations

import argparse

from ttt.spec import load_spec


def _report(args: argparse.Namespace) -> int:
    from ttt.report import build_report
    from ttt.store import open_store

    run = load_spec(args.spec)
    store = open_store(run.spec.storage)
    summary = build_report(run, store, out_dir=args.out, allow_incomplete=args.allow_incomplete)
    print(summary["table_markdown"], end="")
    print(f"\nreport: {store.describe()} {run.prefix}/report/ (local copy {summary['local_dir']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="merge every rank's results: summary.json, table.md and plots under report/",
        epilog="example: ttt report --spec examples/demo.yaml",
    )
    p.add_argument("--spec", required=True, help="TTTRun YAML file")
    p.add_argument("--out", default=None, help="also keep the report files in this directory")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="report over unfinished or missing ranks (figures marked complete: false)",
    )
    p.set_defaults(func=_report)
