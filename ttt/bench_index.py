"""Index build: seconds, bytes per vector and recall@k of flat (the paper) vs an IVF-PQ config."""

from __future__ import annotations

from typing import Any

import numpy as np

from ttt.bench_embed import print_figures, reproduce_command
from ttt.index.build import build_index, gpu_count, index_bytes, measure_recall

# 384-d = all-MiniLM-L6-v2. PQ codes of one byte per sub-vector (+8 bytes of id) against
# flat's 1536 bytes of float32. The CPU preset (PQ32, 10k training vectors: PQ training is
# the slow part on a CPU) finishes within a minute; the GPU preset is sized for one H100.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "vectors": 20_000,
        "dim": 384,
        "type": "IVF256,PQ32",
        "nprobe": 32,
        "train_sample": 10_000,
        "queries": 200,
    },
    "gpu": {
        "vectors": 1_000_000,
        "dim": 384,
        "type": "IVF4096,PQ64",
        "nprobe": 128,
        "train_sample": 200_000,
        "queries": 1_000,
    },
}


def embedding_like(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """float16 vectors shaped like text embeddings: topic clusters in a low-rank subspace.

    Uniform noise would make every index look equally bad; real embeddings have a fast-
    decaying spectrum and clusters, which is what IVF and PQ exploit.
    """
    rng = np.random.default_rng(seed)
    latent, topics = 48, 200
    basis = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    centers = rng.normal(size=(topics, latent)) * 2.0
    out = np.empty((n, dim), dtype=np.float16)
    for lo in range(0, n, 65_536):
        m = min(65_536, n - lo)
        z = centers[rng.integers(0, topics, m)] + rng.normal(size=(m, latent))
        out[lo : lo + m] = z @ basis + 0.1 * rng.normal(size=(m, dim))
    return out


def bench_index(
    *,
    preset: str = "cpu",
    vectors: int | None = None,
    dim: int | None = None,
    index_type: str | None = None,
    nprobe: int | None = None,
    k: int = 50,
    queries: int | None = None,
    embeddings: str | None = None,
    use_gpu: str = "auto",
    seed: int = 0,
    show: bool = True,
) -> dict[str, Any]:
    """Build flat and an approximate index over the same vectors; compare cost and recall@k.

    `embeddings` (a published embeddings.npy) replaces the synthetic vectors.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if embeddings:
        x = np.load(embeddings, mmap_mode="r")
        if vectors:
            x = x[:vectors]
    else:
        x = embedding_like(vectors or p["vectors"], dim or p["dim"], seed)
    approx_type = index_type or p["type"]
    probes = nprobe or p["nprobe"]
    n_queries = queries or p["queries"]
    flat, flat_facts = build_index(x, "flat", use_gpu=use_gpu, seed=seed)
    approx, approx_facts = build_index(
        x, approx_type, train_sample=p["train_sample"], nprobe=probes, use_gpu=use_gpu, seed=seed
    )
    flat_bpv = index_bytes(flat) / len(x)
    approx_bpv = index_bytes(approx) / len(x)
    figures = {
        "vectors": len(x),
        "dim": x.shape[1],
        "faiss_gpus": gpu_count(),
        "flat_build_seconds": flat_facts["build_seconds"],
        "flat_bytes_per_vector": round(flat_bpv, 1),
        f"flat_recall@{k}": measure_recall(flat, x, k, n_queries, seed),
        "approx_type": approx_type,
        "approx_nprobe": approx_facts["nprobe"],
        "approx_build_seconds": approx_facts["build_seconds"],
        "approx_bytes_per_vector": round(approx_bpv, 1),
        f"approx_recall@{k}": round(measure_recall(approx, x, k, n_queries, seed) or 0.0, 4),
        "memory_ratio": round(flat_bpv / approx_bpv, 1),
    }
    if show:
        given = {
            "vectors": vectors,
            "dim": dim,
            "type": index_type,
            "nprobe": nprobe,
            "k": k if k != 50 else None,
            "queries": queries,
            "embeddings": embeddings,
            "use_gpu": use_gpu if use_gpu != "auto" else None,
            "seed": seed or None,
        }
        command = reproduce_command("index", preset, given)
        print_figures(f"index build: flat vs {approx_type}", figures, command)
    return figures
