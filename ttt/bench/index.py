"""Index build: seconds, bytes per vector and recall@k of flat (the paper) vs an IVF-PQ config."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ttt.bench.figures import print_figures, reproduce_command
from ttt.index.build import build_index, gpu_count, index_bytes, measure_recall
from ttt.index.rerank import RerankedIndex

# 384-d = all-MiniLM-L6-v2. PQ codes of one byte per sub-vector (+8 bytes of id) against
# flat's 1536 bytes of float32. The CPU preset (PQ32, 10k training vectors: PQ training is
# the slow part on a CPU) finishes within a minute; the GPU preset is sized for one H100.
# `rerank` re-ranks k x rerank PQ candidates exactly against the float16 embeddings,
# memory-mapped from disk: RAM holds the PQ codes only (measured on the CPU preset:
# recall@50 0.84 without re-ranking, 1.0 with rerank 4, at 19x less memory than flat).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "vectors": 20_000,
        "dim": 384,
        "type": "IVF256,PQ32",
        "nprobe": 16,
        "rerank": 4,
        "train_sample": 10_000,
        "queries": 200,
    },
    "gpu": {
        "vectors": 1_000_000,
        "dim": 384,
        "type": "IVF4096,PQ64",
        "nprobe": 128,
        "rerank": 4,
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
    rerank: int | None = None,
    k: int = 50,
    queries: int | None = None,
    embeddings: str | None = None,
    use_gpu: str = "auto",
    seed: int = 0,
    show: bool = True,
) -> dict[str, Any]:
    """Build flat and an approximate index over the same vectors; compare cost and recall@k.

    `embeddings` (a published embeddings.npy) replaces the synthetic vectors. `rerank`
    (default: the preset's; 0 = off) re-ranks k x rerank candidates exactly against the
    float16 vectors memory-mapped from disk, which count as disk, not RAM, bytes.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if rerank is not None and rerank < 0:
        raise ValueError(f"rerank {rerank}: expected >= 0 (0 = off)")
    p = PRESETS[preset]
    with tempfile.TemporaryDirectory(prefix="ttt-bench-index-") as tmp:
        if embeddings:
            x = np.load(embeddings, mmap_mode="r")
            if vectors:
                x = x[:vectors]
        else:
            # On disk and memory-mapped, as a shard server holds a shard's embeddings.
            path = Path(tmp) / "embeddings.npy"
            np.save(path, embedding_like(vectors or p["vectors"], dim or p["dim"], seed))
            x = np.load(path, mmap_mode="r")
        figures = _compare(
            x,
            p,
            index_type,
            nprobe,
            p["rerank"] if rerank is None else rerank,
            k,
            queries or p["queries"],
            use_gpu,
            seed,
        )
    if show:
        given = {
            "vectors": vectors,
            "dim": dim,
            "type": index_type,
            "nprobe": nprobe,
            "rerank": rerank,
            "k": k if k != 50 else None,
            "queries": queries,
            "embeddings": embeddings,
            "use_gpu": use_gpu if use_gpu != "auto" else None,
            "seed": seed or None,
        }
        command = reproduce_command("index", preset, given)
        print_figures(f"index build: flat vs {figures['approx_type']}", figures, command)
    return figures


def _compare(
    x: np.ndarray,
    p: dict[str, Any],
    index_type: str | None,
    nprobe: int | None,
    rerank: int,
    k: int,
    n_queries: int,
    use_gpu: str,
    seed: int,
) -> dict[str, Any]:
    approx_type = index_type or p["type"]
    flat, flat_facts = build_index(x, "flat", use_gpu=use_gpu, seed=seed)
    approx, approx_facts = build_index(
        x,
        approx_type,
        train_sample=p["train_sample"],
        nprobe=nprobe or p["nprobe"],
        use_gpu=use_gpu,
        seed=seed,
    )
    flat_bpv = index_bytes(flat) / len(x)
    approx_bpv = index_bytes(approx) / len(x)  # in RAM: the index only
    searched = RerankedIndex(approx, x, rerank) if rerank else approx
    figures: dict[str, Any] = {
        "vectors": len(x),
        "dim": x.shape[1],
        "faiss_gpus": gpu_count(),
        "flat_build_seconds": flat_facts["build_seconds"],
        "flat_bytes_per_vector": round(flat_bpv, 1),
        f"flat_recall@{k}": measure_recall(flat, x, k, n_queries, seed),
        "approx_type": approx_type,
        "approx_nprobe": approx_facts["nprobe"],
        "approx_rerank": rerank,
        "approx_build_seconds": approx_facts["build_seconds"],
        "approx_bytes_per_vector": round(approx_bpv, 1),
        "approx_disk_bytes_per_vector": round(x.dtype.itemsize * x.shape[1], 1) if rerank else 0,
        f"approx_recall@{k}": round(measure_recall(searched, x, k, n_queries, seed) or 0.0, 4),
        "memory_ratio": round(flat_bpv / approx_bpv, 1),
    }
    if rerank:
        figures[f"approx_recall@{k}_without_rerank"] = round(
            measure_recall(approx, x, k, n_queries, seed) or 0.0, 4
        )
    return figures
