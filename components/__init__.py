"""Kubeflow Pipelines components: one thin typed wrapper per stage of the ttt library."""

# Images built from images/ (see images/README.md); the tag follows the package version.
REGISTRY = "ghcr.io/ttt-nn"
VERSION = "0.1.0"
BASE_IMAGE = f"{REGISTRY}/ttt-base:{VERSION}"
EMBED_IMAGE = f"{REGISTRY}/ttt-embed:{VERSION}"
INDEX_IMAGE = f"{REGISTRY}/ttt-index:{VERSION}"
EVAL_IMAGE = f"{REGISTRY}/ttt-eval:{VERSION}"
