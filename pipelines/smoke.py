"""The CI smoke pipeline: CPU only, one shard, one rank, in-process retrieval; linear."""

from kfp import dsl

from components.corpus_shard.component import corpus_shard
from components.index_build.component import index_build
from components.report.component import report
from components.shard_embed.component import shard_embed
from components.ttt_eval.component import ttt_eval
from pipelines.full import pulled, with_store

# Linear on purpose: kfp.local (the test suite's runner) cannot place a task after a
# ParallelFor, and a smoke run needs one shard and one rank only. The spec must say
# `retrieval: {inProcess: true}` since no index servers are deployed.


def uncached(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """As in the full pipeline, the store is the cache: KFP's cache would replay a stale
    report (or skip an evaluation whose results were since removed) without running."""
    return pulled(with_store(task, secret).set_caching_options(False))


@dsl.pipeline(name="ttt-nn-smoke", description="Tiny CPU-only TTT-NN run for CI.")
def smoke(spec: str, store_secret: str = "ttt-store") -> None:
    """On kind the store is MinIO (credentials from `store_secret`); kfp.local ignores it."""
    plan = uncached(corpus_shard(spec=spec), store_secret)
    embed = uncached(shard_embed(spec=spec, shard=0).after(plan), store_secret)
    index = uncached(
        index_build(spec=spec, shard=0, embeddings=embed.outputs["manifest"]), store_secret
    )
    evaluate = uncached(
        ttt_eval(spec=spec, rank=0, world_size=1, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).after(
            index
        ),
        store_secret,
    )
    uncached(report(spec=spec, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), store_secret).after(
        evaluate
    )
