"""The path a spec's ensemble takes (stacked, vmap or loop), read from the model's config without loading it."""

from __future__ import annotations

from typing import Any

# Models whose dropout is known without loading them: the offline SmolLM2's GGUF config has
# attention_dropout 0.0 (read with transformers' AutoConfig); GPT-2's released configs train
# with dropout 0.1 (attn_pdrop, resid_pdrop, embd_pdrop).
KNOWN_DROPOUT = {
    "smollm2-135m": False,
    "gpt2": True,
    "gpt2-medium": True,
    "gpt2-large": True,
    "gpt2-xl": True,
}
# their architectures (model_type): both have a stacked forward (ttt.engine.stacked)
KNOWN_TYPE = {"smollm2-135m": "llama"} | {name: "gpt2" for name in KNOWN_DROPOUT if "gpt2" in name}
STACKED_TYPES = ("gpt2", "llama")


def config_dropout(model: str) -> bool | None:
    """Whether `model` trains with dropout, from KNOWN_DROPOUT or a config already on this
    machine (nothing is downloaded); None when neither says."""
    return config_facts(model)[0]


def config_facts(model: str) -> tuple[bool | None, str | None]:
    """(whether `model` trains with dropout, its model_type), from the tables above or a
    config already on this machine; None where neither says."""
    if model in KNOWN_DROPOUT:
        return KNOWN_DROPOUT[model], KNOWN_TYPE[model]
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError):  # not here, or a model type transformers lacks
        return None, None
    # GPT-2's summary_first_dropout belongs to a classification head (SequenceSummary),
    # never built for the language model: has_dropout, on the loaded model, does not see it
    rates = [
        v
        for k, v in config.to_dict().items()
        if ("dropout" in k or "pdrop" in k)
        and not k.startswith("summary_")
        and isinstance(v, int | float)
    ]
    return any(float(v) > 0 for v in rates), getattr(config, "model_type", None)


def planned_members(ttt_spec: Any, device: str) -> int | None:
    """How many members the engine runs on device type `device`, as
    ttt.engine.members.choose_members decides it: ensembleSize, else None on a GPU (from
    free memory, several), else 1."""
    return getattr(ttt_spec, "ensemble_size", None) or (None if device == "cuda" else 1)


def predict_path(ttt_spec: Any, device: str, size: int | None) -> tuple[str, str]:
    """(path, why) the ensemble takes for `spec.ttt` on device type `device` with `size`
    members (None: from free memory, several), as ttt.engine.members.choose_path decides it
    once the model is loaded; a path not known without the config reads "X or Y"."""
    dropout, kind = config_facts(ttt_spec.model)
    # as ttt.engine.precision resolves it: bf16 autocast on a GPU unless float32 is asked
    autocast = ttt_spec.dtype == "bfloat16" or (ttt_spec.dtype == "auto" and device == "cuda")
    if kind is None:
        batched = "stacked or vmap"
    else:
        batched = "stacked" if kind in STACKED_TYPES else "vmap"
    if batched == "stacked":
        how = "all members in one batched forward, attention one fused call"
    elif batched == "vmap":
        how = f"all members in one vmap call (no stacked forward for {kind})"
    else:
        how = "all members batched (stacked for gpt2 and llama, else vmap)"
    if size == 1 and (dropout and not autocast or batched == "vmap"):
        return "loop", "one member: " + ("its own dropout masks" if dropout else "nothing to batch")
    if size == 1:
        path = "stacked" if batched == "stacked" else "stacked or loop"
        return path, "one member: the stacked forward, which keeps no per-parameter copies"
    if dropout and not autocast:
        return "loop", "the model has dropout: each member replays its own masks"
    if dropout:
        return batched, f"{how}; dropout masks drawn per member (bf16 autocast: within 0.01 bpb)"
    if dropout is None:
        return f"{batched} or loop", f"{how}, unless the model has dropout; no config here"
    return batched, f"no dropout: {how}"
