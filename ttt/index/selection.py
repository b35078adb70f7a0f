"""Which of the retrieved candidates a test document trains on: nearest, or SIFT's choice.

SIFT (Hübotter et al., "Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs",
ICLR 2025) picks, among the K' nearest candidates, the k that most reduce a Gaussian
process's posterior variance at the query. With the linear kernel of unit-normalised
embeddings and observation noise lambda, the next pick is

    x_{i+1} = argmin_x  sigma^2_i(q | x)  =  k_i(q,q) - k_i(q,x)^2 / (k_i(x,x) + lambda)

and every pick conditions the kernel:  k_{i+1}(a,b) = k_i(a,b) - k_i(a,x) k_i(x,b) / (k_i(x,x)
+ lambda). A near-duplicate of a picked candidate has almost nothing left to say about q,
so SIFT moves on to another part of the neighborhood where nearest neighbors would train on
the copy. As in the authors' `activeft` (VTL acquisition), a candidate may be picked again
when it is still the most informative: a second step on it. The tests check these picks
against activeft's on the same vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELECTIONS = ("nearest", "sift")


@dataclass(frozen=True)
class Selection:
    """Candidate positions in training order, and SIFT's posterior variance after each pick."""

    indices: list[int]
    variances: list[float]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), in float64 for the kernel."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def sift_select(
    query: np.ndarray,
    candidates: np.ndarray,
    k: int,
    lam: float = 0.01,
    *,
    normalize: bool = True,
) -> Selection:
    """SIFT's k greedy picks among `candidates` (n x d) for `query` (d,), in pick order.

    `normalize` scales query and candidates to unit norm first (the kernel SIFT's authors use,
    which makes lambda independent of the encoder's scale); ties go to the lower position,
    i.e. the nearer candidate when candidates come nearest first.
    """
    if lam <= 0:
        raise ValueError(f"SIFT lambda must be > 0, got {lam}")
    c = np.asarray(candidates, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64).reshape(1, -1)
    if c.ndim != 2 or (len(c) and c.shape[1] != q.shape[1]):
        raise ValueError(
            f"candidates of shape {c.shape} do not match a query of dimension {q.shape[1]}"
        )
    if len(c) == 0 or k <= 0:
        return Selection([], [])
    if normalize:
        c, q = unit_rows(c), unit_rows(q)
    joint = np.vstack([c, q])
    cov = joint @ joint.T  # the kernel over candidates and the query (last row/column)
    n = len(c)
    picks, variances = [], []
    for _ in range(k):
        diag = np.diag(cov)[:n]
        posterior = cov[n, n] - cov[n, :n] ** 2 / (diag + lam)
        i = int(np.argmin(posterior))  # first minimum: the nearer of equals
        picks.append(i)
        variances.append(float(posterior[i]))
        cov = cov - np.outer(cov[:, i], cov[i, :]) / (cov[i, i] + lam)
    return Selection(picks, variances)


def nearest_select(distances: list[float], k: int) -> Selection:
    """The k nearest candidates, nearest first (the paper's TTT-NN), in the same shape."""
    order = sorted(range(len(distances)), key=lambda i: (distances[i], i))[: max(k, 0)]
    return Selection(order, [])


def reconstruct_rows(index: object, rows: list[int]) -> np.ndarray:
    """The stored vectors of `rows` of a FAISS (or re-ranked) index, float32 (len x d).

    An IVF index can return its vectors only with a direct map, made here on first use, as
    the shard server does at load time.
    """
    import faiss

    ids = np.asarray(rows, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, int(index.d)), dtype=np.float32)
    try:
        return np.asarray(index.reconstruct_batch(ids), dtype=np.float32)
    except RuntimeError:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            raise
        ivf.make_direct_map()
        return np.asarray(index.reconstruct_batch(ids), dtype=np.float32)


def choose_neighbors(
    candidates: list, query_vector: np.ndarray | None, k: int, method: str, lam: float
) -> tuple[list, Selection]:
    """The neighbors to train on, in training order, from guarded candidates (nearest first).

    `nearest` keeps the k nearest; `sift` runs SIFT over the candidates' vectors (each
    candidate must carry `.vector`, as a retrieval `with_vectors` gives them).
    """
    if method == "nearest":
        picked = nearest_select([c.distance for c in candidates], k)
    elif method == "sift":
        if candidates and (query_vector is None or any(c.vector is None for c in candidates)):
            raise ValueError("SIFT needs the query's and every candidate's vector")
        vectors = np.stack([c.vector for c in candidates]) if candidates else np.zeros((0, 1))
        picked = sift_select(query_vector, vectors, k, lam) if candidates else Selection([], [])
    else:
        raise ValueError(f"unknown selection {method!r}; expected one of {SELECTIONS}")
    return [candidates[i] for i in picked.indices], picked
