"""One eval worker's host memory, measured in a fresh process: fixed overhead, then bytes per parameter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

# Issue 21, item 10: a worker's peak above its fixed overhead, per parameter (one of each:
# weights, saved weights, gradient, Adam's two moments, and the engine's master copy)
TARGET_BYTES_PER_PARAM = 24


def vm_bytes(key: str) -> int:
    """A /proc/self/status figure in bytes: VmRSS (resident now) or VmHWM (resident peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} (not Linux?)")


def worker_memory(
    model_name: str,
    max_length: int,
    engine: str = "sequential",
    *,
    neighbors: int = 2,
    doc_tokens: int | None = None,
    recompute: bool = False,
    timeout: float = 3600,
) -> dict[str, Any]:
    """What one CPU eval worker of `model_name` holds, measured in a fresh subprocess.

    The child imports what a worker imports (its resident size then is the fixed overhead),
    loads the model as load_for_engine does, builds `engine` (sequential, or ensemble with
    one member) as build_engine does, and evaluates one document of `doc_tokens` tokens
    (default 4 chunks, so scoring batches several windows) with `neighbors` neighbors of one
    chunk each: at least two training steps, so a step runs with Adam's moments alive.
    `recompute`: spec.ttt.recompute (layers run again in the backward).
    A fresh process, because a resident peak never comes down: the caller's would count
    whatever it held before.
    """
    args = {
        "model": model_name,
        "max_length": max_length,
        "engine": engine,
        "neighbors": neighbors,
        "doc_tokens": doc_tokens or 4 * max_length,
        "recompute": recompute,
    }
    done = subprocess.run(
        [sys.executable, "-m", "ttt.bench.worker_memory", json.dumps(args)],
        check=False,  # its stderr says why: raised below
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"worker memory child failed ({done.returncode}): {' | '.join(tail)}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    if "refused" in raw:  # the engine would not run this (an EngineError): why, no figures
        return {"engine": engine, "recompute": recompute, "refused": raw["refused"]}
    params, fixed = raw["parameters"], raw["fixed_bytes"]

    def per_param(n: int) -> float:
        return round((n - fixed) / params, 1)

    return {
        "engine": engine,
        "recompute": recompute,
        "parameters": params,
        "fixed_overhead_gb": round(fixed / 1e9, 3),
        "loaded_bytes_per_param": per_param(raw["loaded_bytes"]),
        "built_bytes_per_param": per_param(raw["built_bytes"]),
        "peak_bytes_per_param": per_param(raw["peak_bytes"]),
        "peak_gb": round(raw["peak_bytes"] / 1e9, 3),
        "target_bytes_per_param": TARGET_BYTES_PER_PARAM,
        "within_target": per_param(raw["peak_bytes"]) <= TARGET_BYTES_PER_PARAM,
        "train_steps": raw["train_steps"],
        "bpb_after": raw["bpb_after"],
        "mmap_threshold": raw["mmap_threshold"],  # the worker's allocator (ttt.engine.hostmem)
    }


def eval_worker_figures(model_name: str, max_length: int, **kwargs: Any) -> dict[str, Any]:
    """worker_memory for the sequential loop and the engine with one member, side by side,
    and the engine with spec.ttt.recompute."""
    figures: dict[str, Any] = {}
    for name, engine, recompute in (
        ("sequential", "sequential", False),
        ("engine", "ensemble", False),
        ("engine_recompute", "ensemble", True),
    ):
        got = worker_memory(model_name, max_length, engine, recompute=recompute, **kwargs)
        if "refused" in got:  # e.g. recompute where the ensemble takes its loop path
            figures[f"{name}_peak_bytes_per_param"] = f"not run: {got['refused']}"
            continue
        figures["fixed_overhead_gb"] = got["fixed_overhead_gb"]
        figures[f"{name}_peak_bytes_per_param"] = got["peak_bytes_per_param"]
    figures["target_bytes_per_param"] = TARGET_BYTES_PER_PARAM
    return figures


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """The worker's work in this process (see worker_memory); its figures in bytes."""
    # what an eval worker imports before it loads a model (ttt.eval.rank and its engine)
    import ttt.eval.rank  # noqa: F401
    from ttt.bench.embed import synthetic_documents
    from ttt.engine.hostmem import worker_allocator
    from ttt.engine.precision import load_for_engine
    from ttt.engine.select import EngineError, build_engine
    from ttt.spec import TTTSpec

    fixed = vm_bytes("VmRSS")
    engine, length, k = args["engine"], args["max_length"], args["neighbors"]
    spec = TTTSpec(
        model=args["model"],
        device="cpu",
        max_length=length,
        engine=engine,
        eval_after=[0, k],
        recompute=args.get("recompute", False),
        **({"ensemble_size": 1} if engine == "ensemble" else {}),
    )
    threshold = worker_allocator(engine, "cpu")  # as ttt.eval.rank's worker sets it
    lm, tokenizer = load_for_engine(spec, engine)
    loaded = vm_bytes("VmRSS")
    try:
        built = build_engine(lm, tokenizer, spec)
    except EngineError as refused:
        return {"refused": str(refused)}
    built_bytes = vm_bytes("VmRSS")
    need, n, ids = args["doc_tokens"] + k * length, 64, []
    while len(ids) < need:  # synthetic words, as the bench's documents
        n *= 2
        ids = tokenizer.encode(" ".join(synthetic_documents(n, 1)), add_special_tokens=False)
    doc = tokenizer.decode(ids[: args["doc_tokens"]])
    at = args["doc_tokens"]
    nbrs = [tokenizer.decode(ids[at + i * length : at + (i + 1) * length]) for i in range(k)]
    [(_, outcome)] = list(built.evaluate_stream([(0, doc, nbrs, None)]))
    return {
        "parameters": sum(p.numel() for p in lm.parameters()),
        "fixed_bytes": fixed,
        "loaded_bytes": loaded,
        "built_bytes": built_bytes,
        "peak_bytes": vm_bytes("VmHWM"),
        "train_steps": outcome.train_steps,
        "bpb_after": outcome.checkpoints[-1].bits_per_byte,
        "mmap_threshold": threshold or "glibc default",
    }


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)  # stdout carries one JSON line; stderr stays quiet
    print(json.dumps(_child(json.loads(sys.argv[1]))))
