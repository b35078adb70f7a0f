"""`ttt query`: the nearest neighbors of a text across every shard of a run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "query",
        help="nearest neighbors of a text: domain, distance and a snippet of each",
        epilog="example: ttt query --spec examples/demo.yaml "
        '"grep searches for PATTERNS in each FILE" --k 3',
    )
    p.add_argument("--spec", required=True, metavar="FILE", help="TTTRun YAML file")
    p.add_argument("text", help="query text (embedded with the run's encoder)")
    p.add_argument("--k", type=int, default=10, help="neighbors to show (default 10)")
    p.add_argument(
        "--local",
        action="store_true",
        help="load the shards into this process instead of asking the servers",
    )
    p.add_argument("--snippet", type=int, default=80, help="characters of text to show")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_query)


def _snippet(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _query(args: argparse.Namespace) -> int:
    from ttt.index.client import query
    from ttt.index.retrieval import euclidean
    from ttt.spec import load_spec

    run = load_spec(args.spec)
    (result,) = query(run, [args.text], args.k, local=args.local)
    if args.json:
        print(json.dumps(asdict(result), ensure_ascii=False, indent=2))
        return 0
    if result.partial:
        print(f"partial: shard(s) {result.failed_shards} did not answer", file=sys.stderr)
    if not result.neighbors:
        print("no neighbors (within spec.retrieval.distanceThreshold)")
        return 0
    width = max(len("domain"), *(len(n.domain) for n in result.neighbors))
    print(f"{'#':>3}  {'distance':>9}  {'domain':<{width}}  {'id':<16}  text")
    for i, n in enumerate(result.neighbors, start=1):
        # Euclidean, the unit of spec.retrieval.distanceThreshold (the JSON keeps FAISS's squared)
        line = f"{i:>3}  {euclidean(n.distance):>9.4f}  {n.domain:<{width}}  {n.id:<16}  "
        print(line + _snippet(n.text, args.snippet))
    return 0
