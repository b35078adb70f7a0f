"""Which attention the engine's training forward runs: causal SDPA with no mask built, or eager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# A name in transformers' attention registry and not in its mask registry: transformers then
# builds no mask at all (masking_utils: "custom attention without equivalent mask creation"),
# and SDPA runs is_causal. Exact for the engine's chunks: unpadded (loop path) or right-padded
# (vmap path, where causal attention keeps every real token's result). With use_cache=False
# no DynamicCache is built either: the forward makes no tensor from host values.
CAUSAL = "ttt_causal_sdpa"


def _causal_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kw)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL, _causal_sdpa)


@contextlib.contextmanager
def training_attention(model: Any, eager: bool) -> Iterator[None]:
    """The model's attention while the engine trains: eager where asked (vmap on a kernel
    without a batching rule), else causal SDPA without a mask where the model runs SDPA;
    the model's own implementation is back afterwards (scoring keeps it)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if eager and before not in (None, "eager"):
        swap = "eager"
    elif before == "sdpa":
        _register()
        swap = CAUSAL
    else:
        swap = None
    if swap is not None:
        config._attn_implementation = swap
    try:
        yield
    finally:
        if swap is not None:
            config._attn_implementation = before
