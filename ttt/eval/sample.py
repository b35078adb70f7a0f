"""Which test documents a run evaluates (the reference code's sample), and each rank's share."""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ttt.corpus import Document, iter_documents
from ttt.corpus.documents import BadLine
from ttt.eval.errors import EvalError

log = logging.getLogger(__name__)


def select_test_documents(
    run: Any, store: Any = None, skipped: set[str] | None = None
) -> list[Document]:
    """The evaluation set: per task, the spec's portion of its test documents, shuffled.

    selection "reference" (default) is tttlm's: per task in the test files' order,
    `random.Random()` seeded with `seed` shuffles, the first `int(portion * n)` are taken (a
    small task may give none). "sorted-ids": ids sorted, a generator seeded by (seed, task),
    at least one per task. Both deterministic, tasks sorted by name.

    A line the reader skips but the reference reads as a document (empty text, a lone
    surrogate) keeps its place in its task's shuffle, so the sample is the reference's; it is
    dropped afterwards (logged), or, with `skipped` given, returned as an empty placeholder
    (its id added to `skipped`) so that a rank's split keeps the reference's positions too.
    """
    spec = run.spec
    if not spec.corpus.test:
        raise EvalError(f"run {run.name}: spec.corpus.test names no test files")
    # Two passes: ids first, texts of the selected only, so a worker never holds the
    # whole test set (the Pile's is about 1.4 GB of text) in memory.
    by_task: dict[str, list[str]] = {}
    lines: list[BadLine] = []  # the reader appends a skipped line before the next document
    held: dict[str, BadLine] = {}

    def flush() -> None:
        for bad in lines:
            by_task.setdefault(str(bad.domain), []).append(str(bad.doc_id))
            held[str(bad.doc_id)] = bad
        lines.clear()

    for doc in iter_documents(
        spec.corpus.test, store=store, strict=spec.corpus.strict, skipped=lines
    ):
        flush()  # in the file's order: the skipped lines before this document first
        by_task.setdefault(doc.domain, []).append(doc.id)
    flush()
    if spec.eval.tasks == "all":
        tasks = sorted(by_task)
    else:
        missing = [t for t in spec.eval.tasks if t not in by_task]
        if missing:
            raise EvalError(
                f"run {run.name}: spec.eval.tasks names {missing}, absent from the test files "
                f"(tasks there: {sorted(by_task)})"
            )
        tasks = sorted(set(spec.eval.tasks))
    order: list[str] = []
    for task in tasks:
        if spec.eval.selection == "reference":
            pool = list(by_task[task])  # the test files' order
            random.Random(spec.eval.seed).shuffle(pool)  # = Random(); seed(1216) as tttlm
            count = int(spec.eval.portion * len(pool))
        else:
            # the order of the files must not matter; skipped lines hold no place here
            pool = sorted(i for i in by_task[task] if i not in held)
            random.Random(f"{spec.eval.seed}:{task}").shuffle(pool)
            count = max(1, math.floor(spec.eval.portion * len(pool) + 0.5))
        if spec.eval.max_documents_per_task is not None:
            count = min(count, spec.eval.max_documents_per_task)
        order.extend(pool[:count])
    wanted = set(order)
    found = {
        doc.id: doc
        for doc in iter_documents(spec.corpus.test, store=store, strict=spec.corpus.strict)
        if doc.id in wanted
    }
    dropped = [i for i in order if i in held]
    if dropped:
        log.warning(
            "run %s: %d selected test document(s) the reader skips (empty text or a lone "
            "surrogate) keep their place in the sample and are not evaluated, e.g. %s",
            run.name,
            len(dropped),
            held[dropped[0]],
        )
    if skipped is None:
        return [found[i] for i in order if i not in held]
    skipped.update(dropped)
    out = []
    for i in order:
        if i in held:
            b = held[i]
            out.append(Document(i, str(b.domain), "", 0, b.source, b.line))
        else:
            out.append(found[i])
    return out


SPLITS = ("bytes", "strided")


def split_for(run: Any) -> str:
    """How a run's documents split over workers: with the optimizer carried within a task a
    document's result depends on the documents before it on its worker, so the reference's
    split (strided per task); otherwise balanced by bytes."""
    return "bytes" if run.spec.ttt.reset_optimizer else "strided"


def partition(
    docs: Sequence[Document], rank: int, world_size: int, split: str = "bytes"
) -> list[Document]:
    """The documents of one rank: every document in exactly one rank.

    bytes: longest-first greedy assignment to the lightest rank (ties: the lower rank), so the
    slowest rank finishes soon after the others; each rank keeps the input order.
    strided: as tttlm's eval_tttlm.py, per task `task_docs[rank::world_size]` of the task's
    documents in selection order (tasks in the selection's order).
    """
    if world_size < 1:
        raise EvalError(f"world size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside 0..{world_size - 1}")
    if split == "strided":
        by_task: dict[str, list[Document]] = {}
        for doc in docs:
            by_task.setdefault(doc.domain, []).append(doc)
        return [d for task_docs in by_task.values() for d in task_docs[rank::world_size]]
    if split != "bytes":
        raise EvalError(f"split {split!r} is not one of {SPLITS}")
    heap = [(0, r) for r in range(world_size)]
    owner: dict[int, int] = {}
    order = sorted(range(len(docs)), key=lambda i: (-docs[i].nbytes, docs[i].id))
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + docs[i].nbytes, r))
    return [doc for i, doc in enumerate(docs) if owner[i] == rank]


def resolve_rank(
    rank: int | None, world_size: int | None, environ: Mapping[str, str], default_world: int
) -> tuple[int, int]:
    """Rank and world size from arguments, else RANK / JOB_COMPLETION_INDEX and WORLD_SIZE."""

    def from_env(var: str) -> int | None:
        value = environ.get(var, "")
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise EvalError(f"environment variable {var}={value!r} is not an integer") from None

    if rank is None:
        # RANK: torchrun and hand-made Jobs; JOB_COMPLETION_INDEX: a Kubernetes Indexed Job
        rank = from_env("RANK")
        if rank is None:
            rank = from_env("JOB_COMPLETION_INDEX")
    if world_size is None:
        world_size = from_env("WORLD_SIZE")
    rank = 0 if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    return rank, world_size


# --- the rank worker -------------------------------------------------------------------------
