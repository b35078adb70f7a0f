"""Several test documents at once: an ensemble of independent models over stacked weights.

Each member is one test document's (or, with a carried optimizer, one task's) copy of the
model: one row of an (E, P) float32 matrix and of StackedAdam. A step (ttt.engine.step)
trains every active member on its next chunk: all at once through the stacked forward
("stacked") or vmap(grad(functional_call)) ("vmap"), or member after member ("loop":
dropout masks equal to the sequential loop's). Scoring copies a row into the model (with
one member the model's parameters are the row) and calls the sequential loop's scoring,
or, on the stacked path with several members, scores every member due before a step in
one stacked forward (ttt.engine.score); the model is restored at the end.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ttt import telemetry
from ttt.bpb import DEFAULT_BATCH_TOKENS, DocScore, document_windows
from ttt.engine.adam import StackedAdam, load_row_state_dict, row_state_dict
from ttt.engine.compiled import compiled_adam_options, compiled_losses, train_views
from ttt.engine.feed import RESET, RESUME, Item, Plan, SharedFeed, TaskFeed, plan_document
from ttt.engine.members import (
    PATHS,
    choose_members,
    choose_path,
    has_dropout,
    rng_state,
)
from ttt.engine.precision import Precision, resolve_precision
from ttt.engine.rule import EngineError, compile_refused
from ttt.engine.score import stacked_logliks
from ttt.engine.stacked import unsupported as stacked_unsupported
from ttt.engine.step import MemberSteps
from ttt.outcome import DocOutcome
from ttt.train import TTTNN

log = logging.getLogger(__name__)


@dataclass
class _Member:
    plan: Plan
    outcome: DocOutcome
    last: int
    n: int = 0  # neighbors finished
    cursor: int = 0  # next chunk of neighbor n
    rng: list[torch.Tensor] = field(default_factory=list)
    step_losses: list[torch.Tensor] = field(default_factory=list)  # of neighbor n, on device
    neighbor_losses: list[torch.Tensor | None] = field(default_factory=list)  # per neighbor


class EnsembleTTT(MemberSteps):
    """TTT-NN on E documents at once, each document's result equal to TTTNN.evaluate's.

    Equal for method ttt-nn (every document starts from the saved weights): with a fresh
    optimizer per document, or, resetOptimizer false, one carried per task (evaluate_tasks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        ttt_spec: Any,
        *,
        rank: str = "0",
        seed: int = 0,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        members: int | None = None,
        path: str | None = None,
    ) -> None:
        if ttt_spec.method != "ttt-nn":
            raise ValueError("the ensemble engine runs method ttt-nn only")
        # resetOptimizer false: a member is a task, its documents with one carried optimizer
        self.carried = not ttt_spec.reset_optimizer
        self._resume: dict | None = None  # load_optimizer_state's, for evaluate_tasks
        self._yielded = 0  # the member whose document was handed out last
        self.spec = ttt_spec
        # the sequential loop: its texts, scoring, saved weights and exact restore, shared
        self.ref = TTTNN(
            model, tokenizer, ttt_spec, rank=rank, seed=seed, batch_tokens=batch_tokens
        )
        self.model, self.tokenizer = model, tokenizer
        self.device = self.ref.device
        self.precision: Precision = resolve_precision(ttt_spec.dtype, self.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for _, p in named):
            raise ValueError("the ensemble engine trains float32 master weights: load in float32")
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.shapes, self.sizes = [p.shape for p in self.params], [p.numel() for p in self.params]
        self.base = torch.cat([p.detach().reshape(-1) for p in self.params])
        # one saved copy: the sequential loop's (which restores the model) views the base
        for name, row, shape in zip(self.names, self.base.split(self.sizes), self.shapes):
            self.ref._saved[name] = row.view(shape)
        self.members = members or choose_members(model, ttt_spec, self.device)
        self.path = path or choose_path(model, self.members, self.precision.autocast)
        if self.path not in PATHS:
            raise ValueError(f"path {self.path!r}: expected one of {', '.join(PATHS)}")
        if self.path == "stacked" and (why := stacked_unsupported(model)) is not None:
            raise ValueError(f"path stacked: no stacked forward for this model: {why}")
        self.recompute = bool(getattr(ttt_spec, "recompute", False))
        if self.recompute and self.path != "stacked":
            # functorch's transforms and functional_call's swapped weights are gone by the
            # time a checkpoint runs its layer again: only the stacked forward recomputes
            raise EngineError(
                f"spec.ttt.recompute: the ensemble recomputes on the stacked path only, this "
                f"model takes the {self.path} path (engine: sequential recomputes any model)"
            )
        self.compile = bool(getattr(ttt_spec, "compile", False))
        if self.compile and (why := compile_refused(self.path, self.recompute)) is not None:
            raise EngineError(f"spec.ttt.compile: {why}")
        self.weights = self.base.repeat(self.members, 1)
        self.wave = self.members  # members per batched call: halved on out-of-memory
        # the members' weights per parameter, (E, *shape) views of the rows: autograd hands
        # back a gradient per parameter, which Adam takes as it is (no flat row to cat)
        self.stacked = [
            rows.view(self.members, *shape)
            for rows, shape in zip(self.weights.split(self.sizes, dim=1), self.shapes, strict=True)
        ]
        self.adam = StackedAdam(
            self.weights,
            lr=ttt_spec.learning_rate,
            eps=ttt_spec.eps,
            weight_decay=ttt_spec.weight_decay,
            decoupled=ttt_spec.optimizer == "adamw",
            shapes=self.shapes,
            **compiled_adam_options(model, self.compile, self.precision.autocast),
        )
        # what the training forward reads: the bf16 copy where Adam writes one, else the rows
        self.train_views = train_views(self.adam, self.stacked)
        if self.compile:
            self.losses = compiled_losses()
        # one member: the model's parameters are its weights (no copy of their own; scoring
        # reads them where they are, and the restore at the end writes them)
        self.shared = self.members == 1
        if self.shared:
            for p, rows in zip(self.params, self.stacked, strict=True):
                p.data = rows[0]
        self.seed, self.rank = seed, str(rank)
        # several members on the stacked path: those due for scoring before a step are scored
        # together through the stacked forward (ttt.engine.score), each with its own weights
        self.batch_scoring = self.path == "stacked" and self.members > 1
        self._due: list[tuple[int, _Member, int, list[int]]] = []
        # Called as on_neighbor(n, of, steps) after each neighbor (progress), with one member
        # only: with several, documents interleave and "the current document" has no meaning.
        self.on_neighbor: Any = None
        self.on_start: Any = None  # called with a document's key as it starts, likewise
        self.dropout = has_dropout(model)
        # CPU SDPA's backward has no vmap batching rule: eager attention there. Elsewhere
        # None = not known yet; the first vmap step finds out (see _grads_vmap)
        self.eager_attention: bool | None = True if self.device.type == "cpu" else None

    # -- the interface TTTNN offers --

    def query_text(self, text: str) -> str:
        return self.ref.query_text(text)

    def new_task(self) -> None:
        """Nothing to do: evaluate_tasks resets an optimizer as its member takes a task."""

    def optimizer_state(self) -> bytes:
        """The carried optimizer of the document handed out last, just after it, as the
        sequential loop serializes its own (torch's Adam(W) state_dict): what the next
        document of its task starts from (ttt.eval.carried saves it with the records)."""
        buffer = io.BytesIO()
        groups = self.ref.optimizer.state_dict()["param_groups"]
        torch.save(row_state_dict(self.adam, self._yielded, self.shapes, groups), buffer)
        return buffer.getvalue()

    def load_optimizer_state(self, data: bytes) -> None:
        """What evaluate_tasks(resume_first=True)'s first task continues (a resumed rank)."""
        self._resume = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def evaluate(
        self, text: str, neighbors: list[str], *, distances: list[float] | None = None
    ) -> DocOutcome:
        """One document, as TTTNN.evaluate (an ensemble of one)."""
        ((_, outcome),) = list(self.evaluate_stream([(0, text, neighbors, distances)]))
        return outcome

    def _plan(self, item: Item) -> Plan:
        """A document's plan (runs on the prefetch thread while the device works)."""
        return plan_document(item, self.tokenizer, self.spec, self.ref)

    # -- the stream --

    def evaluate_stream(self, items: Iterable[Item]) -> Iterator[tuple[Any, DocOutcome]]:
        """(key, outcome) per document, in the order documents finish; E train at a time.

        With resetOptimizer false the stream is one task: its documents in order with one
        carried optimizer (evaluate_tasks runs several tasks at once).
        """
        if self.carried:
            return self.evaluate_tasks([(0, items)], resume_first=True)
        return self._run(lambda pool: SharedFeed(items, self._plan, self.members, pool))

    def evaluate_tasks(
        self, tasks: Iterable[tuple[int, Iterable[Item]]], *, resume_first: bool = False
    ) -> Iterator[tuple[Any, DocOutcome]]:
        """resetOptimizer false: each member a task, its documents in order with its own
        carried Adam(W), reset between tasks; `tasks` are (bytes, documents) pairs, largest
        first to the member that frees first. With `resume_first` the first task continues
        the state given to load_optimizer_state (else it starts afresh, as every other)."""
        if not self.carried:
            raise ValueError("evaluate_tasks carries the optimizer: resetOptimizer false only")
        tasks = list(tasks)
        return self._run(
            lambda pool: TaskFeed(tasks, self._plan, self.members, pool, resume_first=resume_first)
        )

    def _run(self, make_feed: Any) -> Iterator[tuple[Any, DocOutcome]]:
        pool = ThreadPoolExecutor(1, thread_name_prefix="ttt-tokenize")
        slots: list[_Member | None] = [None] * self.members
        try:
            with torch.random.fork_rng(devices=self.ref._rng_devices()):
                feed = make_feed(pool)
                while True:
                    done = self._fill(slots, feed)
                    feed.refill()
                    yield from self._hand_out(done)
                    if done:  # fill the members that finished at once before a step
                        continue
                    if not any(slots):
                        return
                    yield from self._hand_out(self._step(slots))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.ref.reset()

    def _hand_out(
        self, done: list[tuple[int, Any, DocOutcome]]
    ) -> Iterator[tuple[Any, DocOutcome]]:
        for e, key, outcome in done:
            # optimizer_state() between these yields is member e's, just after this document
            self._yielded = e
            yield key, outcome

    def _fill(self, slots: list[_Member | None], feed: Any) -> list[tuple[int, Any, DocOutcome]]:
        """Start a document in each free slot; returns those that finish without a step
        (a slot that finishes one at once waits for the next call: its state is handed out
        first)."""
        done = []
        for e in range(self.members):
            if slots[e] is not None:
                continue
            got = feed.next(e)
            if got is None:
                continue
            member = self._start(e, *got)
            finished = self._advance(e, member)
            if finished is None:
                slots[e] = member
            else:
                done.append((e, *finished))
        self._flush_scores()  # before any outcome is handed out or any weight changes
        return done

    def _start(self, e: int, plan: Plan, optimizer: str = RESET) -> _Member:
        self.weights[e].copy_(self.base)  # bit-identical start: the saved weights
        self.adam.refresh(e)  # and its bf16 copy, where Adam keeps one
        if optimizer == RESET:
            self.adam.reset(e)
        elif optimizer == RESUME:
            load_row_state_dict(self.adam, e, self._resume or {}, self.sizes)
        checkpoints = self.spec.eval_after
        member = _Member(plan, DocOutcome(method="ttt-nn"), last=len(plan.steps))
        if self.on_start is not None and self.members == 1:
            self.on_start(plan.key)
        if self.dropout:
            torch.manual_seed(self.seed)  # the sequential loop seeds every document alike
            member.rng = rng_state(self.device)
        self._score(e, member, 0, checkpoints)
        return member

    def _advance(self, e: int, member: _Member) -> tuple[Any, DocOutcome] | None:
        """Close finished neighbors (scoring those due); the outcome once the plan is done."""
        while member.n < member.last and member.cursor >= len(member.plan.steps[member.n]):
            # the sequential loop's training loss of a neighbor: the mean over its steps
            steps = member.step_losses  # a neighbor without a chunk: no loss (nan)
            member.neighbor_losses.append(torch.stack(steps).mean() if steps else None)
            member.step_losses = []
            member.n += 1
            member.cursor = 0
            member.outcome.neighbors_used = member.n
            self._score(e, member, member.n, self.spec.eval_after)
            if self.on_neighbor is not None and self.members == 1:
                self.on_neighbor(member.n, member.last, member.outcome.train_steps)
        if member.n < member.last:
            return None
        if member.neighbor_losses:  # one host sync per document, not per step
            known = [loss for loss in member.neighbor_losses if loss is not None]
            values = iter(torch.stack(known).tolist() if known else [])
            member.outcome.train_losses = [
                float("nan") if loss is None else next(values) for loss in member.neighbor_losses
            ]
        self._count(member.outcome)
        return member.plan.key, member.outcome

    def _score(self, e: int, member: _Member, n: int, checkpoints: list[int]) -> None:
        due = [c for c in checkpoints if c == n or (n == member.last and c > member.last)]
        if not due:
            return
        if self.batch_scoring:  # with every other member due before the next step
            self._due.append((e, member, n, due))
            return
        self._score_alone(e, member, n, checkpoints)

    def _score_alone(self, e: int, member: _Member, n: int, checkpoints: list[int]) -> None:
        """Member e's document through the model, as the sequential loop scores it."""
        if not self.shared:  # else the parameters are the member's weights already
            with torch.no_grad():
                for p, rows in zip(self.params, self.stacked, strict=True):
                    p.copy_(rows[e])
        with self.precision.scoring():  # the training's precision; log-softmax in float32
            self.ref._score_due(member.outcome, member.plan.scored, n, checkpoints, member.last)

    def _count(self, outcome: DocOutcome) -> None:
        telemetry.TRAIN_TOKENS.labels(self.rank).inc(outcome.train_tokens)
        telemetry.TRAIN_STEPS.labels(self.rank).inc(outcome.train_steps)

    # -- one step of every active member (the machinery: ttt.engine.step) --

    def _step(self, slots: list[_Member | None]) -> list[tuple[int, Any, DocOutcome]]:
        start = time.perf_counter()
        chunks = [m.plan.steps[m.n][m.cursor] if m is not None else None for m in slots]
        losses = self.train_step(self.inputs(chunks), slots)
        share = (time.perf_counter() - start) / sum(c is not None for c in chunks)
        done = []
        for e, member in enumerate(slots):
            if member is None:
                continue
            chunk = chunks[e]
            member.step_losses.append(losses[e])
            member.outcome.train_steps += 1
            member.outcome.train_tokens += len(chunk)
            member.outcome.seconds_training += share
            member.cursor += 1
            finished = self._advance(e, member)
            if finished is not None:
                slots[e] = None
                done.append((e, *finished))
        self._flush_scores()
        return done

    def _flush_scores(self) -> None:
        """Score every member due since the last step in one stacked forward per run of
        neighbouring members (their weights are then views: no copy), one read-back in all."""
        if not self._due:
            return
        due, self._due = self._due, []
        try:
            self._score_together(due)
        except torch.OutOfMemoryError:  # nothing recorded yet: each alone, as the loop does
            log.warning("out of memory scoring %d members at once: scoring one by one", len(due))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for e, member, n, checkpoints in due:
                self._score_alone(e, member, n, checkpoints)

    def _score_together(self, due: list[tuple[int, _Member, int, list[int]]]) -> None:
        start = time.perf_counter()
        texts = {e: member.plan.scored for e, member, _, _ in due}  # a member's own document
        docs = {  # (token ids, windows)
            e: document_windows(self.tokenizer, t, self.ref.max_length, self.ref.eot)
            for e, t in texts.items()
        }
        logliks: dict[int, float] = {}
        with self.precision.scoring():
            for a, b in _runs(sorted(docs)):
                weights = {n: w[a:b] for n, w in zip(self.names, self.stacked, strict=True)}
                found = stacked_logliks(
                    self.model, weights, [docs[e][1] for e in range(a, b)], self.ref.batch_tokens
                )
                logliks.update(zip(range(a, b), found, strict=True))
        seconds = (time.perf_counter() - start) / len(due)  # the pass's time, shared
        for e, member, n, checkpoints in due:
            score = DocScore.of(texts[e], docs[e][0], logliks[e])
            self.ref._record(member.outcome, checkpoints, n, score, seconds)


def _runs(members: list[int]) -> list[tuple[int, int]]:
    """Sorted member indices as ranges [a, b) of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for e in members:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs
