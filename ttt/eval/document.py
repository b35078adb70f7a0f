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
    resetOptimizer false the optimizer state carries within a task: the sequential engine
    gets the documents in task order, a new task starting a fresh optimizer; the ensemble
    gets one stream per task (with its bytes) and trains several tasks at once, each
    member one task's documents in order, so records come in the order documents finish.
    `task` names the task whose carried optimizer state the engine holds already (a
    resumed rank), so its documents continue it rather than start afresh.
    """
    if progress is not None:  # the engine says when a document starts training
        engine.on_start = lambda facts: progress.start_document(facts.doc.id)
    if not run.spec.ttt.reset_optimizer and hasattr(engine, "evaluate_tasks"):
        # the ensemble with a carried optimizer: each member a task, several tasks at once
        groups: list[list[Document]] = []
        for doc in docs:
            if not groups or groups[-1][0].domain != doc.domain:
                groups.append([])
            groups[-1].append(doc)
        tasks = [
            (sum(d.nbytes for d in group), _retrieved(run, engine, retriever, group, rank))
            for group in groups
        ]
        resume = bool(docs) and docs[0].domain == task
        finished = engine.evaluate_tasks(tasks, resume_first=resume)
    else:
        finished = engine.evaluate_stream(_in_task_order(run, engine, retriever, docs, rank, task))
    for facts, outcome in finished:
        if progress is not None:
            progress.finish_document()
        yield document_record(facts, outcome, spec_hash, rank)


def _retrieved(
    run: Any, engine: Any, retriever: Any, docs: Sequence[Document], rank: int
) -> Iterator[tuple[DocumentFacts, str, list[str], list[float] | None]]:
    """One task's documents, each retrieved as the engine reads it."""
    for doc in docs:
        yield retrieve_document(run, engine, retriever, doc, rank)


def _in_task_order(
    run: Any, engine: Any, retriever: Any, docs: Sequence[Document], rank: int, task: str | None
) -> Iterator[tuple[DocumentFacts, str, list[str], list[float] | None]]:
    """The documents retrieved in order, engine.new_task() called as each task begins."""
    for doc in docs:
        if doc.domain != task:
            engine.new_task()
            task = doc.domain
        yield retrieve_document(run, engine, retriever, doc, rank)


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
