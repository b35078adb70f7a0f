"""corpus-shard: split the training corpus into the run's shards (text stores in the store)."""

from typing import NamedTuple

from kfp import dsl

from components import CPU_IMAGE, exec_python


# List[int] (not list): the loop items then compile as NUMBER_INTEGER, what `shard` and `rank` take.
@exec_python
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def corpus_shard(spec: str, manifest: dsl.Output[dsl.Artifact]) -> NamedTuple(
    "Plan", shards=list[int], ranks=list[int], world_size=int
):
    """Publish every shard's text store; returns the shard and rank lists to fan out over."""
    import json
    from collections import namedtuple

    from ttt.spec import resolve_spec
    from ttt.stages import publish_corpus
    from ttt.store import open_store

    run = resolve_spec(spec)
    manifests = publish_corpus(run, open_store(run.spec.storage), progress=False)
    with open(manifest.path, "w") as f:
        json.dump(manifests, f)
    plan = namedtuple("Plan", ["shards", "ranks", "world_size"])
    world = run.spec.eval.workers
    return plan(list(range(run.spec.corpus.shards)), list(range(world)), world)
