"""The full TTT-NN pipeline: corpus, embed+index per shard, deploy the index, eval per rank, report."""

from kfp import dsl, kubernetes

from components.corpus_shard.component import corpus_shard
from components.deploy_index.component import deploy_index
from components.index_build.component import index_build
from components.report.component import report
from components.shard_embed.component import shard_embed
from components.ttt_eval.component import ttt_eval

# Store credentials reach every task from this Secret's keys, never through parameters.
STORE_SECRET_KEYS = {"accesskey": "TTT_S3_ACCESS_KEY", "secretkey": "TTT_S3_SECRET_KEY"}


def with_store(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=STORE_SECRET_KEYS)
    return task


def on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)


@dsl.pipeline(name="ttt-nn-full", description="TTT-NN at Pile scale: sharded index, ranks.")
def full(
    spec: str,
    store_secret: str = "ttt-store",
    namespace: str = "ttt",
    index_statefulset: str = "ttt-index",
) -> None:
    """`spec` is the TTTRun YAML text or an s3:// URI of it."""
    plan = with_store(corpus_shard(spec=spec), store_secret)
    with dsl.ParallelFor(plan.outputs["shards"], name="shards") as shard:
        embed = on_gpu(with_store(shard_embed(spec=spec, shard=shard), store_secret))
        index = on_gpu(
            with_store(
                index_build(spec=spec, shard=shard, embeddings=embed.outputs["manifest"]),
                store_secret,
            )
        )
    deploy = deploy_index(
        spec=spec,
        indexes=dsl.Collected(index.outputs["manifest"]),
        namespace=namespace,
        statefulset=index_statefulset,
    )
    with dsl.ParallelFor(plan.outputs["ranks"], name="ranks") as rank:
        evaluate = on_gpu(
            with_store(
                ttt_eval(spec=spec, rank=rank, world_size=plan.outputs["world_size"]), store_secret
            )
        )
        evaluate.after(deploy)
    summary = with_store(report(spec=spec), store_secret)
    summary.after(evaluate)
