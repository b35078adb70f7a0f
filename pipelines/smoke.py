"""The CI smoke pipeline: CPU only, one shard, one rank, in-process retrieval; linear."""

from kfp import dsl

from components.corpus_shard.component import corpus_shard
from components.index_build.component import index_build
from components.report.component import report
from components.shard_embed.component import shard_embed
from components.ttt_eval.component import ttt_eval

# Linear on purpose: kfp.local (the test suite's runner) cannot place a task after a
# ParallelFor, and a smoke run needs one shard and one rank only. The spec must say
# `retrieval: {inProcess: true}` since no index servers are deployed.


@dsl.pipeline(name="ttt-nn-smoke", description="Tiny CPU-only TTT-NN run for CI.")
def smoke(spec: str) -> None:
    plan = corpus_shard(spec=spec)
    embed = shard_embed(spec=spec, shard=0).after(plan)
    index = index_build(spec=spec, shard=0, embeddings=embed.outputs["manifest"])
    evaluate = ttt_eval(spec=spec, rank=0, world_size=1).after(index)
    report(spec=spec).after(evaluate)
