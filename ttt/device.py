"""Where models run and in which precision: the one place that picks a torch device and dtype."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' = the first CUDA GPU when there is one, else the CPU; otherwise as named."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"device {requested!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for but torch sees no CUDA GPU")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"device {requested!r}: only {count} CUDA GPU(s) visible")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on a GPU that supports it (half the memory, tensor cores), else float32.

    CPUs get float32 under 'auto': their bf16 matmuls are slower than fp32 on most hosts.
    """
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"dtype {requested!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[requested]
