"""How an ensemble is shaped: how many documents train at once, and how: stacked, vmap or loop."""

from __future__ import annotations

from typing import Any

import torch

from ttt.engine.paths import planned_members
from ttt.engine.stacked import unsupported


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training mode draws random numbers (a Dropout module or attention dropout)."""
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "attn_pdrop"):
        if float(getattr(config, attr, 0.0) or 0.0) > 0:
            return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


PATHS = ("loop", "vmap", "stacked")


def choose_path(model: torch.nn.Module, members: int = 2, autocast: Any = None) -> str:
    """How the members step: 'stacked', 'vmap' or 'loop'.

    The stacked forward (ttt.engine.stacked: every operator once for all members, attention
    one fused call) where the architecture has one, for one member too (it holds no
    per-parameter copies that functorch's grad keeps: 30 bytes per parameter at its peak
    where the loop path reaches 47, docs/performance.md); else vmap(grad(functional_call))
    for several members and the loop path for one. With dropout, exact masks need the
    sequential loop's one RNG stream per document, which only the loop path replays; under
    autocast (bf16 on a GPU) the results are not the float32 loop's to the digit anyway, so
    there the members are batched with independent masks (equal within 0.01 bpb, tested).
    """
    if unsupported(model) is None:
        batched = "stacked"
    else:
        batched = "loop" if members == 1 else "vmap"
    if has_dropout(model) and autocast is None:
        return "loop"
    return batched


def choose_members(model: torch.nn.Module, ttt_spec: Any, device: torch.device) -> int:
    """How many documents train at once: `spec.ttt.ensembleSize`, else from free memory.

    On a GPU E fills 70 % of the free memory at member_bytes each (at most 64); on a CPU it
    is 1 unless set (see docs/performance.md). An estimate that is still too high is met
    by the engine: out of memory, it halves the members per batched call and retries.
    """
    planned = planned_members(ttt_spec, device.type)
    if planned is not None:
        return int(planned)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(64, int(0.7 * free // member_bytes(model, int(ttt_spec.max_length)))))


def member_bytes(model: torch.nn.Module, tokens: int) -> int:
    """What one member holds on the device while it steps on a chunk of `tokens`:

    - its weights, gradient and two Adam moments in float32, and temporaries: 24 bytes per
      parameter;
    - activations kept for the backward: about 40 values per hidden unit per layer and token
      (bf16 copies, float32 norms, the MLP's 4x width);
    - the logits and their copies: bf16 logits, the float32 ones cross-entropy reads, its
      saved log-softmax and the logits' gradient in float32 and bf16 (16 bytes per vocabulary
      entry per token);
    - attention scores where attention may run unfused (the vmap path's eager fallback, for
      a model without a stacked forward): scores, their softmax and its gradient in float32
      per head (12 bytes per head per token pair per layer); fused attention keeps none.
    """
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    layers = int(getattr(config, "num_hidden_layers", 12))
    hidden = int(getattr(config, "hidden_size", 768))
    heads = int(getattr(config, "num_attention_heads", 12))
    vocab = int(getattr(config, "vocab_size", 50257))
    activations = tokens * (layers * hidden * 40 + vocab * 16)
    if unsupported(model) is not None:
        activations += layers * heads * tokens * tokens * 12
    return 24 * params + activations


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
