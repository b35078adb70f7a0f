"""Causal language models and their tokenizers: from an HF id, a local directory or a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ttt.device import pick_device, pick_dtype
from ttt.models import local_model

log = logging.getLogger(__name__)

# End-of-text markers: GPT-2's first (preferred), then those tried when there is no eos token.
_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def load_lm(
    model: str, dtype: str = "float32", device: str = "auto", storage: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on `device`, in `dtype`, with its tokenizer.

    `model` is an offline package name (see ttt.assets), an HF id, a local directory, a
    `.gguf` file (dequantized by transformers; needs the gguf and accelerate packages), or a
    pushed model `s3://bucket/prefix` (ttt.models: fetched from the store `storage` names
    into a verified local copy).
    """
    source = local_model(model, storage)
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
    if Path(where).is_dir():
        # a local copy loads with no network at all (HF_HUB_OFFLINE semantics)
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        # transformers' messages run to pages (every known model type); the first line says it
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OSError(f"cannot load causal LM {model!r} from {source}: {reason}") from None
    # cast after loading: GGUF weights are dequantized to float32 anyway, and the keyword for
    # a load-time dtype changed name across transformers releases
    lm.to(device=torch_device, dtype=torch_dtype)
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
    """The end-of-text token that separates documents and conditions the first scoring window.

    `<|endoftext|>` when the vocabulary has it (GPT-2, GPT-Neo, the paper's models, where it is
    the eos token the harness uses; SmolLM2, whose GGUF tokenizer reports the chat marker
    `<|im_start|>` as eos), else the tokenizer's eos token, else another known marker.
    """
    vocab = tokenizer.get_vocab()
    if _EOT_CANDIDATES[0] in vocab:
        return int(vocab[_EOT_CANDIDATES[0]])
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    for token in _EOT_CANDIDATES[1:]:
        if token in vocab:
            return int(vocab[token])
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no eos token and none of {_EOT_CANDIDATES}"
    )
