"""The CI smoke pipeline: CPU only, one shard, one rank, in-process retrieval; linear."""

from kfp import dsl

from components.corpus_shard.component import corpus_shard
from components.index_build.component import index_build
from components.report.component import report
from components.shard_embed.component import shard_embed
from components.ttt_eval.component import ttt_eval
from pipelines.full import with_store

# Linear on purpose: kfp.local (the test suite's runner) cannot place a task after a
# ParallelFor, and a smoke run needs one shard and one rank only. The spec must say
# `retrieval: {inProcess: true}` since no index servers are deployed.


@dsl.pipeline(name="ttt-nn-smoke", description="Tiny CPU-only TTT-NN run for CI.")
def smoke(spec: str, store_secret: str = "ttt-store") -> None:
    """On kind the store is MinIO (credentials from `store_secret`); kfp.local ignores it."""
    plan = with_store(corpus_shard(spec=spec), store_secret)
    embed = with_store(shard_embed(spec=spec, shard=0).after(plan), store_secret)
    index = with_store(
        index_build(spec=spec, shard=0, embeddings=embed.outputs["manifest"]), store_secret
    )
    evaluate = with_store(ttt_eval(spec=spec, rank=0, world_size=1).after(index), store_secret)
    with_store(report(spec=spec), store_secret).after(evaluate)
