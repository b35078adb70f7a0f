"""The rule that picks an engine: where the ensemble is proven equal, and where it is faster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ttt.errors import TTTError

# torch's device types a spec may name (torch.device accepts these, with ":N")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hip", "hpu", "mtia", "xla", "meta")

ENGINES = ("auto", "sequential", "ensemble")


class EngineError(TTTError, ValueError):
    """An engine asked for where it would not give the sequential loop's results."""


def ensemble_equal(ttt_spec: Any) -> str | None:
    """None when the ensemble engine gives the sequential loop's results, else why not.

    Equal when every document starts from the saved weights: method ttt-nn (the baselines
    train on the document or not at all). With resetOptimizer true each document starts a
    fresh optimizer; with it false a member is a task, its documents in order with one
    carried Adam(W) (tasks are independent). float16 needs loss scaling, which the engine
    does not do.
    """
    if ttt_spec.method != "ttt-nn":
        return f"method {ttt_spec.method} (the ensemble runs ttt-nn only)"
    if ttt_spec.dtype == "float16":
        return "dtype float16 (the engine has no loss scaling)"
    return None


# The engine `auto` takes on each device type where the ensemble is equal, and the
# measurement behind it. The ensemble stays where it is proven equal (ensemble_equal); it is
# the default only where it is also the faster one. A device type not listed runs the loop.
FASTEST: dict[str, tuple[str, str]] = {
    "cpu": (
        "ensemble",
        (
            "on a CPU the engine with one member is the faster at equal bits per byte: `ttt "
            "bench ttt` on an idle machine (2026-12-07) gave SmolLM2 (stacked path) 715-718 "
            "ms per neighbor against ttt/train.py's 971-973, GPT-2 124M with dropout (loop "
            "path, `--preset gpt2 --device cpu --max-length 128 --members 1`) 668-675 "
            "against 936-959"
        ),
    ),
    "cuda": (
        "ensemble",
        (
            "on a GPU the ensemble trains E documents at once (batched where its path "
            "allows, bf16 autocast unless float32 is asked), with fused AdamW and no host "
            "syncs in a step (not yet timed on a GPU: docs/performance.md)"
        ),
    ),
}
# Where the path the ensemble takes changes the answer (ttt.engine.paths.predict_path): a
# path nobody timed on a device type runs the loop there.
FASTEST_ON_PATH: dict[tuple[str, str], tuple[str, str]] = {
    ("cpu", "vmap"): (
        "sequential",
        (
            "on a CPU the vmap path (several members of an architecture without a stacked "
            "forward) is not timed: it runs eager attention there"
        ),
    ),
}


@dataclass(frozen=True)
class EngineChoice:
    """Which engine trains a run on a device type, and why (`ttt validate` prints it)."""

    engine: str  # "sequential" or "ensemble"
    device: str  # the device type the choice was made for: "cpu", "cuda", ...
    reason: str


def device_type(requested: Any) -> str:
    """The device type of a torch device or a spec's device string ('cuda:1' -> 'cuda');
    'auto' = cuda when torch sees a GPU (the only case that imports torch)."""
    text = str(requested or "auto")
    if text == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()):
        raise EngineError(
            f"spec.ttt.device {text!r} is not a torch device (types: {', '.join(DEVICE_TYPES)})"
        )
    return kind


def explain_engine(ttt_spec: Any, device: Any = None, model: Any = None) -> EngineChoice:
    """The engine `spec.ttt` runs on `device` (default: the spec's own) and the reason.

    sequential: always the loop. ensemble: the ensemble where it is equal, else an error.
    auto: the ensemble where it is equal AND the measured fastest on the device type and the
    path the ensemble would take there (FASTEST_ON_PATH, else FASTEST), else the loop. The
    path is read from the loaded `model` when given, else from the model's config.
    """
    requested = getattr(ttt_spec, "engine", "auto")
    if requested not in ENGINES:
        raise EngineError(f"spec.ttt.engine {requested!r}: expected one of {', '.join(ENGINES)}")
    kind = device_type(device if device is not None else getattr(ttt_spec, "device", "auto"))
    choice = _explain(ttt_spec, requested, kind, model)
    if getattr(ttt_spec, "compile", False):  # compiling is asked for: refused, never dropped
        if choice.engine == "sequential":
            raise EngineError(
                f"spec.ttt.compile: the ensemble's stacked path compiles, this spec runs the "
                f"sequential loop on {kind} ({choice.reason})"
            )
        path = ensemble_path(ttt_spec, kind, model)
        why = compile_refused(path, bool(getattr(ttt_spec, "recompute", False)))
        if why is not None:
            raise EngineError(f"spec.ttt.compile on {kind}: {why}")
        return EngineChoice(choice.engine, kind, f"{choice.reason}; compiled (spec.ttt.compile)")
    return choice


def compile_refused(path: str, recompute: bool) -> str | None:
    """Why spec.ttt.compile cannot run here, or None."""
    if path != "stacked":
        return f"the ensemble compiles its stacked path only, this model takes the {path} path"
    if recompute:
        return "compile and recompute together are not supported (choose one)"
    return None


def _explain(ttt_spec: Any, requested: str, kind: str, model: Any) -> EngineChoice:
    if requested == "sequential":
        return EngineChoice("sequential", kind, "spec.ttt.engine sequential")
    why_not = ensemble_equal(ttt_spec)
    if requested == "ensemble":
        if why_not is not None:
            raise EngineError(
                f"spec.ttt.engine ensemble is not equal to the sequential loop: {why_not}"
            )
        return EngineChoice("ensemble", kind, "spec.ttt.engine ensemble")
    if why_not is not None:
        return EngineChoice("sequential", kind, f"the ensemble is not equal here: {why_not}")
    recompute = getattr(ttt_spec, "recompute", False)
    path = None  # read (a config from disk, maybe) only where the answer depends on it
    if recompute or any(k == kind for k, _ in FASTEST_ON_PATH):
        path = ensemble_path(ttt_spec, kind, model)
    if recompute and path != "stacked":  # the ensemble recomputes on the stacked path only
        return EngineChoice(
            "sequential", kind, f"spec.ttt.recompute: the ensemble's path here is {path}"
        )
    on_path = FASTEST_ON_PATH.get((kind, path)) if path is not None else None
    if on_path is not None:
        return EngineChoice(on_path[0], kind, on_path[1])
    engine, reason = FASTEST.get(
        kind, ("sequential", f"the ensemble is not measured on device type {kind!r}")
    )
    return EngineChoice(engine, kind, reason)


def ensemble_path(ttt_spec: Any, kind: str, model: Any = None) -> str:
    """The path the ensemble would take on device type `kind`: from the loaded `model` as
    the engine decides it, else predicted from the model's config (ttt.engine.paths)."""
    from ttt.engine.paths import planned_members, predict_path

    size = planned_members(ttt_spec, kind)
    if model is None:
        return predict_path(ttt_spec, kind, size)[0]
    from ttt.engine.members import choose_path
    from ttt.engine.precision import resolve_precision

    autocast = resolve_precision(ttt_spec.dtype, next(model.parameters()).device).autocast
    return choose_path(model, size or 2, autocast)


def choose_engine(ttt_spec: Any, device: Any = None, model: Any = None) -> str:
    """'sequential' or 'ensemble' for `spec.ttt` on `device`: see explain_engine."""
    return explain_engine(ttt_spec, device, model).engine
