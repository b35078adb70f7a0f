"""Mixed precision for test-time training: fp32 master weights, bf16 autocast on the GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ttt.device import pick_device


@dataclass(frozen=True)
class Precision:
    """How the engine computes: weights and Adam's moments always in float32 (the masters).

    `autocast` is the dtype of the forward and backward matmuls (None = plain float32). Pure
    bf16 weights would lose most updates at lr 2e-5 (an update below half a bf16 ulp of the
    weight rounds away), so no spec value ever means bf16 weights here. Scoring follows the
    training's precision (`scoring()`), with the log-softmax always in float32 (ttt.bpb).
    """

    device: torch.device
    autocast: torch.dtype | None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast region of a training step (a no-op in float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """The scoring forward's matmuls: float32 where training is float32; under autocast,
        TF32 on a GPU (a float32 range and a 10-bit mantissa, the matmuls 8x the float32
        rate on an H100) and bf16 autocast elsewhere (a CPU asked for bfloat16). Both stay
        within 0.01 bits per byte of float32 scoring (tests/test_engine_ensemble.py); the
        log-softmax and the sum of log-likelihoods stay float32 and float64."""
        if self.autocast is None:
            yield
        elif self.device.type == "cuda":
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast):
                yield

    @property
    def scoring_name(self) -> str:
        if self.autocast is None:
            return "float32"
        return "tf32" if self.device.type == "cuda" else f"{_short(self.autocast)}-autocast"

    @property
    def name(self) -> str:
        return "float32" if self.autocast is None else f"{_short(self.autocast)}-autocast"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_precision(dtype: str, device: torch.device | str) -> Precision:
    """`spec.ttt.dtype` -> the engine's precision on `device`.

    auto: bf16 autocast on a GPU that supports bf16, float32 elsewhere (CPU bf16 matmuls are
    slower than fp32 on most hosts); bfloat16: bf16 autocast on any device; float32: none.
    float16 needs loss scaling, which the engine does not do: it is refused here (the
    sequential loop still runs it, see ttt.engine.select.choose_engine).
    """
    device = torch.device(device) if isinstance(device, str) else device
    if dtype == "float32":
        return Precision(device, None)
    if dtype == "bfloat16":
        return Precision(device, torch.bfloat16)
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16)
        return Precision(device, None)
    raise ValueError(f"spec.ttt.dtype {dtype!r}: the fast engine runs auto, float32 or bfloat16")


def weight_dtype(dtype: str, engine: str) -> str:
    """The dtype a run's language model is loaded in, given the engine that will train it.

    The fast engines keep float32 masters whatever the spec says. The sequential loop loads
    `auto` as float32 too (it has no autocast, and bf16 weights would lose updates); an
    explicit bfloat16 or float16 there still means weights in that dtype, as before.
    """
    if engine != "sequential" or dtype == "auto":
        return "float32"
    return dtype


def load_for_engine(ttt_spec: Any, engine: str, storage: Any = None) -> tuple[Any, Any]:
    """The run's language model and tokenizer, in the weight dtype that `engine` needs
    (`storage`: the run's store, where a model named s3://bucket/prefix is read)."""
    from ttt.lm import load_lm

    device = str(pick_device(ttt_spec.device))
    dtype = weight_dtype(ttt_spec.dtype, engine)
    return load_lm(ttt_spec.model, dtype=dtype, device=device, storage=storage)
