"""ttt-eval: one rank of the evaluation: retrieve, train on neighbors, score, reset (GPU)."""

from kfp import dsl

from components import EVAL_IMAGE, exec_python


@exec_python
@dsl.component(base_image=EVAL_IMAGE, install_kfp_package=False)
def ttt_eval(
    spec: str,
    rank: int,
    world_size: int,
    results: dsl.Output[dsl.Artifact],
    index_service: str = "",
    kfp_run_id: str = "",
) -> None:
    """Evaluate rank `rank` of `world_size` (a retried pod resumes). `index_service` (the chart's
    headless Service, namespace-qualified) overrides spec.retrieval.service, as
    TTT_RETRIEVAL__SERVICE would; `kfp_run_id` (the pipeline's run) ties the MLflow runs."""
    import json
    import os

    from ttt.eval import evaluate_rank, prepare_worker_process
    from ttt.spec import resolve_spec
    from ttt.store import open_store

    service = {"TTT_RETRIEVAL__SERVICE": index_service} if index_service else {}
    run = resolve_spec(spec, {**os.environ, **service})
    store, kfp = open_store(run.spec.storage), kfp_run_id or None
    prepare_worker_process(run)  # the pod is the worker (ttt.engine.hostmem)
    result = evaluate_rank(run, store, rank, world_size, kfp_run_id=kfp)
    with open(results.path, "w") as f:
        json.dump(result, f)
