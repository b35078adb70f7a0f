"""Kubeflow Pipelines components: one thin typed wrapper per stage of the ttt library."""

import json
import os

# Images built from images/ (see images/README.md). The registry and the tag are chosen when
# the pipelines are compiled (`python -m pipelines.compile --registry R --tag T` sets these
# variables): no registry is assumed, and the committed YAML names bare `ttt-<stage>:<tag>`.
REGISTRY = os.environ.get("TTT_IMAGE_REGISTRY", "").rstrip("/")
VERSION = "0.1.0"
TAG = os.environ.get("TTT_IMAGE_TAG", VERSION)
# {stage: "sha256:..."} from the release workflow: an image pinned by digest, not by tag.
DIGESTS = json.loads(os.environ.get("TTT_IMAGE_DIGESTS") or "{}")


def image(stage: str) -> str:
    name = f"{REGISTRY}/ttt-{stage}" if REGISTRY else f"ttt-{stage}"
    return f"{name}@{DIGESTS[stage]}" if stage in DIGESTS else f"{name}:{TAG}"


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
