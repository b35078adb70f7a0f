"""`ttt index build --spec FILE --shard I|all`: build and publish a shard's FAISS index."""

from __future__ import annotations

import argparse
import json
import sys

from ttt.cli.embed import shard_list
from ttt.spec import load_spec


def _build(args: argparse.Namespace) -> int:
    from ttt.index.build import build_shard_index
    from ttt.store import open_store

    run = load_spec(args.spec)
    try:
        shards = shard_list(args.shard, run.spec.corpus.shards)
    except ValueError as exc:
        print(f"ttt index build: {exc}", file=sys.stderr)
        return 2
    store = open_store(run.spec.storage)
    for shard in shards:
        manifest = build_shard_index(run, store, shard)
        keys = ("shard", "type", "ntotal", "bytes_per_vector", "recall_k", "recall")
        print(json.dumps({k: manifest.get(k) for k in keys}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser(
        "index",
        help="FAISS shard indexes",
        epilog="example: ttt index build --spec examples/demo.yaml --shard all",
    )
    commands = index.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    p = commands.add_parser(
        "build",
        help="build one shard's index (or all) from its published embeddings",
        description="Build spec.index.type ('flat' = exact L2 as the paper, or a FAISS "
        "factory string such as 'IVF1024,PQ64') over a shard's embeddings, trained on "
        "spec.index.trainSample vectors (on a GPU when FAISS has one), measure recall@k "
        "against exact search on spec.index.recallQueries held-out queries, and publish "
        "index.faiss with a manifest under runs/<name>/index/shard-NNNNN/.",
        epilog="example: ttt index build --spec examples/demo.yaml --shard 0",
    )
    p.add_argument("--spec", required=True, metavar="FILE", help="TTTRun YAML file")
    p.add_argument("--shard", required=True, metavar="I", help="shard ordinal, or 'all'")
    p.set_defaults(func=_build)
