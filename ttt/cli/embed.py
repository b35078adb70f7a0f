"""`ttt embed --spec FILE --shard I|all`: embed a shard's documents into vectors."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ttt.spec import load_spec

log = logging.getLogger(__name__)


def shard_list(value: str, shards: int) -> list[int]:
    """'all' -> every shard of the spec; 'I' -> [I], checked against the spec's shard count."""
    if value == "all":
        return list(range(shards))
    try:
        shard = int(value)
    except ValueError:
        raise ValueError(f"--shard: expected an ordinal or 'all', got {value!r}") from None
    if not 0 <= shard < shards:
        raise ValueError(f"--shard {shard}: the spec has {shards} shard(s) (0..{shards - 1})")
    return [shard]


def _embed(args: argparse.Namespace) -> int:
    from ttt.embed import embed_shard
    from ttt.store import open_store
    from ttt.telemetry import start_metrics_server

    run = load_spec(args.spec)
    try:
        shards = shard_list(args.shard, run.spec.corpus.shards)
    except ValueError as exc:
        print(f"ttt embed: {exc}", file=sys.stderr)
        return 2
    if run.spec.metrics.enabled:
        try:
            start_metrics_server(run.spec.metrics.port, run=run.name)
        except OSError as exc:  # a busy port must not stop a batch job
            log.warning("metrics server not started on port %d: %s", run.spec.metrics.port, exc)
    store = open_store(run.spec.storage)
    for shard in shards:
        manifest = embed_shard(run, store, shard, progress=not args.quiet)
        summary = {k: manifest.get(k) for k in ("shard", "count", "dim", "tokens_per_second")}
        print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed one shard (or all) of the corpus with the spec's encoder (resumable)",
        description="Encode every document of a shard with spec.embedding (mean pooling, "
        "length-sorted token-budget batches) and publish embeddings.npy (float32, or float16 "
        "with spec.embedding.storage), ids.json "
        "and a manifest under runs/<name>/embed/shard-NNNNN/. Work is saved in parts, so a "
        "re-run after a crash resumes; a published shard with the same spec is skipped. "
        "Publishes the corpus shards first when they are missing.",
        epilog="example: ttt embed --spec examples/demo.yaml --shard all",
    )
    p.add_argument("--spec", required=True, metavar="FILE", help="TTTRun YAML file")
    p.add_argument("--shard", required=True, metavar="I", help="shard ordinal, or 'all'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)
