"""Models in the store: `push_model` (a Hugging Face directory or GGUF file, with a manifest of hashes and identity) and `local_model` (a spec's model field -> a verified local copy, no network)."""

from ttt.models.cache import CACHE_ENV, cache_root, fetch_model, local_model
from ttt.models.manifest import (
    ModelError,
    ModelPath,
    check_model_manifest,
    describe_identity,
    identity,
    is_store_path,
    parse_model_path,
)
from ttt.models.push import push_model

__all__ = [
    "CACHE_ENV",
    "ModelError",
    "ModelPath",
    "cache_root",
    "check_model_manifest",
    "describe_identity",
    "fetch_model",
    "identity",
    "is_store_path",
    "local_model",
    "parse_model_path",
    "push_model",
]
