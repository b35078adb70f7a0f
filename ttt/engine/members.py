"""How an ensemble is shaped: how many documents train at once, batched (vmap) or in turn (loop)."""

from __future__ import annotations

from typing import Any

import torch


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training mode draws random numbers (a Dropout module or attention dropout)."""
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "attn_pdrop"):
        if float(getattr(config, attr, 0.0) or 0.0) > 0:
            return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def choose_path(model: torch.nn.Module, members: int = 2) -> str:
    """'vmap' when every member can step in one batched call with results equal to the loop's.

    Dropout makes the sequential loop's masks a function of one RNG stream per document,
    which only the loop path reproduces (it swaps each member's RNG state in and out), so a
    model with dropout takes the loop path. On CPU the vmap path runs eager attention, as
    PyTorch has no batching rule for CPU SDPA's backward; elsewhere it keeps the model's own
    unless the first step shows a batching-rule fallback. One member takes the loop path:
    nothing to batch, and it keeps the model's own attention kernel.
    """
    return "loop" if members == 1 or has_dropout(model) else "vmap"


def choose_members(model: torch.nn.Module, ttt_spec: Any, device: torch.device) -> int:
    """How many documents train at once: `spec.ttt.ensembleSize`, else from free memory.

    A member costs its float32 weights, gradient, two Adam moments and temporaries (about
    24 bytes per parameter) plus the activations of one chunk; on a GPU E fills 70 % of the
    free memory (at most 64); on a CPU it is 1 unless set (see docs/performance.md).
    """
    requested = getattr(ttt_spec, "ensemble_size", None)
    if requested:
        return int(requested)
    if device.type != "cuda":
        return 1
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    layers = int(getattr(config, "num_hidden_layers", 12))
    hidden = int(getattr(config, "hidden_size", 768))
    vocab = int(getattr(config, "vocab_size", 50257))
    activations = int(ttt_spec.max_length) * (layers * hidden * 40 + vocab * 12)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(64, int(0.7 * free // (24 * params + activations))))


def rng_state(device: torch.device) -> list[torch.Tensor]:
    """The RNG states a loop-path member swaps in and out (dropout masks as the loop's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)
