"""The full TTT-NN pipeline: corpus, embed+index per shard, deploy the index, eval per rank, report."""

import math
import os

from kfp import dsl, kubernetes

from components.corpus_shard.component import corpus_shard
from components.deploy_index.component import deploy_index
from components.index_build.component import index_build
from components.report.component import report
from components.shard_embed.component import shard_embed
from components.ttt_eval.component import ttt_eval

# Store credentials reach every task from this Secret's keys, never through parameters.
STORE_SECRET_KEYS = {"accesskey": "TTT_S3_ACCESS_KEY", "secretkey": "TTT_S3_SECRET_KEY"}
# The index servers' bearer token: the auth Secret is mounted here, key `token` (the
# chart's secrets.auth.tokenKey default), and the client reads it by path.
TOKEN_DIR = "/var/run/ttt/token"
TOKEN_FILE = f"{TOKEN_DIR}/token"
# At most this many shard and rank pods at once: a 30-shard run must not ask for 30 GPUs.
PARALLELISM = 8
GPU = "nvidia.com/gpu"
# Pod labels: the chart's NetworkPolicy admits index clients by the first; the chart's
# PodMonitor for the KFP namespace scrapes pods by the second (docs/metrics.md).
INDEX_CLIENT_LABEL = ("ttt.dev/index-client", "true")
METRICS_LABEL = ("ttt.dev/metrics", "true")
# (cpu, memory) requests per task, and its timeout in seconds: sized for the paper's Pile
# run on a GPU node; the CPU variant asks for less.
SIZES = {
    "corpus": ("1", "4G", 6 * 3600),
    "embed": ("4", "16G", 12 * 3600),
    "index": ("4", "32G", 6 * 3600),
    # deploy-index fails when no index pod progressed for its timeout_s (1800 s per pod, as
    # a rolling update replaces them one at a time); this bounds the whole rollout: 30 shards
    # at up to 24 min each.
    "deploy": ("100m", "256M", 12 * 3600),
    "eval": ("8", "64G", 48 * 3600),
    "report": ("1", "4G", 3600),
}
CPU_SIZES = {
    "corpus": ("500m", "1G", 3600),
    "embed": ("500m", "2G", 3600),
    "index": ("500m", "1G", 3600),
    "deploy": ("100m", "256M", 1800),
    "eval": ("1", "3G", 3600),
    "report": ("250m", "1G", 1800),
}


# Image pull Secrets every pod gets (private registries), chosen when the pipelines are
# compiled (`python -m pipelines.compile --pull-secret NAME` sets this variable): none in the
# committed YAML. The Secrets must exist in the KFP namespace.
PULL_SECRETS = [n for n in os.environ.get("TTT_IMAGE_PULL_SECRETS", "").split(",") if n]


def pulled(task: dsl.PipelineTask) -> dsl.PipelineTask:
    if PULL_SECRETS:
        kubernetes.set_image_pull_secrets(task, list(PULL_SECRETS))
    return task


def with_store(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=STORE_SECRET_KEYS)
    return task


# Models named by store path (s3://..., `ttt models push`) are fetched, verified, into this
# volume by the tasks that load them (embed: the encoder; eval: the LM and the encoder),
# sized as the chart's models.cache: gpt2-large and the RoBERTa-large encoder fit 8Gi.
MODELS_CACHE = "/var/cache/ttt-models"


def with_models_cache(task: dsl.PipelineTask, size: str) -> dsl.PipelineTask:
    kubernetes.empty_dir_mount(task, "models", MODELS_CACHE, size_limit=size)
    return task.set_env_variable("TTT_MODELS_CACHE", MODELS_CACHE)


def on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU).set_accelerator_limit(1)
    # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule (the NVIDIA GPU operator's default).
    kubernetes.add_toleration(task, key=GPU, operator="Exists", effect="NoSchedule")
    return task


def threads(cpu: str) -> str:
    """Whole cores of a CPU quantity ("500m" -> 1, "8" -> 8), at least one."""
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return str(max(1, math.ceil(cores)))


def sized(task: dsl.PipelineTask, kind: str, sizes: dict) -> dsl.PipelineTask:
    cpu, memory, timeout = sizes[kind]
    task.set_cpu_request(cpu).set_memory_request(memory)
    # torch's and FAISS's OpenMP threads: the cores requested, not one per node core (two
    # eval pods of the demo's rehearsal on 2 cores, a thread per core each, were on course for
    # 50 min where `ttt run` took 18).
    task.set_env_variable("OMP_NUM_THREADS", threads(cpu))
    # Every stage skips what its manifest in the store says is done: the store is the cache.
    # KFP's cache would replay an old output (a stale deployment, a report of results that
    # were since removed) without running the stage.
    task.set_caching_options(False)
    kubernetes.set_timeout(task, timeout)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "ttt")
    kubernetes.add_pod_label(task, "app.kubernetes.io/component", kind)
    return pulled(task)


def observed(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A task whose metrics server Prometheus scrapes (spec.metrics.port on the pod IP)."""
    kubernetes.add_pod_label(task, *METRICS_LABEL)
    return task.set_env_variable("TTT_METRICS_ADDR", "0.0.0.0")


def build_full(accelerators: bool = True):
    """The full pipeline; `accelerators=False` is the CPU variant (kind CI: no GPU asked)."""
    gpu = on_gpu if accelerators else (lambda task: task)
    sizes = SIZES if accelerators else CPU_SIZES
    name = "ttt-nn-full" if accelerators else "ttt-nn-full-cpu"
    models = "8Gi" if accelerators else "1Gi"

    @dsl.pipeline(name=name, description="TTT-NN at Pile scale: sharded index, ranks.")
    def full(
        spec: str,
        store_secret: str = "ttt-store",
        auth_secret: str = "ttt-auth",
        namespace: str = "ttt",
        index_statefulset: str = "ttt-index",
        index_service: str = "ttt-index.ttt-index.ttt.svc.cluster.local:8080",
    ) -> None:
        """`spec` is the TTTRun YAML text or an s3:// URI of it. `index_service` is the chart's
        headless Service, namespace-qualified ('<statefulset>.<service>.<namespace>.svc...'):
        the eval pods run in the KFP namespace, where the short name does not resolve."""
        plan = sized(with_store(corpus_shard(spec=spec), store_secret), "corpus", sizes)
        with dsl.ParallelFor(plan.outputs["shards"], name="shards", parallelism=PARALLELISM) as s:
            embed = gpu(
                observed(
                    sized(with_store(shard_embed(spec=spec, shard=s), store_secret), "embed", sizes)
                )
            )
            with_models_cache(embed, models)
            # A flat index is built by adding vectors, which a CPU does at memory speed: no GPU.
            index = sized(
                with_store(
                    index_build(spec=spec, shard=s, embeddings=embed.outputs["manifest"]),
                    store_secret,
                ),
                "index",
                sizes,
            )
            for task in (embed, index):
                task.set_retry(num_retries=3, backoff_duration="60s")  # both resume
        # deploy-index reads the index manifests from the store: it needs the keys too.
        deploy = sized(
            with_store(
                deploy_index(
                    spec=spec,
                    indexes=dsl.Collected(index.outputs["manifest"]),
                    namespace=namespace,
                    statefulset=index_statefulset,
                ),
                store_secret,
            ),
            "deploy",
            sizes,
        )
        # Idempotent: a retry restarts nothing already restarted and waits again.
        deploy.set_retry(num_retries=2, backoff_duration="60s")
        with dsl.ParallelFor(plan.outputs["ranks"], name="ranks", parallelism=PARALLELISM) as r:
            evaluate = ttt_eval(
                spec=spec,
                rank=r,
                world_size=plan.outputs["world_size"],
                index_service=index_service,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,  # ties the MLflow runs to this one
            )
            evaluate = gpu(observed(sized(with_store(evaluate, store_secret), "eval", sizes)))
            with_models_cache(evaluate, models)
            kubernetes.use_secret_as_volume(evaluate, secret_name=auth_secret, mount_path=TOKEN_DIR)
            evaluate.set_env_variable("TTT_AUTH_TOKEN_FILE", TOKEN_FILE)
            kubernetes.add_pod_label(evaluate, *INDEX_CLIENT_LABEL)
            evaluate.set_retry(num_retries=3, backoff_duration="60s")  # resumes per document
            evaluate.after(deploy)
        summary = sized(
            with_store(report(spec=spec, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), store_secret),
            "report",
            sizes,
        )
        summary.after(evaluate)

    return full


full = build_full(accelerators=True)
full_cpu = build_full(accelerators=False)
