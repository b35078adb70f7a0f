"""`ttt eval`: one evaluation rank (a worker of a Kubernetes Indexed Job, or a local process)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from ttt.spec import load_spec


def _drain(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _eval(args: argparse.Namespace) -> int:
    from ttt.eval import evaluate_rank, prepare_worker_process, resolve_rank
    from ttt.store import open_store

    run = load_spec(args.spec)
    if args.list:
        return _list(run)
    prepare_worker_process(run)  # this process is the worker (ttt.engine.hostmem)
    rank, world_size = resolve_rank(args.rank, args.world_size, os.environ, run.spec.eval.workers)
    # A pod's eviction sends SIGTERM: unwind like Ctrl-C so the finished documents are
    # uploaded before the process ends (a restarted worker skips them).
    signal.signal(signal.SIGTERM, _drain)
    try:
        manifest = evaluate_rank(
            run,
            open_store(run.spec.storage),
            rank,
            world_size,
            flush_seconds=args.flush_seconds,
            progress=not args.no_progress,
            local_index=args.local_index,
        )
    except KeyboardInterrupt as exc:
        print(
            f"eval rank {rank} interrupted ({exc or 'SIGINT'}); finished documents are "
            "in the store and a restart resumes",
            file=sys.stderr,
        )
        return 130
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, sort_keys=True))
    return 0


def _list(run: Any) -> int:
    """The selected test documents of every rank, `id<TAB>task`, in the selection's order."""
    from ttt.eval import select_test_documents
    from ttt.store import open_store

    # the store only reads s3:// test files; nothing of any stage is needed
    for doc in select_test_documents(run, open_store(run.spec.storage)):
        print(f"{doc.id}\t{doc.domain}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate one rank's test documents (resumable; results go to the store)",
        description=(
            "Rank and world size come from --rank/--world-size, else the environment: "
            "RANK or JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), and WORLD_SIZE; "
            "the world size defaults to spec.eval.workers."
        ),
        epilog="example: ttt eval --spec examples/demo.yaml --rank 0 --world-size 2",
    )
    p.add_argument("--spec", required=True, help="TTTRun YAML file")
    p.add_argument("--rank", type=int, default=None, help="this worker's rank (0-based)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks")
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=5.0,
        help="upload the results file at most this often (0 = after every document)",
    )
    p.add_argument(
        "--local-index",
        action="store_true",
        help="load the shard indexes into this process instead of querying shard servers",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--list",
        action="store_true",
        help="print the selected test documents of all ranks (id<TAB>task) and evaluate nothing",
    )
    p.set_defaults(func=_eval)
