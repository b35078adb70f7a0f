"""Which engine trains a run: the one rule that says where the fast engine is proven equal."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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

    Equal when every document starts from the saved weights: method ttt-nn (the baselines
    train on the document or not at all). With resetOptimizer true each document starts a
    fresh optimizer; with it false a member is a task, its documents in order with one
    carried Adam(W) (tasks are independent). float16 needs loss scaling, which the engine
    does not do.
    """
    if ttt_spec.method != "ttt-nn":
        return f"method {ttt_spec.method} (the ensemble runs ttt-nn only)"
    if ttt_spec.dtype == "float16":
        return "dtype float16 (the engine has no loss scaling)"
    return None


# The engine `auto` takes on each device type where the ensemble is equal, and the
# measurement behind it. The ensemble stays where it is proven equal (ensemble_equal); it is
# the default only where it is also the faster one. A device type not listed runs the loop.
FASTEST: dict[str, tuple[str, str]] = {
    "cpu": (
        "sequential",
        (
            "on a CPU the sequential loop is faster: `ttt bench ttt --preset cpu` on an idle "
            "machine (issue 21) gave ttt/train.py 1,522 ms per neighbor, the engine (one "
            "member, loop path) 1,789"
        ),
    ),
    "cuda": (
        "ensemble",
        (
            "on a GPU the ensemble trains E documents per step under bf16 autocast, which "
            "the loop cannot (not yet timed on a GPU: docs/performance.md)"
        ),
    ),
}


@dataclass(frozen=True)
class EngineChoice:
    """Which engine trains a run on a device type, and why (`ttt validate` prints it)."""

    engine: str  # "sequential" or "ensemble"
    device: str  # the device type the choice was made for: "cpu", "cuda", ...
    reason: str


def spec_device(ttt_spec: Any) -> str:
    """The device type `spec.ttt.device` means here: auto = cuda when torch sees a GPU."""
    requested = getattr(ttt_spec, "device", "auto") or "auto"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(requested).type
    except RuntimeError as exc:
        raise EngineError(f"spec.ttt.device {requested!r} is not a torch device: {exc}") from None


def explain_engine(ttt_spec: Any, device: str | torch.device | None = None) -> EngineChoice:
    """The engine `spec.ttt` runs on `device` (default: the spec's own) and the reason.

    sequential: always the loop. ensemble: the ensemble where it is equal, else an error.
    auto: the ensemble where it is equal AND the device's measured fastest (FASTEST), else
    the loop.
    """
    requested = getattr(ttt_spec, "engine", "auto")
    if requested not in ENGINES:
        raise EngineError(f"spec.ttt.engine {requested!r}: expected one of {', '.join(ENGINES)}")
    kind = torch.device(device).type if device is not None else spec_device(ttt_spec)
    if requested == "sequential":
        return EngineChoice("sequential", kind, "spec.ttt.engine sequential")
    why_not = ensemble_equal(ttt_spec)
    if requested == "ensemble":
        if why_not is not None:
            raise EngineError(
                f"spec.ttt.engine ensemble is not equal to the sequential loop: {why_not}"
            )
        return EngineChoice("ensemble", kind, "spec.ttt.engine ensemble")
    if why_not is not None:
        return EngineChoice("sequential", kind, f"the ensemble is not equal here: {why_not}")
    engine, reason = FASTEST.get(
        kind, ("sequential", f"the ensemble is not measured on device type {kind!r}")
    )
    return EngineChoice(engine, kind, reason)


def choose_engine(ttt_spec: Any, device: str | torch.device | None = None) -> str:
    """'sequential' or 'ensemble' for `spec.ttt` on `device`: see explain_engine."""
    return explain_engine(ttt_spec, device).engine


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
    engine = choose_engine(ttt_spec, next(model.parameters()).device)
    if engine == "ensemble" and any(p.dtype != torch.float32 for p in model.parameters()):
        if getattr(ttt_spec, "engine", "auto") == "ensemble":
            raise EngineError("spec.ttt.engine ensemble needs the model in float32 (masters)")
        log.info("model weights are not float32: the sequential loop trains them")
        engine = "sequential"
    if engine == "sequential":
        return SequentialEngine(TTTNN(model, tokenizer, ttt_spec, rank=rank))
    from ttt.engine.ensemble import EnsembleTTT

    return EnsembleTTT(model, tokenizer, ttt_spec, rank=rank)
