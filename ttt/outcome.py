"""What one test document gives: a score per checkpoint (evalAfter entry) and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ttt.bpb import DocScore


@dataclass(frozen=True)
class Checkpoint:
    """The scored text's likelihood after training on `neighbors` neighbors (`after` asked)."""

    after: int  # the evalAfter entry
    neighbors: int  # neighbors actually used (fewer than `after` when fewer were retrieved)
    loglik: float  # natural log, summed over the scored text's tokens
    tokens: int
    bytes: int
    words: int
    train_steps: int  # cumulative optimizer steps when scored
    train_tokens: int
    seconds_scoring: float

    @property
    def bits_per_byte(self) -> float:
        return DocScore(self.loglik, self.tokens, self.bytes, self.words).bits_per_byte


@dataclass
class DocOutcome:
    """Everything one test document gives: a score per checkpoint and what it cost."""

    method: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    neighbors_used: int = 0
    train_steps: int = 0
    train_tokens: int = 0
    seconds_training: float = 0.0
    seconds_scoring: float = 0.0
    score_passes: int = 0  # scoring passes run (one pass's cost: seconds_scoring / this)
    train_losses: list[float] = field(default_factory=list)  # mean loss per neighbor, in order
    # interpolation: per evalAfter entry, the loglik at each mixing weight of MIX_WEIGHTS
    mixtures: dict[str, list[float]] = field(default_factory=dict)
    fits_window: bool | None = None  # in-context: the scored text fits one window

    def at(self, after: int) -> Checkpoint:
        """The checkpoint recorded for evalAfter entry `after`."""
        for cp in self.checkpoints:
            if cp.after == after:
                return cp
        raise KeyError(f"no checkpoint after {after} neighbors (have {self.afters})")

    @property
    def afters(self) -> list[int]:
        return [cp.after for cp in self.checkpoints]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocOutcome:
        data = dict(data)
        data["checkpoints"] = [Checkpoint(**cp) for cp in data.get("checkpoints", [])]
        return cls(**data)


def checkpoint(
    after: int, n: int, score: DocScore, outcome: DocOutcome, seconds: float
) -> Checkpoint:
    """Checkpoint `after`, scored after `n` neighbors, with the outcome's cost so far."""
    return Checkpoint(
        after=after,
        neighbors=n,
        loglik=score.loglik,
        tokens=score.tokens,
        bytes=score.bytes,
        words=score.words,
        train_steps=outcome.train_steps,
        train_tokens=outcome.train_tokens,
        seconds_scoring=seconds,
    )
