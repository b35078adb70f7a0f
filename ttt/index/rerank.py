"""Exact re-ranking of approximate candidates against a shard's embeddings on disk."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

# Candidate vectors gathered at a time (x dim x 4 bytes of float32): bounds the working set.
GATHER_ROWS = 16_384


def search_reranked(
    index: Any, vectors: np.ndarray, queries: np.ndarray, k: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, labels) after re-ranking k x `factor` candidates of `index` exactly.

    `vectors` are the rows the index was built from, typically float16 memory-mapped with
    np.load(mmap_mode="r"): only the candidates' pages are read, so RAM holds the compressed
    index while recall approaches the flat index's. Distances are exact squared L2 (float32
    of the stored vectors); missing neighbors are labelled -1 with distance +inf, as FAISS.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq, n = len(q), len(vectors)
    if factor < 1:
        raise ValueError(f"rerank factor {factor}: expected >= 1")
    k = max(int(k), 0)
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or k == 0 or nq == 0:
        return out_d, out_i
    _, candidates = index.search(q, min(k * factor, n))
    per_chunk = max(1, GATHER_ROWS // candidates.shape[1])
    for lo in range(0, nq, per_chunk):
        labels = candidates[lo : lo + per_chunk]
        valid = labels >= 0  # FAISS pads with -1 when fewer candidates are found
        # Sorted unique rows: each candidate is read once, in file order, from the memory map.
        rows, inverse = np.unique(np.where(valid, labels, 0).ravel(), return_inverse=True)
        gathered = np.asarray(vectors[rows], dtype=np.float32)
        diff = gathered[inverse.reshape(labels.shape)] - q[lo : lo + per_chunk, None, :]
        dist = np.where(valid, np.einsum("qcd,qcd->qc", diff, diff), np.inf).astype(np.float32)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        m = order.shape[1]
        best = np.take_along_axis(dist, order, axis=1)
        out_d[lo : lo + per_chunk, :m] = best
        picked = np.take_along_axis(labels, order, axis=1)
        out_i[lo : lo + per_chunk, :m] = np.where(np.isfinite(best), picked, -1)
    return out_d, out_i


class RerankedIndex:
    """A FAISS index whose searches are re-ranked exactly against its stored vectors.

    Quacks like the parts of faiss.Index that servers and retrievers use (ntotal, d, search,
    reconstruct, reconstruct_batch); reconstructed rows are the exact stored vectors.
    """

    def __init__(self, index: faiss.Index, vectors: np.ndarray, factor: int) -> None:
        if vectors.ndim != 2 or vectors.shape != (index.ntotal, index.d):
            raise ValueError(
                f"re-ranking vectors of shape {vectors.shape} do not match the index "
                f"({index.ntotal} x {index.d})"
            )
        if factor < 1:
            raise ValueError(f"rerank factor {factor}: expected >= 1")
        self.index, self.vectors, self.factor = index, vectors, int(factor)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_reranked(self.index, self.vectors, x, k, self.factor)

    def reconstruct(self, row: int) -> np.ndarray:
        return np.asarray(self.vectors[int(row)], dtype=np.float32)

    def reconstruct_batch(self, rows: Any) -> np.ndarray:
        return np.asarray(self.vectors[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def base_index(index: Any) -> faiss.Index:
    """The FAISS index under a possible re-ranking wrapper."""
    return index.index if isinstance(index, RerankedIndex) else index
