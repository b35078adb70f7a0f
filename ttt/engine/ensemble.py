"""Several test documents at once: an ensemble of independent models over stacked weights.

Each member is one test document's (or, with a carried optimizer, one task's) copy of the
model: one row of an (E, P) float32 matrix and of StackedAdam. A step trains every active
member on its next chunk, all at once with vmap(grad(functional_call)) ("vmap") or member
after member ("loop": dropout masks equal to the sequential loop's). Scoring copies a row
into the model and calls the sequential loop's scoring; the model is restored at the end.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

from ttt import telemetry
from ttt.bpb import DEFAULT_BATCH_TOKENS
from ttt.engine.adam import StackedAdam, clip_scales, load_row_state_dict, row_state_dict
from ttt.engine.attention import training_attention
from ttt.engine.feed import RESET, RESUME, Item, Plan, SharedFeed, TaskFeed, plan_document
from ttt.engine.members import (
    choose_members,
    choose_path,
    has_dropout,
    rng_state,
    set_rng_state,
)
from ttt.engine.precision import Precision, resolve_precision
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


class EnsembleTTT:
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
        self.path = path or choose_path(model, self.members)
        if self.path not in ("vmap", "loop"):
            raise ValueError(f"path {self.path!r}: expected 'vmap' or 'loop'")
        self.weights = self.base.repeat(self.members, 1)
        self.adam = StackedAdam(
            self.weights,
            lr=ttt_spec.learning_rate,
            eps=ttt_spec.eps,
            weight_decay=ttt_spec.weight_decay,
            decoupled=ttt_spec.optimizer == "adamw",
        )
        self.seed, self.rank = seed, str(rank)
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
        return done

    def _start(self, e: int, plan: Plan, optimizer: str = RESET) -> _Member:
        self.weights[e].copy_(self.base)  # bit-identical start: the saved weights
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
        with torch.no_grad():
            for p, row in zip(self.params, self.weights[e].split(self.sizes), strict=True):
                p.copy_(row.view(p.shape))
        self.ref._score_due(member.outcome, member.plan.scored, n, checkpoints, member.last)

    def _count(self, outcome: DocOutcome) -> None:
        telemetry.TRAIN_TOKENS.labels(self.rank).inc(outcome.train_tokens)
        telemetry.TRAIN_STEPS.labels(self.rank).inc(outcome.train_steps)

    # -- one step of every active member --

    def _loss(
        self, flat: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, causal: Any = None
    ) -> torch.Tensor:
        """Mean next-token loss of one member on one chunk; `mask` marks the real targets,
        `causal` is eager attention's additive causal mask (else none is built)."""
        views = (c.view(s) for c, s in zip(flat.split(self.sizes), self.shapes, strict=True))
        params = dict(zip(self.names, views, strict=True))
        with self.precision.context():
            # no cache (training_attention builds no mask either): no host values per forward
            kwargs = {"input_ids": ids[None], "use_cache": False}
            if causal is not None:  # 4-D: transformers takes it as it is
                kwargs["attention_mask"] = causal
            out = functional_call(self.model, params, (), kwargs)
        logp = out.logits[0, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, ids[1:, None]).squeeze(-1)
        return -(picked * mask).sum() / mask.sum().clamp(min=1)

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
        return done

    def inputs(self, chunks: list[list[int] | None]) -> list[Any]:
        """A step's token ids and target masks on the device, one (ids, mask) per member
        (None where idle; on the vmap path one stacked pair for all), built from the host's
        token lists before the step, as pinned copies that queue without a sync."""
        if self.path == "vmap":
            width = max(len(c) for c in chunks if c is not None)
            ids = torch.zeros((self.members, width), dtype=torch.long)
            mask = torch.zeros((self.members, width - 1))
            for e, chunk in enumerate(chunks):
                if chunk is not None:  # right padding: causal attention keeps real tokens exact
                    ids[e, : len(chunk)] = torch.tensor(chunk)
                    mask[e, : len(chunk) - 1] = 1
            causal = None
            if self.eager_attention:  # built here, not from a host value inside the forward
                low = torch.finfo(torch.float32).min
                causal = torch.full((width, width), low, device=self.device).triu(1)[None, None]
            return [(self._to_device(ids), self._to_device(mask), causal)]
        return [
            None
            if chunk is None
            else (
                self._to_device(torch.tensor(chunk)),
                torch.ones(len(chunk) - 1, device=self.device),
            )
            for chunk in chunks
        ]

    def train_step(self, inputs: list[Any], slots: list[_Member | None]) -> torch.Tensor:
        """One step of every active member on `inputs`: gradients, each row clipped, Adam(W).
        Nothing in it reads a value back to the host or builds a tensor from host values
        (ttt.engine.profile counts it); returns the members' losses, on the device."""
        active = [m is not None for m in slots]
        self.model.train()  # as the sequential loop: dropout on while training, if configured
        try:
            if self.path == "vmap":
                grads, losses = self._grads_vmap(*inputs[0])
            else:
                grads, losses = self._grads_loop(inputs, slots)
        finally:
            self.model.eval()
        rows = [grads[e] for e, on in enumerate(active) if on]
        # clipping as a divisor inside Adam's kernel: one norm pass, no scaled copy
        self.adam.step(grads, active, clip_scales(rows, self.spec.grad_clip))
        return losses

    def _grads_vmap(self, ids: Any, mask: Any, causal: Any) -> tuple[Any, torch.Tensor]:
        randomness = "different" if self.dropout else "error"
        step = vmap(grad_and_value(self._loss), (0, 0, 0, None), randomness=randomness)
        if self.eager_attention is not None:
            with training_attention(self.model, eager=self.eager_attention):
                return step(self.weights, ids, mask, causal)
        # first step with the model's own attention: if PyTorch falls back to a per-member
        # loop for a kernel without a batching rule (it warns), later steps run eager attention
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with training_attention(self.model, eager=False):
                found = step(self.weights, ids, mask, None)
        slow = [w for w in caught if "batching rule" in str(w.message)]
        self.eager_attention = bool(slow)
        if slow:
            log.info("vmap path: %s; eager attention from now on", str(slow[0].message)[:120])
        return found

    def _grads_loop(self, inputs: list[Any], slots: list[_Member | None]) -> tuple[Any, Any]:
        """Member after member, each row's gradient as grad returns it (no stacked copy)."""
        grads: list[torch.Tensor | None] = [None] * self.members
        losses: list[torch.Tensor | None] = [None] * self.members
        with training_attention(self.model, eager=False):
            for e, given in enumerate(inputs):
                member = slots[e]
                if given is None or member is None:
                    continue
                if member.rng:
                    set_rng_state(member.rng, self.device)
                grads[e], losses[e] = grad_and_value(self._loss)(self.weights[e], *given)
                if member.rng:
                    member.rng = rng_state(self.device)
        return grads, losses

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a host sync: from pageable memory a CUDA copy
        waits for the stream, from pinned memory it is queued like a kernel."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)
