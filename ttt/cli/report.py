"""`ttt report`: merge the ranks' results into the summary, the table and the plots."""

from __future__ import annotations

import argparse

from ttt.spec import load_spec


def _report(args: argparse.Namespace) -> int:
    from ttt.report import build_report
    from ttt.store import open_store

    run = load_spec(args.spec)
    store = open_store(run.spec.storage)
    others = [load_spec(path) for path in args.compare]
    stores = [store] + [open_store(o.spec.storage) for o in others]
    summary = build_report(
        run,
        store,
        out_dir=args.out,
        allow_incomplete=args.allow_incomplete,
        compare=list(zip(others, stores[1:], strict=True)),
    )
    print(summary["table_markdown"], end="")
    cost = summary["cost"]
    if cost.get("paper_seconds_per_neighbor") is not None:
        print(
            f"\nseconds per neighbor: {cost['paper_seconds_per_neighbor']:.3f} as the paper "
            f"counts them (training plus one scoring pass), "
            f"{cost['train_seconds_per_neighbor']:.3f} training only (per-task means, "
            "Pile-weighted, as tttlm)"
        )
    losses = summary.get("training_loss_by_rank") or {}
    if losses:
        ranks = sorted(losses, key=int)
        print(
            f"mean training loss by neighbor rank as tttlm (per-task means, Pile-weighted): "
            f"{losses[ranks[0]]:.3f} (rank {ranks[0]}) -> {losses[ranks[-1]]:.3f} "
            f"(rank {ranks[-1]})"
        )
    print(f"\nreport: {store.describe()} {run.prefix}/report/ (local copy {summary['local_dir']})")
    if args.compare:
        from ttt.report.compare import compare_runs

        out = f"{args.out}/compare" if args.out else None
        comparison = compare_runs([run, *others], stores, out_dir=out)
        print(f"\ncomparison over {comparison['documents']} shared test documents:")
        print(comparison["table_markdown"], end="")
        print(f"\ncompare: {store.describe()} {run.prefix}/report/compare/")
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
        "--compare",
        action="append",
        default=[],
        metavar="SPEC",
        help="another run's spec (e.g. SIFT vs nearest neighbors): a table per task at equal "
        "k and the bits-per-byte curves of all (repeatable)",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="report over unfinished or missing ranks (figures marked complete: false)",
    )
    p.set_defaults(func=_report)
