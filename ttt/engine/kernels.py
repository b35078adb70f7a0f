"""One-kernel equivalents of a model's multi-kernel pieces, swapped in while the engine trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class _GeluTanh(torch.nn.Module):
    """GPT-2's gelu_new, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch's one
    `gelu(approximate="tanh")` kernel (the same formula; gelu_new's eager form is 8 kernels
    forward and more backward, each a pass over the MLP's 4x-wide activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


@contextlib.contextmanager
def fused_activations(model: Any) -> Iterator[int]:
    """Every NewGELUActivation module of `model` replaced by the one-kernel form while the
    block runs (yields how many), the model's own back afterwards (scoring keeps them)."""
    from transformers.activations import NewGELUActivation

    swapped: list[tuple[Any, str, Any]] = []
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                swapped.append((module, name, child))
    for module, name, _ in swapped:
        setattr(module, name, _GeluTanh())
    try:
        yield len(swapped)
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)
