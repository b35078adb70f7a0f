"""shard-embed: one corpus shard to embeddings (float32, or float16 by spec; GPU)."""

from kfp import dsl

from components import EMBED_IMAGE, exec_python


@exec_python
@dsl.component(base_image=EMBED_IMAGE, install_kfp_package=False)
def shard_embed(spec: str, shard: int, manifest: dsl.Output[dsl.Artifact]) -> None:
    """Embed every document of `shard`; resumable part by part. Exports its metrics on
    spec.metrics.port while it runs, as `ttt embed` does (the chart's PodMonitor scrapes it)."""
    import json

    from ttt.embed import embed_shard
    from ttt.spec import resolve_spec
    from ttt.store import open_store
    from ttt.telemetry import start_metrics_server

    run = resolve_spec(spec)
    if run.spec.metrics.enabled:
        start_metrics_server(run.spec.metrics.port, run=run.name)
    result = embed_shard(run, open_store(run.spec.storage), shard, progress=False)
    with open(manifest.path, "w") as f:
        json.dump(result, f)
