"""Which engine trains a run: the one rule that says where the fast engine is proven equal."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ttt.errors import TTTError
from ttt.outcome import DocOutcome
from ttt.train import TTTNN

log = logging.getLogger(__name__)

ENGINES = ("auto", "sequential", "ensemble")


class EngineError(TTTError, ValueError):
    """An engine asked for where it would not give the sequential loop's results."""


def ensemble_equal(ttt_spec: Any) -> str | None:
    """None when the ensemble engine gives the sequential loop's results, else why not.

    Equal only when every document starts from the saved weights AND a fresh optimizer:
    method ttt-nn (the baselines train on the document or not at all) with resetOptimizer
    true (carried Adam moments chain the documents in order). float16 needs loss scaling,
    which the engine does not do.
    """
    if ttt_spec.method != "ttt-nn":
        return f"method {ttt_spec.method} (the ensemble runs ttt-nn only)"
    if not ttt_spec.reset_optimizer:
        return "resetOptimizer false (the optimizer state chains the documents)"
    if ttt_spec.dtype == "float16":
        return "dtype float16 (the engine has no loss scaling)"
    return None


def choose_engine(ttt_spec: Any) -> str:
    """'sequential' or 'ensemble' for `spec.ttt`: auto takes the ensemble wherever it is equal."""
    requested = getattr(ttt_spec, "engine", "auto")
    if requested not in ENGINES:
        raise EngineError(f"spec.ttt.engine {requested!r}: expected one of {', '.join(ENGINES)}")
    if requested == "sequential":
        return "sequential"
    why_not = ensemble_equal(ttt_spec)
    if why_not is None:
        return "ensemble"
    if requested == "ensemble":
        raise EngineError(
            f"spec.ttt.engine ensemble is not equal to the sequential loop: {why_not}"
        )
    return "sequential"


class SequentialEngine:
    """The sequential loop (ttt.train.TTTNN) behind the engines' stream interface."""

    def __init__(self, ttt: TTTNN) -> None:
        self.ttt = ttt
        self.on_start: Any = None  # called with a document's key as it starts (progress)

    @property
    def on_neighbor(self) -> Any:
        return self.ttt.on_neighbor

    @on_neighbor.setter
    def on_neighbor(self, hook: Any) -> None:
        """Called as hook(n, of, steps) after each neighbor trained on (progress)."""
        self.ttt.on_neighbor = hook

    def query_text(self, text: str) -> str:
        return self.ttt.query_text(text)

    def new_task(self) -> None:
        """A carried optimizer state (resetOptimizer false) starts afresh with each task."""
        self.ttt.new_task()

    def optimizer_state(self) -> bytes:
        """The optimizer's state (Adam's moments and steps), serialized: taken between
        documents, it is what a carried optimizer brings to the next document."""
        buffer = io.BytesIO()
        torch.save(self.ttt.optimizer.state_dict(), buffer)
        return buffer.getvalue()

    def load_optimizer_state(self, data: bytes) -> None:
        """Resume the optimizer from optimizer_state()'s bytes (onto the model's device)."""
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.ttt.optimizer.load_state_dict(state)

    def evaluate_stream(self, items: Iterable[tuple]) -> Iterator[tuple[Any, DocOutcome]]:
        for key, text, neighbors, distances in items:
            if self.on_start is not None:
                self.on_start(key)
            yield key, self.ttt.evaluate(text, neighbors, distances=distances)


def build_engine(model: Any, tokenizer: Any, ttt_spec: Any, *, rank: str = "0") -> Any:
    """The engine choose_engine picks, ready for evaluate_stream((key, text, nbrs, dists)).

    A model whose weights are not float32 (loaded as bfloat16 by hand) cannot be the fast
    engine's master copy: auto then runs the sequential loop, and an explicit ensemble fails.
    """
    engine = choose_engine(ttt_spec)
    if engine == "ensemble" and any(p.dtype != torch.float32 for p in model.parameters()):
        if getattr(ttt_spec, "engine", "auto") == "ensemble":
            raise EngineError("spec.ttt.engine ensemble needs the model in float32 (masters)")
        log.info("model weights are not float32: the sequential loop trains them")
        engine = "sequential"
    if engine == "sequential":
        return SequentialEngine(TTTNN(model, tokenizer, ttt_spec, rank=rank))
    from ttt.engine.ensemble import EnsembleTTT

    return EnsembleTTT(model, tokenizer, ttt_spec, rank=rank)
