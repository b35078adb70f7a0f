"""`ttt corpus stats|shard`: count a Pile-format corpus, or split it into text-store shards."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SPEC_HELP = "run spec whose storage reads s3:// paths (the bucket must match)"


def register(subparsers: Any) -> None:
    corpus = subparsers.add_parser(
        "corpus",
        help="inspect and shard a Pile-format corpus",
        description="Read Pile-format .jsonl / .jsonl.zst files (paths, globs, s3:// URIs).",
        epilog="examples:\n"
        "  ttt corpus stats examples/data/train.jsonl.zst examples/data/bad-lines.jsonl\n"
        "  ttt corpus shard examples/data/train.jsonl.zst --shards 2 --out /tmp/corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = corpus.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND", required=True)

    stats = sub.add_parser(
        "stats",
        help="documents and bytes per domain, bad lines per reason",
        epilog="example: ttt corpus stats 'examples/data/*.jsonl*' --json",
    )
    stats.add_argument("paths", nargs="+", metavar="PATH")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--strict", action="store_true", help="fail on the first bad line")
    stats.add_argument("--spec", metavar="FILE", help=SPEC_HELP)
    stats.set_defaults(func=_stats)

    shard = sub.add_parser(
        "shard",
        help="split into N text-store shards (texts.zst, offsets.npy, docs.jsonl)",
        epilog="example: ttt corpus shard examples/data/train.jsonl.zst --shards 4 --out /tmp/corpus",
    )
    shard.add_argument("paths", nargs="+", metavar="PATH")
    shard.add_argument("--shards", type=int, required=True, metavar="N")
    shard.add_argument("--out", required=True, metavar="DIR")
    shard.add_argument("--json", action="store_true", help="machine-readable output")
    shard.add_argument("--strict", action="store_true", help="fail on the first bad line")
    shard.add_argument("--spec", metavar="FILE", help=SPEC_HELP)
    shard.set_defaults(func=_shard)


def _store(args: argparse.Namespace) -> Any:
    if not args.spec:
        return None
    from ttt.spec import load_spec
    from ttt.store import open_store

    return open_store(load_spec(args.spec).spec.storage)


def _stats(args: argparse.Namespace) -> int:
    from ttt.corpus import collect_stats

    stats = collect_stats(args.paths, store=_store(args), strict=args.strict)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats.summary())
    return 0


def _shard(args: argparse.Namespace) -> int:
    from ttt.corpus import write_text_shards

    if args.shards < 1:
        print(f"error: --shards must be >= 1, got {args.shards}", file=sys.stderr)
        return 2
    stats = write_text_shards(
        args.paths, args.shards, args.out, store=_store(args), strict=args.strict
    )
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return 0
    print(stats.summary())
    for s in stats.shards:
        print(f"shard {s['shard']:>5}: {s['documents']:>10,} documents {s['bytes']:>14,} bytes")
    print(f"text stores in {args.out}")
    return 0
