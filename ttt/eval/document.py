"""One test document's way through a rank: retrieved as the engine asks, trained on, recorded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ttt.corpus import Document
from ttt.eval.records import result_record
from ttt.eval.retrieve import DocumentFacts, retrieve_document


def evaluate_documents(
    run: Any,
    engine: Any,
    retriever: Any,
    docs: Sequence[Document],
    spec_hash: str,
    rank: int,
    progress: Any = None,
    task: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Result records of `docs`, in the order the engine finishes them (several train at once).

    Documents are retrieved as the engine asks for them, so retrieval overlaps training. With
    resetOptimizer false the sequential engine carries its optimizer state within a task:
    documents arrive in task order and a new task starts a fresh optimizer (the sequential
    engine has finished the previous document before it asks for the next).
    `task` names the task whose carried optimizer state the engine holds already (a
    resumed rank), so its documents continue it rather than start afresh.
    """

    def items() -> Iterator[tuple[DocumentFacts, str, list[str], list[float] | None]]:
        nonlocal task
        for doc in docs:
            if doc.domain != task:
                engine.new_task()
                task = doc.domain
            yield retrieve_document(run, engine, retriever, doc, rank)

    if progress is not None:  # the engine says when a document starts training
        engine.on_start = lambda facts: progress.start_document(facts.doc.id)
    for facts, outcome in engine.evaluate_stream(items()):
        if progress is not None:
            progress.finish_document()
        yield document_record(facts, outcome, spec_hash, rank)


def document_record(
    facts: DocumentFacts, outcome: Any, spec_hash: str, rank: int
) -> dict[str, Any]:
    """One document's result record from its retrieval facts and its training outcome."""
    selected = facts.selected
    return result_record(
        facts.doc,
        outcome,
        spec_hash=spec_hash,
        rank=rank,
        neighbors=len(facts.kept),
        excluded=len(facts.excluded) + facts.retriever_excluded,
        neighbor_ids=[n.id for n in facts.kept],
        excluded_ids=[n.id for n in facts.excluded],
        distances=facts.distances,
        distance_unit="euclidean",
        partial=facts.partial,
        failed_shards=facts.failed_shards,
        seconds={
            "retrieve": facts.retrieve_seconds,
            "train": float(outcome.seconds_training),
            "score": float(outcome.seconds_scoring),
            **({"select": selected["seconds"]} if selected else {}),
        },
        **({"selection": "sift", **selected["facts"]} if selected else {}),
    )
