"""Where each ensemble member's next document comes from: one shared stream, or whole tasks."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ttt.train import chunk_tokens

# (key, text, neighbors, distances or None): one test document as the stream gives it
Item = tuple[Any, str, list[str], list[float] | None]

# what a member does with its optimizer row as a document starts
RESET, KEEP, RESUME = "reset", "keep", "resume"


@dataclass
class Plan:
    """One document, tokenized: what to score and the steps to take, neighbor by neighbor."""

    key: Any
    scored: str
    steps: list[list[list[int]]]  # per neighbor: its chunks, steps_per_neighbor times over


def plan_document(item: Item, tokenizer: Any, spec: Any, ref: Any) -> Plan:
    """A document's neighbors in TTTNN.evaluate's order, cut into its training chunks;
    `ref` is the sequential loop (ttt.train.TTTNN) whose texts and chunk length it shares."""
    key, text, neighbors, distances = item
    if distances is not None:  # TTTNN.evaluate's order: by distance, stable, then reversed
        if len(distances) != len(neighbors):
            raise ValueError(f"{len(neighbors)} neighbors but {len(distances)} distances")
        order = sorted(range(len(neighbors)), key=lambda i: distances[i])
        neighbors = [neighbors[i] for i in order]
    if spec.order == "farthest-first":
        neighbors = neighbors[::-1]
    last = min(max(spec.eval_after, default=0), len(neighbors))
    steps = []
    for neighbor in neighbors[:last]:
        ids = tokenizer.encode(neighbor, add_special_tokens=False)
        chunks = chunk_tokens(ids, ref.max_length, spec.chunk_stride)
        steps.append(chunks * spec.steps_per_neighbor)
    return Plan(key, ref.scored_text(text), steps)


class SharedFeed:
    """resetOptimizer true: any free member takes the next document of one stream, with a
    fresh optimizer. `members` documents are read ahead and tokenized on `pool`'s thread
    while the device trains (retrieval, in the eval stage, happens as they are read)."""

    def __init__(
        self,
        items: Iterable[Any],
        plan: Callable[[Any], Any],
        members: int,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.source, self.plan, self.members, self.pool = iter(items), plan, members, pool
        self.ahead: deque[Future[Any]] = deque()
        self.refill()

    def refill(self) -> None:
        while len(self.ahead) < self.members:
            item = next(self.source, None)
            if item is None:
                return
            self.ahead.append(self.pool.submit(self.plan, item))

    def next(self, member: int) -> tuple[Any, str] | None:
        """(the document's plan, RESET) for a free member, or None when the stream is done."""
        if not self.ahead:
            return None
        return self.ahead.popleft().result(), RESET


class TaskFeed:
    """resetOptimizer false: a member takes a whole task, its documents in order with one
    carried optimizer, reset when it takes the next task. Tasks go largest first to the
    member that frees first (balanced by bytes); each member reads one document ahead.

    `tasks` are (bytes, documents) pairs; with `resume_first` the first task continues the
    optimizer state loaded before (a resumed rank) instead of starting afresh.
    """

    def __init__(
        self,
        tasks: Iterable[tuple[int, Iterable[Any]]],
        plan: Callable[[Any], Any],
        members: int,
        pool: ThreadPoolExecutor,
        *,
        resume_first: bool = False,
    ) -> None:
        listed = [(nbytes, i, docs) for i, (nbytes, docs) in enumerate(tasks)]
        # largest first, ties in the given order (longest-processing-time-first)
        self.pending = deque(sorted(listed, key=lambda t: (-t[0], t[1])))
        self.count = len(listed)
        self.resume_first = resume_first
        self.plan, self.pool = plan, pool
        self.current: list[Iterator[Any] | None] = [None] * members
        self.ahead: list[Future[Any] | None] = [None] * members

    def refill(self) -> None:
        """Nothing shared to read ahead: each member reads its own task's next document."""

    def _read(self, member: int) -> None:
        source = self.current[member]
        item = next(source, None) if source is not None else None
        self.ahead[member] = None if item is None else self.pool.submit(self.plan, item)

    def next(self, member: int) -> tuple[Any, str] | None:
        """(the member's next plan, KEEP/RESET/RESUME), or None when no task is left."""
        start = KEEP
        if self.ahead[member] is None:  # its task is done (or none yet): the next task
            while self.ahead[member] is None:
                if not self.pending:
                    self.current[member] = None
                    return None
                _, index, docs = self.pending.popleft()
                start = RESUME if index == 0 and self.resume_first else RESET
                self.current[member] = iter(docs)
                self._read(member)
        future = self.ahead[member]
        assert future is not None
        self._read(member)  # the document after it, while this one trains
        return future.result(), start
