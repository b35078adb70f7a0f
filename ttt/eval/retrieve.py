"""One document's neighbors: retrieved (waiting for shards), guarded, maybe chosen by SIFT."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ttt import telemetry
from ttt.corpus import Document
from ttt.eval.errors import EvalError
from ttt.index.retrieval import ShardsUnavailable, euclidean
from ttt.train import select_neighbors


def guard_neighbors(text: str, neighbors: Sequence[Any], retrieval: Any) -> tuple[list, list]:
    """(kept, excluded) neighbors, nearest first: the distance threshold, then the leakage guard.

    The rule is train.select_neighbors' (one definition); it is applied neighbor by neighbor
    here so that the record can name which neighbors were used and which were excluded.
    Neighbors carry FAISS's squared L2; the rule compares Euclidean distances.
    """
    kept, excluded = [], []
    for n in sorted(neighbors, key=lambda n: n.distance):
        verdict = select_neighbors(
            text,
            [n.text or ""],
            [euclidean(n.distance)],
            distance_threshold=retrieval.distance_threshold,
            exclude_identical=retrieval.exclude_identical,
            identical_distance=retrieval.identical_distance,
        )
        if verdict.texts:
            kept.append(n)
        elif verdict.excluded_identical:
            excluded.append(n)
    return kept, excluded


log = logging.getLogger(__name__)


@dataclass
class DocumentFacts:
    """What retrieval found for one document, carried through the engine to its record."""

    doc: Document
    kept: list[Any] = field(default_factory=list)  # the neighbors it trains on, in order
    distances: list[float] = field(default_factory=list)  # of `kept`, Euclidean
    excluded: list[Any] = field(default_factory=list)  # removed by the leakage guard here
    retriever_excluded: int = 0  # removed by the retriever's own guard (counted only)
    partial: bool = False  # some shard did not answer and the spec allowed it
    failed_shards: list[int] = field(default_factory=list)
    retrieve_seconds: float = 0.0
    # SIFT: {"seconds": selection time, "facts": what the record says}; empty for nearest
    selected: dict[str, Any] = field(default_factory=dict)


def needs_neighbors(run: Any) -> bool:
    """Whether the run's method trains on (or conditions on) retrieved neighbors at all."""
    t = run.spec.ttt
    return run.spec.retrieval.neighbors > 0 and t.method != "dynamic-eval"


def retrieve_document(
    run: Any, engine: Any, retriever: Any, doc: Document, rank: int
) -> tuple[DocumentFacts, str, list[str], list[float] | None]:
    """(facts, text, neighbor texts, distances): one document's neighbors, guarded (and chosen
    by SIFT when the spec says so), as the engine's stream takes them."""
    retrieval_spec = run.spec.retrieval
    k = retrieval_spec.neighbors
    kept: list[Any] = []
    excluded: list[Any] = []
    retriever_excluded = 0
    partial, failed = False, []
    start = time.perf_counter()
    sift = retrieval_spec.selection == "sift"
    selected: dict[str, Any] = {}
    if retriever is not None and needs_neighbors(run):
        query = engine.query_text(doc.text)
        # SIFT: K' candidates with their vectors; it picks k of them below
        want = retrieval_spec.candidate_count if sift else k
        result = retrieve_waiting(retriever, query, want, rank, retrieval_spec.wait_seconds, sift)
        # The retriever guards against the query; in split-text mode that is half the
        # document, so the whole document is checked here too.
        kept, excluded = guard_neighbors(doc.text, result.neighbors, retrieval_spec)
        retriever_excluded = int(getattr(result, "excluded", 0))
        partial, failed = bool(result.partial), sorted(result.failed_shards)
        if sift:
            kept, selected = sift_picks(kept, result.query_vector, k, retrieval_spec)
    retrieve_seconds = time.perf_counter() - start - selected.get("seconds", 0.0)
    distances = [euclidean(n.distance) for n in kept]  # the record's and in-context's unit
    facts = DocumentFacts(
        doc, kept, distances, excluded, retriever_excluded, partial, failed, retrieve_seconds,
        selected,
    )  # fmt: skip
    # SIFT's picks train in pick order (its most informative first), so the loop is not
    # given distances to re-order by; the threshold was applied to the candidates already.
    return facts, doc.text, [n.text for n in kept], None if sift else distances


def retrieve_waiting(
    retriever: Any, query: str, k: int, rank: int, wait_seconds: float, vectors: bool = False
) -> Any:
    """The query's retrieval, waiting (bounded, with backoff) while too few shards answer.

    A shard not yet ready or restarting must not turn into a document scored on fewer
    neighbors: the worker waits, says so in its log and in ttt_eval_waiting_for_shards /
    ttt_eval_retrieval_waits_total, and fails after `wait_seconds` (its Job retries it).
    """
    start, pause = time.monotonic(), 1.0
    label = str(rank)
    try:
        while True:
            try:
                extra = {"with_vectors": True} if vectors else {}  # SIFT's candidates
                (result,) = retriever.search([query], k=k, with_text=True, **extra)
                return result
            except ShardsUnavailable as exc:
                waited = time.monotonic() - start
                if waited >= wait_seconds:
                    raise EvalError(
                        f"eval rank {rank}: shards {exc.failed} did not answer for "
                        f"{waited:.0f} s (spec.retrieval.waitSeconds): {exc}"
                    ) from exc
                telemetry.EVAL_RETRIEVAL_WAITS.labels(label).inc()
                telemetry.EVAL_WAITING.labels(label).set(1)
                sleep = min(pause, wait_seconds - waited)
                log.warning(
                    "eval rank %d: waiting %.1f s for shard(s) %s (waited %.0f of %.0f s): %s",
                    rank,
                    sleep,
                    exc.failed,
                    waited,
                    wait_seconds,
                    exc,
                )
                time.sleep(sleep)
                pause = min(2 * pause, 30.0)
    finally:
        telemetry.EVAL_WAITING.labels(label).set(0)


def sift_picks(candidates: list, query_vector: Any, k: int, retrieval: Any) -> tuple[list, dict]:
    """SIFT's k picks among the guarded candidates, and what the record says about them."""
    from ttt.index.selection import choose_neighbors

    start = time.perf_counter()
    picked, selection = choose_neighbors(candidates, query_vector, k, "sift", retrieval.sift_lambda)
    seconds = time.perf_counter() - start
    facts = {
        "candidates": len(candidates),
        # each neighbor's rank by distance among the candidates (0 = nearest): what SIFT
        # chose that nearest neighbors would not have
        "neighbor_ranks": selection.indices,
        "sift_variances": selection.variances,
    }
    return picked, {"seconds": seconds, "facts": facts}
