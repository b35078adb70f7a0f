"""Causal language models and their tokenizers: from an HF id, a local directory or a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ttt.device import pick_device, pick_dtype

log = logging.getLogger(__name__)

# Tried, in order, when a tokenizer names no eos token: GPT-2's and the common chat markers.
_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _resolve(model: str) -> str:
    """A short name of an offline package (e.g. smollm2-135m) -> its path; others unchanged."""
    try:
        from ttt.assets import resolve_model
    except ImportError:  # assets.py not present: names are HF ids or paths
        return model
    return resolve_model(model)


def load_lm(
    model: str, dtype: str = "float32", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on `device`, in `dtype`, with its tokenizer.

    `model` is an offline package name (see ttt.assets), an HF id, a local directory, or a
    `.gguf` file (dequantized by transformers; needs the gguf and accelerate packages).
    """
    source = _resolve(model)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {path} does not exist (model {model!r})")
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kwargs = {}
        where = source
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise OSError(f"cannot load causal LM {model!r} from {source}: {exc}") from None
    lm.to(torch_device)
    lm.eval()
    eot_token_id(tokenizer)  # fail at load time, not in the middle of a run
    log.info(
        "loaded %s: %.1fM parameters, %s on %s",
        model,
        sum(p.numel() for p in lm.parameters()) / 1e6,
        torch_dtype,
        torch_device,
    )
    return lm, tokenizer


def eot_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-text token that conditions the first scoring window (the harness's eot).

    The tokenizer's eos token, as lm-evaluation-harness uses it; failing that, a known
    end-of-text marker in the vocabulary.
    """
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in _EOT_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no eos token and none of {_EOT_CANDIDATES}"
    )
