"""`ttt run`: every stage of a run spec on this machine (the embedded default, no cluster)."""

from __future__ import annotations

import argparse
import sys

from ttt.spec import load_spec


def _run(args: argparse.Namespace) -> int:
    from ttt.runner import describe_result, run_local
    from ttt.store import open_store

    run = load_spec(args.spec)
    try:
        summary = run_local(run, workdir=args.workdir)
    except KeyboardInterrupt:
        print("ttt run: interrupted; run it again to resume", file=sys.stderr)
        return 130
    print(describe_result(run, summary, open_store(run.spec.storage).describe()), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run corpus, embed, index, serve, eval and report on this machine (resumable)",
        description="Run the whole pipeline locally: one shard server per shard and one "
        "evaluation worker per rank as local processes. Finished stages are skipped, so a "
        "re-run after a crash or Ctrl-C resumes where it stopped.",
        epilog="example: ttt run examples/demo.yaml",
    )
    p.add_argument("spec", help="TTTRun YAML file")
    p.add_argument("--workdir", help="where the resolved spec and the process logs go")
    p.set_defaults(func=_run)
