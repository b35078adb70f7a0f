"""Kubeflow Pipelines components: one thin typed wrapper per stage of the ttt library."""

import os

# Images built from images/ (see images/README.md). The registry and the tag are chosen when
# the pipelines are compiled (`python -m pipelines.compile --registry R --tag T` sets these
# variables): no registry is assumed, and the committed YAML names bare `ttt-<stage>:<tag>`.
REGISTRY = os.environ.get("TTT_IMAGE_REGISTRY", "").rstrip("/")
VERSION = "0.1.0"
TAG = os.environ.get("TTT_IMAGE_TAG", VERSION)


def image(stage: str) -> str:
    return f"{REGISTRY}/ttt-{stage}:{TAG}" if REGISTRY else f"ttt-{stage}:{TAG}"


BASE_IMAGE = image("base")
CPU_IMAGE = image("cpu")  # corpus-shard, deploy-index, report: no CUDA
EMBED_IMAGE = image("embed")
INDEX_IMAGE = image("index")
EVAL_IMAGE = image("eval")


def exec_python(component):
    """Make the component's shell `exec` Python, so SIGTERM (a pod's eviction) reaches the
    Python process and its drain handler instead of stopping at `sh`."""
    container = component.component_spec.implementation.container
    script = container.command[2]
    marker = "_KFP_RUNTIME=true python3"
    if marker not in script:
        raise RuntimeError(f"{component.name}: kfp's launch script changed; update exec_python")
    container.command[2] = script.replace(marker, "_KFP_RUNTIME=true exec python3")
    return component
