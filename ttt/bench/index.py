"""Index build: seconds, bytes per vector and recall@k of flat (the paper) vs an IVF-PQ config."""

from __future__ import annotations

import tempfile
import time
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
    # The Pile goal at 1M vectors of RoBERTa-large's dimension on two CPU cores: <= 64 B a
    # vector (PQ32 codes + 8 B id + the centroids' share) re-ranked to recall@50 >= 0.95.
    # Measured (docs/plan.md): 45.3 B, recall@50 0.982 (0.442 before re-ranking; 0.785 with
    # nprobe 32, rerank 4), 6.6 ms a query. The flat index (4 GB here) is not built: its
    # figures are 4 x dim bytes and recall 1.
    "cpu-1m": {
        "vectors": 1_000_000,
        "dim": 1024,
        "type": "IVF1024,PQ32",
        "nprobe": 64,
        "rerank": 16,
        "train_sample": 50_000,
        "queries": 100,
        "build_flat": False,
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
    if p.get("build_flat", True):
        flat, flat_facts = build_index(x, "flat", use_gpu=use_gpu, seed=seed)
        flat_bpv = index_bytes(flat) / len(x)
        flat_recall = measure_recall(flat, x, k, n_queries, seed)
    else:  # exact by definition; 4 bytes a dimension (what IndexFlatL2 stores)
        flat, flat_facts = None, {"build_seconds": None}
        flat_bpv, flat_recall = 4.0 * x.shape[1], 1.0
    approx, approx_facts = build_index(
        x,
        approx_type,
        train_sample=p["train_sample"],
        nprobe=nprobe or p["nprobe"],
        use_gpu=use_gpu,
        seed=seed,
    )
    approx_bpv = index_bytes(approx) / len(x)  # in RAM: the index only
    searched = RerankedIndex(approx, x, rerank) if rerank else approx
    figures: dict[str, Any] = {
        "vectors": len(x),
        "dim": x.shape[1],
        "faiss_gpus": gpu_count(),
        "flat_build_seconds": flat_facts["build_seconds"],
        "flat_bytes_per_vector": round(flat_bpv, 1),
        f"flat_recall@{k}": flat_recall,
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
    figures["approx_query_p50_ms"] = query_p50_ms(searched, x, k, min(n_queries, 100), seed)
    if flat is not None:
        figures["flat_query_p50_ms"] = query_p50_ms(flat, x, k, min(n_queries, 100), seed)
    figures.update(extrapolate(figures, PILE_DOCUMENTS))
    return figures


PILE_DOCUMENTS = 210_000_000  # the paper's training documents


def query_p50_ms(index: Any, x: np.ndarray, k: int, queries: int, seed: int) -> float:
    """Median latency of one-query searches (a test document's retrieval), milliseconds."""
    import faiss

    rng = np.random.default_rng(seed + 2)
    rows = np.sort(rng.choice(len(x), size=min(queries, len(x)), replace=False))
    q = np.ascontiguousarray(x[rows], dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query: more threads only spin (see the server)
    try:
        seconds = []
        for row in q:
            start = time.perf_counter()
            index.search(row[None, :], k)
            seconds.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return round(float(np.median(seconds)) * 1e3, 3)


def extrapolate(f: dict[str, Any], target: int) -> dict[str, Any]:
    """The approximate index's figures at `target` vectors, and the formula that gives them.

    Memory and build time grow linearly in n (training is a fixed part: an upper bound);
    with nlist grown as sqrt(n) and nprobe fixed, a query scans lists sqrt(target/n) times
    longer. Recall is not extrapolated: measure it at scale (`--preset gpu`).
    """
    n, ratio = f["vectors"], target / f["vectors"]
    return {
        "at_vectors": target,
        "at_memory_gb": round(f["approx_bytes_per_vector"] * target / 1e9, 2),
        "at_build_hours": round(f["approx_build_seconds"] * ratio / 3600, 2),
        "at_query_p50_ms": round(f["approx_query_p50_ms"] * ratio**0.5, 2),
        "at_rerank_disk_gb": round(f["approx_disk_bytes_per_vector"] * target / 1e9, 1),
        "at_formula": (
            f"memory = bytes_per_vector x N; build = build_seconds x N/{n}; "
            f"query = p50 x sqrt(N/{n}) (nlist ~ sqrt(N), nprobe fixed); N = {target}"
        ),
    }
