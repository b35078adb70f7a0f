"""What every retriever shares: result types, the exact top-k merge, threshold, leakage guard.

`LocalRetriever` searches shard indexes held in this process; `ShardedRetriever`
(ttt.index.client) the shard servers. Both return the same `Retrieval`s for the same shards.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ttt import telemetry
from ttt.errors import TTTError
from ttt.spec import EXCLUDE_MARGIN


def euclidean(squared: float) -> float:
    """The Euclidean distance from FAISS's squared L2 (rounding can make an exact 0 negative)."""
    return math.sqrt(max(float(squared), 0.0))


def within_threshold(squared: float, threshold: float | None) -> bool:
    """The reference's rule: a neighbor is used when its *Euclidean* distance is < threshold.

    `threshold` is Euclidean (spec.retrieval.distanceThreshold, the reference's 4.0); FAISS
    returns squared L2, so the comparison is squared < threshold**2, never squared < threshold.
    """
    return threshold is None or float(squared) < threshold * threshold


def is_leak(
    document: str | None, neighbor: str | None, distance: float | None, identical_distance: float
) -> bool:
    """The leakage guard's rule: the neighbor is the test document itself, retrieved.

    Identical text (ignoring surrounding whitespace) or a Euclidean `distance` of ~0 (at most
    `identical_distance`, also Euclidean); the retrievers and the training loop use this one
    definition.
    """
    if distance is not None and distance <= identical_distance:
        return True
    return document is not None and neighbor is not None and neighbor.strip() == document.strip()


class RetrievalError(TTTError, RuntimeError):
    """A misconfigured retrieval (bad token, wrong dimension, no servers), never a dead shard."""


class ShardsUnavailable(TTTError, RuntimeError):
    """Too few shards answered: every one unless partial results are allowed, and never none.

    Transient by nature (a server restarting, not yet ready): the caller waits and retries;
    a retrieval on fewer shards is never passed off as a complete one.
    """

    def __init__(self, message: str, failed: list[int]) -> None:
        super().__init__(message)
        self.failed = failed


class Encoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Neighbor:
    """One retrieved document: squared-L2 `distance` to the query (FAISS's), `row` in `shard`.

    Thresholds and results speak Euclidean distances: see `euclidean` and `within_threshold`.
    """

    id: str
    domain: str
    distance: float
    shard: int
    row: int
    text: str | None = None
    # the stored vector, only when asked for (SIFT selects among candidates by their vectors)
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Retrieval:
    """The neighbors of one query, nearest first; `partial` when some shard did not answer."""

    neighbors: list[Neighbor]
    partial: bool = False
    failed_shards: list[int] = field(default_factory=list)
    excluded: int = 0  # neighbors dropped by the leakage guard
    query_vector: np.ndarray | None = field(default=None, repr=False)  # with_vectors only


@dataclass
class Hits:
    """One shard's answer to one query, as the server sends it (distances ascending)."""

    distances: list[float]
    rows: list[int]
    ids: list[str]
    domains: list[str]
    vectors: list[list[float]] | None = None  # when the search asked for include_vectors


def merge_topk(per_shard: dict[int, Hits], k: int) -> list[Neighbor]:
    """The global top-k of per-shard top-k lists: ties broken by (distance, shard, row).

    For exact (flat) shard indexes this is exactly the top-k of one index over all shards,
    since each shard's k best include every one of its rows in the global k best.
    """
    candidates = (
        (float(d), shard, int(row), i)
        for shard, hits in per_shard.items()
        for i, (d, row) in enumerate(zip(hits.distances, hits.rows, strict=True))
    )
    return [
        Neighbor(
            per_shard[s].ids[i], per_shard[s].domains[i], d, s, row, None, _vector(per_shard[s], i)
        )
        for d, s, row, i in heapq.nsmallest(k, candidates)
    ]


def _vector(hits: Hits, i: int) -> np.ndarray | None:
    return None if hits.vectors is None else np.asarray(hits.vectors[i], dtype=np.float32)


class BaseRetriever:
    """What both retrievers share: embedding, the leakage guard, the threshold, the cut to k."""

    def __init__(
        self,
        encoder: Encoder | None,
        k: int = 50,
        distance_threshold: float | None = None,
        exclude_identical: bool = True,
        identical_distance: float = 1e-3,
        exclude_margin: int = EXCLUDE_MARGIN,
        allow_partial: bool = False,
        min_shards: int = 1,
    ) -> None:
        self.encoder, self.k = encoder, k
        # Without allow_partial every shard must answer; with it, at least min_shards.
        self.allow_partial, self.min_shards = allow_partial, max(1, min_shards)
        self.distance_threshold = distance_threshold
        self.exclude_identical, self.identical_distance = exclude_identical, identical_distance
        # Extra candidates fetched so that excluded copies of the query still leave k.
        self.exclude_margin = exclude_margin if exclude_identical else 0

    def search(
        self,
        texts: Sequence[str],
        k: int | None = None,
        with_text: bool = True,
        with_vectors: bool = False,
    ) -> list[Retrieval]:
        """The neighbors of each query text (the query is embedded with the encoder).

        `with_vectors`: each neighbor carries its stored vector and each retrieval the query's
        (what SIFT selects with); off by default, since a vector costs dim x 4 bytes.
        """
        texts = list(texts)
        if not texts:
            return []
        if self.encoder is None:
            raise RetrievalError("this retriever has no encoder; use search_vectors")
        vectors = np.asarray(self.encoder.encode(texts), dtype=np.float32)
        return self.search_vectors(
            vectors, k, with_text, query_texts=texts, with_vectors=with_vectors
        )

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int | None = None,
        with_text: bool = True,
        query_texts: Sequence[str] | None = None,
        with_vectors: bool = False,
    ) -> list[Retrieval]:
        """The neighbors of each query vector (n x dim float32)."""
        k = self.k if k is None else k
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if k <= 0 or len(vectors) == 0:
            return [Retrieval([]) for _ in range(len(vectors))]
        start = time.perf_counter()
        fan_out = {"with_vectors": True} if with_vectors else {}  # subclasses without it work
        merged, failed = self._fan_out(vectors, k + self.exclude_margin, with_text, **fan_out)
        telemetry.RETRIEVAL_LATENCY.observe(time.perf_counter() - start)
        self._require_shards(failed)
        for shard in failed:
            telemetry.RETRIEVAL_PARTIAL.labels(str(shard)).inc(len(vectors))
        out = []
        for q, neighbors in enumerate(merged):
            query = query_texts[q] if query_texts is not None else None
            kept, excluded = self._select(neighbors, k, query)
            out.append(Retrieval(kept, bool(failed), sorted(failed), excluded))
            if with_vectors:
                out[-1].query_vector = vectors[q]
        return out

    @property
    def shards(self) -> int:
        raise NotImplementedError

    def _require_shards(self, failed: set[int]) -> None:
        """Raise ShardsUnavailable unless enough shards answered for the policy."""
        if not failed:
            return
        answered = self.shards - len(failed)
        need = self.shards if not self.allow_partial else min(self.min_shards, self.shards)
        if answered >= need:
            return
        policy = "every shard must answer" if not self.allow_partial else f"need {need}"
        raise ShardsUnavailable(
            f"{answered} of {self.shards} shard(s) answered (failed: {sorted(failed)}); "
            f"{policy} (spec.retrieval.allowPartial/minShards)",
            sorted(failed),
        )

    def _select(self, neighbors: list[Neighbor], k: int, query: str | None):
        kept, excluded = [], 0
        for n in neighbors:  # ascending distance
            if not within_threshold(n.distance, self.distance_threshold):
                break
            if self.exclude_identical and is_leak(
                query, n.text, euclidean(n.distance), self.identical_distance
            ):
                excluded += 1
                continue
            if len(kept) < k:
                kept.append(n)
        return kept, excluded

    def _fan_out(
        self, vectors: np.ndarray, k: int, with_text: bool
    ) -> tuple[list[list[Neighbor]], set[int]]:
        raise NotImplementedError


class LocalRetriever(BaseRetriever):
    """The same search over shard indexes held in this process (tests, tiny runs)."""

    def __init__(
        self,
        encoder: Encoder | None,
        indexes: Sequence[Any],
        text_stores: Sequence[Any],
        **options: Any,
    ) -> None:
        super().__init__(encoder, **options)
        if len(indexes) != len(text_stores):
            raise RetrievalError(f"{len(indexes)} indexes but {len(text_stores)} text stores")
        self.indexes, self.text_stores = list(indexes), list(text_stores)

    @property
    def shards(self) -> int:
        return len(self.indexes)

    @classmethod
    def from_run(
        cls, run: Any, encoder: Encoder | None = None, store: Any = None, **options: Any
    ) -> LocalRetriever:
        """Every shard of a run loaded from the store into this process."""
        from ttt.index.shard import load_shard

        store = store or open_run_store(run)
        shards = [load_shard(run, store, s) for s in range(run.spec.corpus.shards)]
        return cls(
            encoder or run_encoder(run),
            [i for i, _ in shards],
            [t for _, t in shards],
            **{**retrieval_options(run), **options},
        )

    def _fan_out(self, vectors, k, with_text, with_vectors=False):
        per_shard = {}
        for shard, (index, texts) in enumerate(zip(self.indexes, self.text_stores, strict=True)):
            d, labels = index.search(vectors, k)
            per_shard[shard] = [
                _local_hits(texts, dq, lq) for dq, lq in zip(d, labels, strict=True)
            ]
        merged = [
            merge_topk({s: per_shard[s][q] for s in per_shard}, k) for q in range(len(vectors))
        ]
        if with_text:
            merged = [
                [neighbor_with_text(n, self.text_stores[n.shard].text(n.row)) for n in ns]
                for ns in merged
            ]
        if with_vectors:
            merged = [[_with_vector(self.indexes[n.shard], n) for n in ns] for ns in merged]
        return merged, set()


def _with_vector(index: Any, n: Neighbor) -> Neighbor:
    from ttt.index.selection import reconstruct_rows

    return dataclasses.replace(n, vector=reconstruct_rows(index, [n.row])[0])


def _local_hits(texts: Any, distances: np.ndarray, labels: np.ndarray) -> Hits:
    keep = labels >= 0
    rows = labels[keep].tolist()
    metas = [texts.meta(r) for r in rows]
    return Hits(distances[keep].tolist(), rows, [m[0] for m in metas], [m[1] for m in metas])


def neighbor_with_text(n: Neighbor, text: str) -> Neighbor:
    return dataclasses.replace(n, text=text)


def open_run_store(run: Any) -> Any:
    from ttt.store import open_store

    return open_store(run.spec.storage)


def run_encoder(run: Any) -> Encoder:
    from ttt.embed import Encoder as TextEncoder

    return TextEncoder.from_spec(run.spec.embedding, run.spec.storage)


def retrieval_options(run: Any) -> dict:
    r = run.spec.retrieval
    return {
        "k": r.neighbors,
        "distance_threshold": r.distance_threshold,
        "exclude_identical": r.exclude_identical,
        "identical_distance": r.identical_distance,
        "allow_partial": r.allow_partial,
        "min_shards": r.min_shards,
    }
