"""TTT-NN speed: the paper's loop, our sequential loop and our engine, side by side."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from ttt.bench.figures import print_figures, reproduce_command
from ttt.bench.peak import device_peak
from ttt.bpb import score_document
from ttt.device import pick_device
from ttt.engine.ensemble import EnsembleTTT
from ttt.lm import eot_token_id
from ttt.spec import TTTSpec
from ttt.train import TTTNN, chunk_tokens

# cpu: the offline SmolLM2-135M, minutes on two cores. gpt2 / gpt2-large: GPT-2 124M and
# 774M built from their configs with random weights (speed only: no download), sized for
# about a minute of the paper's loop on one H100 at the paper's 1024-token chunks.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"model": "smollm2-135m", "max_length": 128, "documents": 2, "neighbors": 2},
    "gpt2": {"model": "gpt2", "max_length": 1024, "documents": 32, "neighbors": 16},
    "gpt2-large": {"model": "gpt2-large", "max_length": 1024, "documents": 16, "neighbors": 8},
}
GPT2_SIZES = {"gpt2": (12, 768), "gpt2-large": (36, 1280)}  # layers, width


@dataclass
class Work:
    """What one loop did: wall seconds, neighbors and training tokens, the bpb it reached."""

    seconds: float
    neighbors: int
    tokens: int
    bpb_before: float
    bpb_after: float


def build_model(
    name: str, device: torch.device, layers: int | None = None, width: int | None = None
) -> tuple[Any, Any]:
    """The preset's model in float32 on `device`: GPT-2 from its config, or an offline LM."""
    if name in GPT2_SIZES:
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        from ttt.assets import resolve_model

        n_layer, n_embd = GPT2_SIZES[name]
        n_layer, n_embd = layers or n_layer, width or n_embd
        torch.manual_seed(0)
        # the paper's GPT-2 trains with dropout 0.1: kept, so the engine's path is the real one
        config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
        config._attn_implementation = "sdpa"  # what from_pretrained picks for GPT-2
        data = resolve_model("gpt2-tokenizer")
        tokenizer = GPT2TokenizerFast(
            vocab_file=f"{data}/encoder.json", merges_file=f"{data}/vocab.bpe"
        )
        return GPT2LMHeadModel(config).to(device).eval(), tokenizer
    from ttt.lm import load_lm

    return load_lm(name, dtype="float32", device=str(device))


def bench_texts(
    tokenizer: Any, documents: int, neighbors: int, max_length: int, seed: int = 0
) -> list[tuple[str, list[str]]]:
    """Documents of about half a chunk, each with neighbors of one full chunk."""
    from ttt.bench.embed import synthetic_documents

    words = " ".join(synthetic_documents(4 * (documents * (neighbors + 1)) + 8, seed))
    ids = tokenizer.encode(words, add_special_tokens=False)
    pieces, at = [], 0

    def take(n: int) -> str:
        nonlocal at
        if at + n > len(ids):
            at = 0
        piece = tokenizer.decode(ids[at : at + n])
        at += n
        return piece

    for _ in range(documents):
        pieces.append((take(max_length // 2), [take(max_length) for _ in range(neighbors)]))
    return pieces


def paper_loop(model: Any, tokenizer: Any, spec: TTTSpec, texts: list) -> Work:
    """The paper code's loop: fp32 AdamW, loss.item() every step, a score after every
    neighbor, the weights restored with load_state_dict after every document."""
    device = next(model.parameters()).device
    original = copy.deepcopy(model.state_dict())
    eot = eot_token_id(tokenizer)
    before, after, tokens, neighbors = [], [], 0, 0
    _sync(device)
    start = time.perf_counter()
    for text, nbrs in texts:
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0)
        before.append(score_document(model, tokenizer, text, spec.max_length, eot_id=eot))
        for neighbor in nbrs:
            ids = tokenizer.encode(neighbor, add_special_tokens=False)
            model.train()
            for chunk in chunk_tokens(ids, spec.max_length, spec.chunk_stride):
                inputs = torch.tensor([chunk], device=device)
                loss = model(input_ids=inputs, labels=inputs).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or 1.0)
                optimizer.step()
                optimizer.zero_grad()
                loss.item()  # the paper logs every step's loss: a host sync
                tokens += len(chunk)
            model.eval()
            neighbors += 1
            score = score_document(model, tokenizer, text, spec.max_length, eot_id=eot)
        after.append(score)
        model.load_state_dict(original)
    _sync(device)
    return Work(time.perf_counter() - start, neighbors, tokens, _bpb(before), _bpb(after))


def engine_loop(engine: Any, texts: list, device: torch.device) -> Work:
    """Our sequential loop or our engine over the same documents (scores at evalAfter)."""
    items = [(i, text, nbrs, None) for i, (text, nbrs) in enumerate(texts)]
    _sync(device)
    start = time.perf_counter()
    if isinstance(engine, TTTNN):
        outcomes = [engine.evaluate(text, nbrs) for _, text, nbrs, _ in items]
    else:
        outcomes = [o for _, o in sorted(engine.evaluate_stream(items), key=lambda x: x[0])]
    _sync(device)
    seconds = time.perf_counter() - start
    return Work(
        seconds,
        sum(o.neighbors_used for o in outcomes),
        sum(o.train_tokens for o in outcomes),
        _bpb([o.at(0) for o in outcomes]),
        _bpb([o.checkpoints[-1] for o in outcomes]),  # after the last neighbor
    )


def _bpb(scores: list) -> float:
    """Bits per byte over the documents together (sums, as the harness aggregates)."""
    import math

    loglik = sum(s.loglik for s in scores)
    nbytes = sum(s.bytes for s in scores)
    return -loglik / nbytes / math.log(2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ttt(
    *,
    preset: str = "cpu",
    model: str | None = None,
    documents: int | None = None,
    neighbors: int | None = None,
    max_length: int | None = None,
    members: int | None = None,
    path: str | None = None,
    device: str | None = None,
    layers: int | None = None,
    width: int | None = None,
    seed: int = 0,
    show: bool = True,
    profile: bool = False,
    recompute: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """ms per neighbor, tokens/s, TFLOP/s and bpb of the three loops on the same work; with
    `profile`, ttt.bench.ttt_profile's counts per path instead (no timings). `recompute`:
    our engine runs spec.ttt.recompute (layers again in the backward), the loops do not;
    `compile`: our engine runs spec.ttt.compile (compiled in its warm-up, reported apart)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if profile and compile:  # torch.compile runs nothing compiled under a dispatch mode
        raise ValueError("--profile counts eager operators: it does not take --compile")
    p = PRESETS[preset]
    where = pick_device(device or "auto")
    name = model or p["model"]
    length = max_length or p["max_length"]
    lm, tokenizer = build_model(name, where, layers, width)
    texts = bench_texts(
        tokenizer, documents or p["documents"], neighbors or p["neighbors"], length, seed
    )
    k = max(len(n) for _, n in texts)
    spec = TTTSpec(
        model=name,
        dtype="auto",
        max_length=length,
        optimizer="adamw",
        weight_decay=0.0,
        eval_after=[0, k],
        ensemble_size=members,
    )
    given = {
        "model": model,
        "documents": documents,
        "neighbors": neighbors,
        "max_length": max_length,
        "members": members,
        "path": path,
        "device": device,
        "layers": layers,
        "width": width,
        "profile": profile,
        "recompute": recompute,
        "compile": compile,
    }
    if profile:
        from ttt.bench.ttt_profile import profile_paths

        counted = profile_paths(
            lm, tokenizer, spec, texts, members or 2, seed, saved_model=name not in GPT2_SIZES
        )
        if show:
            title = f"TTT-NN step profile ({name}, {length}-token chunks, {where})"
            flat = {
                f"{k}.{inner}" if isinstance(v, dict) else k: w
                for k, v in counted.items()
                for inner, w in (v.items() if isinstance(v, dict) else [(None, v)])
            }
            print_figures(title, flat, reproduce_command("ttt", preset, given))
        return counted
    params = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    # path vmap on a model with dropout: independent masks per member, not the sequential
    # loop's (equal in distribution only); the default follows choose_path
    ours = spec.model_copy(update={"recompute": recompute, "compile": compile})
    engine = EnsembleTTT(lm, tokenizer, ours, members=members, seed=seed, path=path)
    warm = texts[:1]
    paper_loop(lm, tokenizer, spec, [(warm[0][0], warm[0][1][:1])])  # kernels, allocator
    started = time.perf_counter()
    engine_loop(engine, [(warm[0][0], warm[0][1][:1])], where)  # compiles, with compile
    warmup = time.perf_counter() - started
    runs = {
        "paper": paper_loop(lm, tokenizer, spec, texts),
        "sequential": engine_loop(
            TTTNN(lm, tokenizer, spec.model_copy(update={"dtype": "float32"})), texts, where
        ),
        "ours": engine_loop(engine, texts, where),
    }
    peak, peak_source = device_peak(where)
    figures: dict[str, Any] = {
        "model": name,
        "parameters_M": round(params / 1e6, 1),
        "device": str(where),
        "chunk_tokens": length,
        "documents": len(texts),
        "neighbors_per_document": k,
        "ours_precision": engine.precision.name,
        "ours_path": engine.path,
        "ours_members": engine.members,
        "ours_recompute": recompute,
        "ours_compile": compile,
        "ours_warmup_seconds": round(warmup, 1),
        "peak_tflops": round(peak, 2),
        "peak_source": peak_source,
    }
    for label, work in runs.items():
        flops = 6 * params * work.tokens / work.seconds
        figures[f"{label}_ms_per_neighbor"] = round(1000 * work.seconds / work.neighbors, 2)
        figures[f"{label}_tokens_per_second"] = round(work.tokens / work.seconds, 1)
        figures[f"{label}_tflops"] = round(flops / 1e12, 4)
        figures[f"{label}_percent_of_peak"] = round(100 * flops / 1e12 / peak, 2)
        figures[f"{label}_bpb_before"] = round(work.bpb_before, 5)
        figures[f"{label}_bpb_after"] = round(work.bpb_after, 5)
    figures["speedup_vs_paper"] = round(runs["paper"].seconds / runs["ours"].seconds, 2)
    figures["speedup_vs_sequential"] = round(runs["sequential"].seconds / runs["ours"].seconds, 2)
    if show:
        command = reproduce_command("ttt", preset, given)
        print_figures(
            "TTT-NN speed (the paper's loop, ours sequential, our engine)", figures, command
        )
    return figures
