"""Embedding throughput: our path (sorted, token-budget batches, bf16 on GPU) vs the paper's."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ttt.bench.figures import print_figures, reproduce_command
from ttt.embed import Encoder, mean_pool

# name -> (documents, batch token budget, device). The CPU preset finishes within a minute
# on two cores; the GPU preset is sized for one H100.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"documents": 64, "batch_tokens": 8192, "device": "cpu"},
    "gpu": {"documents": 8192, "batch_tokens": 131072, "device": "cuda"},
}
REFERENCE_BATCH = 16  # the paper's reference code: 16 documents per batch, in corpus order


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents with the Pile's spread of lengths: mostly short, a long tail past 512 tokens."""
    rng = np.random.default_rng(seed)
    vocab = [
        f"{a}{b}"
        for a in ("re", "con", "pro", "in", "de", "ex", "sub")
        for b in ("tion", "ment", "ing", "al", "ity", "ous", "ive", "er", "ed", "ly", "ize", "ure")
    ]
    vocab += ["the", "of", "and", "a", "to", "in", "is", "for", "that", "with", "=", "(", ")"]
    lengths = np.clip(rng.lognormal(mean=4.8, sigma=1.0, size=n), 3, 4000).astype(int)
    return [" ".join(rng.choice(vocab, size=k)) for k in lengths]


@torch.inference_mode()
def reference_encode(
    encoder: Encoder, texts: Sequence[str], batch: int = REFERENCE_BATCH
) -> np.ndarray:
    """The paper's path: unsorted batches of 16, padded to the longest, the encoder's dtype."""
    out = []
    for lo in range(0, len(texts), batch):
        enc = encoder.tokenizer(
            list(texts[lo : lo + batch]),
            padding=True,
            truncation=True,
            max_length=encoder.max_tokens,
            return_tensors="pt",
        ).to(encoder.device)
        hidden = encoder.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
        out.append(mean_pool(hidden, enc["attention_mask"]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def _timed(fn: Any, *args: Any) -> tuple[np.ndarray, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def bench_embed(
    *,
    preset: str = "cpu",
    model: str = "all-minilm-l6-v2",
    documents: int | None = None,
    batch_tokens: int | None = None,
    max_tokens: int | None = None,
    device: str | None = None,
    corpus: Sequence[str] | None = None,
    seed: int = 0,
    show: bool = True,
) -> dict[str, Any]:
    """Tokens/s of our encoder path and of the paper's reference path on the same documents.

    `corpus` (Pile-format paths) replaces the synthetic documents. Both paths read the same
    real tokens (padding excluded), so the ratio is a ratio of wall-clock times.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    n = documents or p["documents"]
    where = device or p["device"]
    if corpus:
        from ttt.corpus import iter_documents

        texts = [d.text for _, d in zip(range(n), iter_documents(list(corpus)), strict=False)]
    else:
        texts = synthetic_documents(n, seed)
    limit = max_tokens or 512  # the paper's truncation (RoBERTa's limit)
    ours = Encoder(
        model,
        max_tokens=limit,
        dtype="auto",
        device=where,
        batch_tokens=batch_tokens or p["batch_tokens"],
    )
    reference = (
        ours
        if ours.dtype == torch.float32
        else Encoder(model, max_tokens=limit, dtype="float32", device=where)
    )
    tokens = ours.count_tokens(texts)
    ours.encode(texts[:8])  # warm-up: kernels, allocator, thread pools
    reference_encode(reference, texts[:8])
    ours_vectors, ours_s = _timed(ours.encode, texts)
    ref_vectors, ref_s = _timed(reference_encode, reference, texts)
    cosine = np.sum(ours_vectors * ref_vectors, 1) / (
        np.linalg.norm(ours_vectors, axis=1) * np.linalg.norm(ref_vectors, axis=1) + 1e-12
    )
    figures = {
        "model": model,
        "device": str(ours.device),
        "dtype": str(ours.dtype).removeprefix("torch."),
        "attention": str(getattr(ours.model.config, "_attn_implementation", "eager")),
        "pinned_overlapped_copies": ours.device.type == "cuda",
        "documents": len(texts),
        "tokens": tokens,
        "ours_seconds": round(ours_s, 3),
        "reference_seconds": round(ref_s, 3),
        "ours_tokens_per_second": round(tokens / ours_s, 1),
        "reference_tokens_per_second": round(tokens / ref_s, 1),
        "speedup": round(ref_s / ours_s, 2),
        "min_cosine_vs_reference": round(float(cosine.min()), 5),
    }
    if show:
        given = {
            "model": None if model == "all-minilm-l6-v2" else model,
            "documents": documents,
            "batch_tokens": batch_tokens,
            "max_tokens": max_tokens,
            "device": device,
            "corpus": corpus,
        }
        command = reproduce_command("embed", preset, given)
        print_figures("embedding throughput (ours vs the paper's reference path)", figures, command)
    return figures
