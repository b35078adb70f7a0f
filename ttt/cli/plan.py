"""`ttt plan SPEC`: GPU-hours, wall time, memory, storage and network of a run, before it runs."""

from __future__ import annotations

import argparse
import json
import shlex

from ttt.spec import load_spec


def _plan(args: argparse.Namespace) -> int:
    from ttt.plan import PlanError, format_plan, load_profile, plan_run

    run = load_spec(args.spec)
    profile = load_profile(args.profile) if args.profile else None
    bench = []
    for path in args.bench:
        try:
            with open(path, encoding="utf-8") as fh:
                bench.append((path, json.load(fh)))
        except ValueError as exc:
            raise PlanError(f"{path}: not the JSON of `ttt bench ... --json`: {exc}") from None
    plan = plan_run(
        run,
        profile,
        where=args.profile or "<profile>",
        bench=bench,
        recall_target=args.recall,
        bytes_per_vector=args.bytes_per_vector,
        sample_documents=args.sample_documents,
    )
    print(format_plan(plan), end="")
    print(f"reproduce: {_command(args)}")
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["ttt", "plan", args.spec]
    if args.profile:
        parts += ["--profile", args.profile]
    for path in args.bench:
        parts += ["--bench", path]
    if args.recall != 0.95:
        parts += ["--recall", str(args.recall)]
    if args.bytes_per_vector:
        parts += ["--bytes-per-vector", str(args.bytes_per_vector)]
    if args.sample_documents != 100_000:
        parts += ["--sample-documents", str(args.sample_documents)]
    return shlex.join(parts)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="what a run costs: GPU-hours, wall time, memory per shard and server, storage, "
        "network per query, and the index type meeting a recall target",
        epilog="example: ttt plan examples/pile-gpt2-large.yaml --profile examples/plan-pile.yaml",
    )
    p.add_argument("spec", help="TTTRun YAML file")
    p.add_argument(
        "--profile",
        help="YAML: throughputs (per GPU), hardware, and optionally the corpus figures per "
        "domain (otherwise the spec's files are counted)",
    )
    p.add_argument(
        "--bench",
        action="append",
        default=[],
        metavar="JSON",
        help="the output of `ttt bench embed|index|retrieval --json` (repeatable): measured "
        "throughputs and index recall override the profile's",
    )
    p.add_argument("--recall", type=float, default=0.95, help="recall@k target of the index")
    p.add_argument(
        "--bytes-per-vector",
        type=float,
        help="memory budget of the index per vector (default: one GPU's memory / documents)",
    )
    p.add_argument("--sample-documents", type=int, default=100_000)
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    p.set_defaults(func=_plan)
