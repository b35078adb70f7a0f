"""index-build: one shard's embeddings to a FAISS index with its recall report (GPU)."""

from kfp import dsl

from components import INDEX_IMAGE, exec_python


@exec_python
@dsl.component(base_image=INDEX_IMAGE, install_kfp_package=False)
def index_build(
    spec: str, shard: int, embeddings: dsl.Input[dsl.Artifact], manifest: dsl.Output[dsl.Artifact]
) -> None:
    """Build and publish the index of `shard` (after its embeddings, passed as `embeddings`)."""
    import json

    from ttt.index.build import build_shard_index
    from ttt.spec import resolve_spec
    from ttt.store import open_store

    run = resolve_spec(spec)
    result = build_shard_index(run, open_store(run.spec.storage), shard)
    with open(manifest.path, "w") as f:
        json.dump(result, f)
