"""One test document's way through a rank: its neighbors (waiting for missing shards, guarded,
optionally chosen by SIFT), the engine that trains on them, and its result record."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ttt import telemetry
from ttt.corpus import Document
from ttt.index.retrieval import euclidean
from ttt.results import result_record
from ttt.train import select_neighbors

log = logging.getLogger("ttt.eval")


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


def needs_neighbors(run: Any) -> bool:
    t = run.spec.ttt
    return run.spec.retrieval.neighbors > 0 and t.method != "dynamic-eval"


def evaluate_documents(
    run: Any,
    engine: Any,
    retriever: Any,
    docs: Sequence[Document],
    spec_hash: str,
    rank: int,
    progress: Any = None,
) -> Iterator[dict[str, Any]]:
    """Result records of `docs`, in the order the engine finishes them (several train at once).

    Documents are retrieved as the engine asks for them, so retrieval overlaps training. With
    resetOptimizer false the sequential engine carries its optimizer state within a task:
    documents arrive in task order and a new task starts a fresh optimizer (the sequential
    engine has finished the previous document before it asks for the next).
    """

    def items() -> Iterator[tuple]:
        task = None
        for doc in docs:
            if doc.domain != task:
                engine.new_task()
                task = doc.domain
            yield retrieve_document(run, engine, retriever, doc, rank)

    if progress is not None:  # the engine says when a document starts training
        engine.on_start = lambda facts: progress.start_document(facts[0].id)
    for facts, outcome in engine.evaluate_stream(items()):
        if progress is not None:
            progress.finish_document()
        yield document_record(facts, outcome, spec_hash, rank)


def retrieve_document(run: Any, engine: Any, retriever: Any, doc: Document, rank: int) -> tuple:
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
    facts = (
        doc, kept, distances, excluded, retriever_excluded, partial, failed, retrieve_seconds,
        selected,
    )  # fmt: skip
    # SIFT's picks train in pick order (its most informative first), so the loop is not
    # given distances to re-order by; the threshold was applied to the candidates already.
    return facts, doc.text, [n.text for n in kept], None if sift else distances


def document_record(facts: tuple, outcome: Any, spec_hash: str, rank: int) -> dict[str, Any]:
    """One document's result record from its retrieval facts and its training outcome."""
    (
        doc, kept, distances, excluded, retriever_excluded, partial, failed, retrieve_seconds,
        selected,
    ) = facts  # fmt: skip
    return result_record(
        doc,
        outcome,
        spec_hash=spec_hash,
        rank=rank,
        neighbors=len(kept),
        excluded=len(excluded) + retriever_excluded,
        neighbor_ids=[n.id for n in kept],
        excluded_ids=[n.id for n in excluded],
        distances=distances,
        distance_unit="euclidean",
        partial=partial,
        failed_shards=failed,
        seconds={
            "retrieve": retrieve_seconds,
            "train": float(outcome.seconds_training),
            "score": float(outcome.seconds_scoring),
            **({"select": selected["seconds"]} if selected else {}),
        },
        **({"selection": "sift", **selected["facts"]} if selected else {}),
    )


def retrieve_waiting(
    retriever: Any, query: str, k: int, rank: int, wait_seconds: float, vectors: bool = False
) -> Any:
    """The query's retrieval, waiting (bounded, with backoff) while too few shards answer.

    A shard not yet ready or restarting must not turn into a document scored on fewer
    neighbors: the worker waits, says so in its log and in ttt_eval_waiting_for_shards /
    ttt_eval_retrieval_waits_total, and fails after `wait_seconds` (its Job retries it).
    """
    from ttt.eval import EvalError  # eval imports this module
    from ttt.index.retrieval import ShardsUnavailable

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
