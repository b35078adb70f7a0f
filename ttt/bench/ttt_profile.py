"""`ttt bench ttt --profile`: per member-step and per path, what a GPU will pay, counted on a CPU.

For the sequential loop (ttt/train.py) and the engine's loop and vmap paths on the same model
and chunks: operators dispatched (a kernel-launch proxy), bytes allocated and bytes of
parameter-shaped traffic per parameter, host syncs, and whether attention ran as one fused
call for all members; then the bytes per parameter one eval worker holds (item 10 of
issue 21): every tensor the engine keeps, each storage counted once, the resident peak, and
an eval worker's own peak, measured in a fresh process (ttt.bench.worker_memory).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.profile import StepCounts, count_steps
from ttt.train import TTTNN

# fused attention kernels (forward), by device
FUSED = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def attention_kind(counts: StepCounts, layers: int, members: int) -> str:
    """How attention ran in one step: one fused call per layer for all members, one per
    member, or unfused (T x T scores written and read back: eager attention, or SDPA's math
    fallback, which a CPU takes for attention dropout)."""
    fused = sum(counts.by_operator[name] for name in FUSED)
    if fused == 0:
        return "unfused"
    if fused <= layers:
        return "fused, all members in one call"
    return f"fused, one call per member ({fused // max(1, layers)} per layer)"


def step_figures(steps: list[StepCounts], members: int, params: int, layers: int) -> dict:
    """The figures of the last counted step (the first warms caches), per member-step."""
    if not steps:
        raise ValueError("no training step ran: give the documents neighbors")
    last = steps[-1]
    return {
        "operators": round(last.operators / members, 1),
        "kernels": round(last.kernels / members, 1),
        "bytes_allocated_per_param": round(last.bytes_allocated / members / params, 2),
        "param_traffic_bytes_per_param": round(last.param_traffic / members / params, 2),
        "host_syncs": round(last.host_syncs / members, 2),
        "attention": attention_kind(last, layers, members),
    }


def held_bytes(engine: Any) -> dict[str, int]:
    """Bytes of every tensor the engine keeps, by what it is; a storage shared by two
    names (a view) is counted once, under the first."""
    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(name: str, tensors: Any) -> None:
        for t in tensors:
            if t is None:
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out[name] = out.get(name, 0) + t.untyped_storage().nbytes()

    ttt = engine.ref if isinstance(engine, EnsembleTTT) else engine
    add("model parameters", ttt.model.parameters())
    add("model buffers", ttt.model.buffers())
    add("saved weights", ttt._saved.values())
    add("gradients", (p.grad for p in ttt.model.parameters()))
    for state in ttt.optimizer.state.values():
        add("optimizer moments", [v for v in state.values() if isinstance(v, torch.Tensor)])
    if isinstance(engine, EnsembleTTT):
        add("saved weights", [engine.base])
        add("member weights", [engine.weights])
        add("optimizer moments", [engine.adam.exp_avg, engine.adam.exp_avg_sq])
    return out


def resident_peak_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def profile_paths(
    lm: Any,
    tokenizer: Any,
    spec: Any,
    texts: list,
    members: int,
    seed: int = 0,
    *,
    saved_model: bool = True,
) -> dict[str, Any]:
    """Each path on the same documents (their first neighbor chunks, two steps each), then
    an eval worker's memory where the model is a saved one (`saved_model`)."""
    params = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    layers = int(getattr(lm.config, "num_hidden_layers", 0) or getattr(lm.config, "n_layer", 1))
    shapes = [tuple(p.shape) for p in lm.parameters() if p.requires_grad] + [(params,)]
    docs = [(i, text, nbrs[:2], None) for i, (text, nbrs) in enumerate(texts[:members])]
    figures: dict[str, Any] = {"parameters": params, "layers": layers}
    loop = TTTNN(lm, tokenizer, spec.model_copy(update={"dtype": "float32"}), seed=seed)
    steps, held = count_steps(loop, shapes), _held_after_steps(loop)
    for _, text, nbrs, _ in docs[:1]:
        loop.evaluate(text, nbrs)
    figures["sequential"] = step_figures(steps, 1, params, layers)
    figures["sequential_held_bytes_per_param"] = _per_param(held[-1], params)
    del loop, steps
    for path in ("loop", "vmap", "stacked"):
        engine = EnsembleTTT(lm, tokenizer, spec, members=members, seed=seed, path=path)
        steps, held = count_steps(engine, shapes), _held_after_steps(engine)
        list(engine.evaluate_stream(docs))
        figures[f"engine_{path}"] = step_figures(steps, engine.members, params, layers)
        figures[f"engine_{path}_held_bytes_per_param"] = _per_param(held[-1], params)
        del engine, steps
    figures["resident_peak_bytes_per_param"] = round(resident_peak_bytes() / params, 1)
    figures["eval_worker"] = eval_worker(spec.model, spec.max_length, saved_model)
    return figures


def eval_worker(model: str, max_length: int, saved_model: bool = True) -> dict[str, Any] | str:
    """An eval worker's fixed overhead and peak bytes per parameter above it, against the
    target; this process's peak cannot say it (it held the engines one after another).
    `saved_model` false: the bench built the model from a config, which a worker cannot."""
    from ttt.bench.worker_memory import eval_worker_figures

    if not saved_model:  # built from a config here: a worker would load it from the hub
        return f"not measured: {model} is built from its config, a worker loads a saved model"
    return eval_worker_figures(model, max_length)


def _held_after_steps(engine: Any) -> list[dict[str, int]]:
    """held_bytes(engine) just after each training step (its optimizer state is alive)."""
    name = "train_step" if isinstance(engine, EnsembleTTT) else "_step"
    inner = getattr(engine, name)
    held: list[dict[str, int]] = []

    def step(*args: Any) -> Any:
        out = inner(*args)
        held.append(held_bytes(engine))
        return out

    setattr(engine, name, step)
    return held


def _per_param(held: dict[str, int], params: int) -> dict[str, float]:
    out = {name: round(n / params, 2) for name, n in held.items()}
    out["total"] = round(sum(held.values()) / params, 2)
    return out
