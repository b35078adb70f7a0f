"""spec.ttt.compile: the stacked step and Adam(W) as kernels torch.compile generates, at one shape.

The stacked forward and backward are compiled once per chunk shape (the engine pads every
chunk to maxLength, so a worker compiles one shape, plus one per wave size after an
out-of-memory halving): on a GPU inductor fuses the elementwise work between the matmuls
and attention into Triton kernels. Under autocast, Adam(W) also writes the bf16 copy of the
weights the forward reads, in the same pass over each parameter (`adam_member`), so no
forward casts a float32 weight again: the weights that only feed matmuls (`shadowed`) are
trained through that copy, and their gradients come back in bf16, as autocast computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ttt.engine.stacked import stacked_losses


def shadowed(model: torch.nn.Module) -> list[bool]:
    """Per trainable parameter (named_parameters' order): whether autocast only ever casts
    it for a matmul (the weights and biases of Linear and GPT-2's Conv1D layers, a head
    apart), so that a bf16 copy can stand in for it. A tied table (the lookup reads it in
    float32 too), norms and position tables stay float32."""
    from transformers.pytorch_utils import Conv1D

    owners: dict[int, int] = {}  # a parameter's id -> how many modules hold it
    matmul: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                matmul.add(id(p))
    return [id(p) in matmul and owners[id(p)] == 1 for p in model.parameters() if p.requires_grad]


def adam_member(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    copies: list[torch.Tensor | None],
    step: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """One member's Adam(W) step, in place, as torch's fused kernel computes it (gradient
    divided by `scale`, clip_scales'; L2 or decoupled decay; bias corrections from the
    device's `step`), each gradient read in its own dtype (bf16 for a copied weight), and
    the updated weight written to its bf16 copy where it has one. Compiled (`compiled_adam`)
    this is one pass per parameter; eager it is a reference."""
    correction1 = 1 - beta1**step
    root2 = (1 - beta2**step).sqrt()
    for w, g, m, v, copy in zip(weights, grads, exp_avg, exp_avg_sq, copies, strict=True):
        g = g.float()
        if scale is not None:
            g = g / scale
        if weight_decay:
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w.sub_((lr / correction1) * m / (v.sqrt() / root2 + eps))
        if copy is not None:
            copy.copy_(w)


def compiled_adam() -> Callable[..., None]:
    """adam_member compiled: one generated kernel per parameter reads the weight, gradient
    and moments and writes them and the bf16 copy (torch's fused kernel and a cast after it
    read the weight twice). Specialized to the shapes: compiled once per worker."""
    return torch.compile(adam_member, dynamic=False, fullgraph=True)


def compiled_losses() -> Callable[..., torch.Tensor]:
    """stacked_losses compiled at fixed shapes (one graph: the tied table's gradient is
    summed by autograd, not handed over; call it with handoff=False). Dropout masks come
    from the generated kernels' own generator: independent per member, not eager's."""
    return torch.compile(stacked_losses, dynamic=False)


def compiled_adam_options(model: torch.nn.Module, compile: bool, autocast: Any) -> dict:
    """StackedAdam's copies and fused step when compiling under autocast, else none."""
    if not compile or autocast is None:
        return {}
    return {"copies": shadowed(model), "fused": compiled_adam()}


def train_views(adam: Any, stacked: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the training forward reads per parameter: Adam's bf16 copy where it keeps one,
    else the members' float32 rows."""
    if adam.copy is None:
        return list(stacked)
    return [c if c is not None else s for c, s in zip(adam.stacked_copies(), stacked, strict=True)]
