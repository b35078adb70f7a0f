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


# what a pull returns once its source is done (a document is never this object)
_END = object()


def _pull(source: Iterator[Any], plan: Callable[[Any], Any]) -> Any:
    """The source's next document, planned, or _END: runs on the feed's pool thread, so the
    source's own work (retrieval, in the eval stage) overlaps the device's. The pool has one
    thread: a source is only ever advanced there, one pull after the other, in order."""
    item = next(source, _END)
    return _END if item is _END else plan(item)


class SharedFeed:
    """resetOptimizer true: any free member takes the next document of one stream, with a
    fresh optimizer. `members` documents are read ahead (retrieved, in the eval stage) and
    tokenized on `pool`'s one thread while the device trains; the main thread only waits
    for a document when a member needs it. An error from the stream is raised as that
    document is taken."""

    def __init__(
        self,
        items: Iterable[Any],
        plan: Callable[[Any], Any],
        members: int,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.source, self.plan, self.members, self.pool = iter(items), plan, members, pool
        self.ahead: deque[Future[Any]] = deque()
        self.done = False  # a pull found the stream's end
        self.refill()

    def refill(self) -> None:
        while not self.done and len(self.ahead) < self.members:
            self.ahead.append(self.pool.submit(_pull, self.source, self.plan))

    def next(self, member: int) -> tuple[Any, str] | None:
        """(the document's plan, RESET) for a free member, or None when the stream is done."""
        if not self.ahead:
            self.refill()
        if not self.ahead:
            return None
        got = self.ahead.popleft().result()
        if got is _END:  # the pulls behind it find the end too
            self.done = True
            self.ahead.clear()
            return None
        return got, RESET


class TaskFeed:
    """resetOptimizer false: a member takes a whole task, its documents in order with one
    carried optimizer, reset when it takes the next task. Tasks go largest first to the
    member that frees first (balanced by bytes); each member reads one document ahead, on
    `pool`'s one thread (retrieval, in the eval stage, overlaps the device's work).

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
        """The member's next document, pulled and planned on the pool's thread."""
        source = self.current[member]
        self.ahead[member] = None if source is None else self.pool.submit(_pull, source, self.plan)

    def next(self, member: int) -> tuple[Any, str] | None:
        """(the member's next plan, KEEP/RESET/RESUME), or None when no task is left."""
        start = KEEP
        while True:
            future = self.ahead[member]
            got = _END if future is None else future.result()
            if got is not _END:
                self._read(member)  # the document after it, while this one trains
                return got, start
            # its task is done (or none yet): the next task, largest first
            if not self.pending:
                self.current[member] = self.ahead[member] = None
                return None
            _, index, docs = self.pending.popleft()
            start = RESUME if index == 0 and self.resume_first else RESET
            self.current[member] = iter(docs)
            self._read(member)
