"""Test-time training on nearest neighbors (Hardt & Sun, ICLR 2024, section 2) and baselines.

For each test document: score it, then train on its neighbors (nearest first) one optimizer
step per chunk of maxLength tokens, scoring again at every checkpoint of `evalAfter`; then
restore the weights exactly before the next document. The baselines share the loop: the base
model is checkpoint 0, dynamic evaluation trains on the document itself, and in-context
conditions on the neighbors' text instead of training on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ttt import telemetry
from ttt.baselines import BASELINES
from ttt.bpb import DEFAULT_BATCH_TOKENS, score_document
from ttt.index.retrieval import is_leak
from ttt.lm import eot_token_id
from ttt.outcome import DocOutcome, checkpoint

# --- which neighbors a document trains on ----------------------------------------------------


@dataclass(frozen=True)
class NeighborSelection:
    """Neighbors that survive the distance threshold and the leakage guard, nearest first."""

    texts: list[str]
    distances: list[float] | None
    excluded_identical: int = 0  # the leakage guard: the test document itself, retrieved
    dropped_distance: int = 0  # farther than the distance threshold


def select_neighbors(
    text: str,
    neighbors: list[str],
    distances: list[float] | None = None,
    *,
    distance_threshold: float | None = None,
    exclude_identical: bool = True,
    identical_distance: float = 1e-3,
) -> NeighborSelection:
    """Sort by distance, drop neighbors beyond the threshold, and exclude the document itself.

    `distances` and both thresholds are Euclidean (not FAISS's squared L2): a neighbor is used
    when its distance is < `distance_threshold`, as the reference's `norm(...) < 4.0`.

    A neighbor is the document itself when its text equals the document's (ignoring leading
    and trailing whitespace) or its distance is at most `identical_distance`: training on the
    test document would leak it. Excluded and dropped neighbors are counted, not silent.
    """
    if distances is not None and len(distances) != len(neighbors):
        raise ValueError(f"{len(neighbors)} neighbors but {len(distances)} distances")
    pairs = list(zip(neighbors, distances if distances is not None else [None] * len(neighbors)))
    if distances is not None:
        pairs.sort(key=lambda p: p[1])  # stable: equal distances keep the retriever's order
    kept: list[tuple[str, float | None]] = []
    identical = far = 0
    for neighbor, distance in pairs:
        if (
            distance is not None
            and distance_threshold is not None
            and not distance < distance_threshold
        ):
            far += 1
        elif exclude_identical and is_leak(text, neighbor, distance, identical_distance):
            identical += 1
        else:
            kept.append((neighbor, distance))
    return NeighborSelection(
        texts=[n for n, _ in kept],
        distances=None if distances is None else [float(d) for _, d in kept],
        excluded_identical=identical,
        dropped_distance=far,
    )


def split_tokens(token_ids: list[int], max_query: int = 1024) -> int:
    """Where split-text mode cuts a document: after min(max_query, n // 2) tokens (reference).

    The query (the first part) retrieves neighbors or, for dynamic evaluation, is trained on;
    the rest is scored, so the two never overlap.
    """
    return min(max_query, len(token_ids) // 2)


def chunk_tokens(token_ids: list[int], max_length: int, stride: int) -> list[list[int]]:
    """Training chunks as the reference code cuts them: windows of max_length every stride.

    A chunk of one token has no next token to predict and is left out.
    """
    chunks = [token_ids[i : i + max_length] for i in range(0, len(token_ids), stride)]
    return [c for c in chunks if len(c) >= 2]


# --- what one document gives ----------------------------------------------------------------


# --- the loop -------------------------------------------------------------------------------


class TTTNN:
    """Test-time training on nearest neighbors for one model, document after document.

    `ttt_spec` is the run spec's `spec.ttt` section (ttt.spec.TTTSpec). The model's weights are
    copied once here and copied back after every document, so the model is bit-identical
    between documents. The optimizer's state is cleared after every document unless
    `reset_optimizer` is false (the reference code's behaviour, kept for parity): then it
    carries across documents until `new_task()`, which the eval worker calls between tasks.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ttt_spec: Any,
        *,
        rank: str = "0",
        seed: int = 0,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        context_budget: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = ttt_spec
        self.rank = str(rank)
        self.seed = seed
        self.batch_tokens = batch_tokens
        self.max_length = int(ttt_spec.max_length)
        self.stride = int(ttt_spec.stride or ttt_spec.max_length)
        # in-context-prefix: at most half the window goes to the neighbors, the rest to the text
        self.context_budget = context_budget if context_budget is not None else self.max_length // 2
        self.eot = eot_token_id(tokenizer)
        self.device = next(model.parameters()).device
        self._params = [p for p in model.parameters() if p.requires_grad]
        # transformers' checkpointing, each layer again in the backward: on around this loop's
        # own steps only (the model may be shared: the ensemble scores with this loop)
        self.recompute = bool(getattr(ttt_spec, "recompute", False))
        self._saved = {
            name: t.detach().clone()
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        }
        # Called as on_neighbor(n, of, steps) after each neighbor trained on: progress within
        # a document, which can take minutes (eval's WorkProgress).
        self.on_neighbor: Any = None
        optimizer = torch.optim.AdamW if ttt_spec.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(
            self._params,
            lr=ttt_spec.learning_rate,
            eps=ttt_spec.eps,
            weight_decay=ttt_spec.weight_decay,
        )

    # -- texts --

    def split(self, text: str) -> tuple[str, str]:
        """(query, scored): the whole document twice, or the reference's token split."""
        if not self.spec.split_text:
            return text, text
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        cut = split_tokens(ids)
        return self.tokenizer.decode(ids[:cut]), self.tokenizer.decode(ids[cut:])

    def query_text(self, text: str) -> str:
        """What retrieves the neighbors: the document, or its first tokens in split-text mode."""
        return self.split(text)[0]

    def scored_text(self, text: str) -> str:
        """What is scored: the document, or the rest after the query in split-text mode."""
        return self.split(text)[1]

    # -- the method --

    def evaluate(
        self, text: str, neighbors: list[str], *, distances: list[float] | None = None
    ) -> DocOutcome:
        """Score `text` at every checkpoint of evalAfter while training on `neighbors`.

        `neighbors` are ordered nearest first (or sorted by `distances` when given); filter them
        with select_neighbors first. Checkpoint n is scored after the first n neighbors of the
        training order; with fewer neighbors it is scored after the last one and records how
        many were used. The weights are restored before this returns, even on error.
        """
        if distances is not None:
            if len(distances) != len(neighbors):
                raise ValueError(f"{len(neighbors)} neighbors but {len(distances)} distances")
            order = sorted(range(len(neighbors)), key=lambda i: distances[i])
            neighbors = [neighbors[i] for i in order]
            distances = [distances[i] for i in order]
        if self.spec.order == "farthest-first":
            neighbors = neighbors[::-1]
            distances = distances[::-1] if distances is not None else None
        method = self.spec.method
        query, scored = self.split(text)
        if method in BASELINES:
            return BASELINES[method](self, scored, neighbors, distances)
        if method == "dynamic-eval":
            if not self.spec.split_text:  # it would train on the very tokens it scores
                raise ValueError("dynamic-eval needs splitText (the reference's token split)")
            # the reference's dynamic evaluation: the query in place of every neighbor, one
            # pass per neighbor (evalAfter up to 20: 20 passes, a step per window each)
            passes = max(self.spec.eval_after, default=0) or 1
            neighbors = [query] * passes
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(self.seed)  # the same dropout masks however documents are split
                outcome = self._train_and_score(scored, neighbors, method)
        finally:
            self.reset()
        telemetry.TRAIN_TOKENS.labels(self.rank).inc(outcome.train_tokens)
        telemetry.TRAIN_STEPS.labels(self.rank).inc(outcome.train_steps)
        return outcome

    def _train_and_score(self, scored: str, neighbors: list[str], method: str) -> DocOutcome:
        outcome = DocOutcome(method=method)
        checkpoints = self.spec.eval_after
        last = min(max(checkpoints, default=0), len(neighbors))
        self._score_due(outcome, scored, 0, checkpoints, last)
        for n, neighbor in enumerate(neighbors[:last], start=1):
            start = time.perf_counter()
            ids = self.tokenizer.encode(neighbor, add_special_tokens=False)
            losses = []
            for _ in range(self.spec.steps_per_neighbor):
                for chunk in chunk_tokens(ids, self.max_length, self.stride):
                    losses.append(self._step(chunk))
                    outcome.train_steps += 1
                    outcome.train_tokens += len(chunk)
            # the reference's training loss of a neighbor: the mean over its steps (one sync)
            loss = torch.stack(losses).mean().item() if losses else float("nan")
            outcome.train_losses.append(loss)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # charge queued kernels to training
            outcome.seconds_training += time.perf_counter() - start
            outcome.neighbors_used = n
            self._score_due(outcome, scored, n, checkpoints, last)
            if self.on_neighbor is not None:
                self.on_neighbor(n, last, outcome.train_steps)
        return outcome

    def _step(self, chunk: list[int]) -> torch.Tensor:
        """One optimizer step on one chunk: next-token loss, clipped gradient, Adam(W); the loss."""
        self.model.train()  # as the reference code: dropout on while training, if configured
        inputs = torch.tensor([chunk], device=self.device)
        if self.recompute:
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        try:
            loss = self.model(input_ids=inputs, labels=inputs).loss
            loss.backward()
        finally:
            if self.recompute:
                self.model.gradient_checkpointing_disable()
        if self.spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.spec.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return loss.detach()

    def _score_due(
        self, outcome: DocOutcome, scored: str, n: int, checkpoints: list[int], last: int
    ) -> None:
        """Score once if any checkpoint falls due after n neighbors (those past the end: at last)."""
        due = [c for c in checkpoints if c == n or (n == last and c > last)]
        if not due:
            return
        start = time.perf_counter()
        score = score_document(
            self.model,
            self.tokenizer,
            scored,
            self.max_length,
            eot_id=self.eot,
            batch_tokens=self.batch_tokens,
        )
        self._record(outcome, due, n, score, time.perf_counter() - start)

    def _record(
        self, outcome: DocOutcome, due: list[int], n: int, score: Any, seconds: float
    ) -> None:
        """One scoring pass after n neighbors, for checkpoints `due`, into the outcome."""
        outcome.seconds_scoring += seconds
        outcome.score_passes += 1
        for c in due:
            outcome.checkpoints.append(self.checkpoint(c, n, score, outcome, seconds))

    # the outcome module's, kept here for callers of TTTNN.checkpoint
    checkpoint = staticmethod(checkpoint)

    # -- reset --

    def reset(self) -> None:
        """Copy the saved weights back in place (bit-identical) and, by default, clear Adam."""
        with torch.no_grad():
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                t.copy_(self._saved[name])
        self.optimizer.zero_grad(set_to_none=True)
        if self.spec.reset_optimizer:
            self.optimizer.state.clear()
        self.model.eval()

    def new_task(self) -> None:
        """A new task begins: the optimizer's state starts afresh (the reference: one per task).

        With resetOptimizer false the state carries across the documents of a task, as the
        reference's one AdamW per task does; the caller calls this between tasks.
        """
        self.optimizer.state.clear()

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []
