"""Which engine trains a run, built: the sequential loop behind the stream, or the ensemble."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ttt.engine.rule import (  # the rule, kept apart so `ttt validate` needs no torch
    ENGINES,
    FASTEST,
    FASTEST_ON_PATH,
    EngineChoice,
    EngineError,
    choose_engine,
    ensemble_equal,
    explain_engine,
)
from ttt.outcome import DocOutcome
from ttt.train import TTTNN

__all__ = [
    "ENGINES",
    "FASTEST",
    "FASTEST_ON_PATH",
    "EngineChoice",
    "EngineError",
    "SequentialEngine",
    "build_engine",
    "choose_engine",
    "ensemble_equal",
    "explain_engine",
    "refuse_early",
]

log = logging.getLogger(__name__)


def refuse_early(ttt_spec: Any) -> None:
    """Raise the EngineError an eval worker would raise (spec.ttt.engine ensemble where it
    is not equal, recompute or compile where the ensemble cannot), on this machine's device,
    so that a run stops before any stage instead of after its corpus and index are built."""
    if ttt_spec.engine == "ensemble" or ttt_spec.recompute or ttt_spec.compile:
        from ttt.device import pick_device

        explain_engine(ttt_spec, pick_device(ttt_spec.device).type)


class SequentialEngine:
    """The sequential loop (ttt.train.TTTNN) behind the engines' stream interface."""

    def __init__(self, ttt: TTTNN) -> None:
        self.ttt = ttt
        self._new_task = False  # set by new_task() while the stream reads a document
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
        """A carried optimizer state (resetOptimizer false) starts afresh with the document
        read next (the stream is read one document ahead, so not at once)."""
        self._new_task = True

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
        """(key, outcome) per document, in order; the next document is read (retrieved, in
        the eval stage) before the current one trains, as the ensemble reads ahead, and a
        new_task() called while reading it applies when that document starts."""
        source = iter(items)

        def pull() -> tuple[tuple, bool] | None:
            item = next(source, None)
            fresh, self._new_task = self._new_task, False
            return None if item is None else (item, fresh)

        ahead = pull()
        while ahead is not None:
            (key, text, neighbors, distances), fresh = ahead
            ahead = pull()
            if fresh:
                self.ttt.new_task()
            if self.on_start is not None:
                self.on_start(key)
            yield key, self.ttt.evaluate(text, neighbors, distances=distances)


def build_engine(model: Any, tokenizer: Any, ttt_spec: Any, *, rank: str = "0") -> Any:
    """The engine choose_engine picks, ready for evaluate_stream((key, text, nbrs, dists)).

    A model whose weights are not float32 (loaded as bfloat16 by hand) cannot be the fast
    engine's master copy: auto then runs the sequential loop, and an explicit ensemble fails.
    """
    engine = choose_engine(ttt_spec, next(model.parameters()).device, model)
    if engine == "ensemble" and any(p.dtype != torch.float32 for p in model.parameters()):
        if getattr(ttt_spec, "engine", "auto") == "ensemble":
            raise EngineError("spec.ttt.engine ensemble needs the model in float32 (masters)")
        log.info("model weights are not float32: the sequential loop trains them")
        engine = "sequential"
    if engine == "sequential":
        return SequentialEngine(TTTNN(model, tokenizer, ttt_spec, rank=rank))
    from ttt.engine.ensemble import EnsembleTTT

    return EnsembleTTT(model, tokenizer, ttt_spec, rank=rank)
