"""What a spec will train on, in words: engine, members and path, and why (`ttt validate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ttt.engine.paths import config_dropout, config_facts, planned_members, predict_path
from ttt.engine.rule import explain_engine

__all__ = [
    "EnginePlan",
    "config_dropout",
    "config_facts",
    "explain_plan",
    "explain_spec",
    "spec_line",
]


@dataclass(frozen=True)
class EnginePlan:
    """engine, device type, members ("1", "N" or "from free memory"), path and the reasons."""

    engine: str
    device: str
    members: str
    path: str
    reason: str
    path_reason: str

    def line(self) -> str:
        """One line: `engine: ensemble on cuda, ... (why)`."""
        if self.engine == "sequential":
            return f"engine: sequential loop (ttt/train.py) on {self.device}: {self.reason}"
        return (
            f"engine: ensemble on {self.device}, {self.members}, path {self.path} "
            f"({self.path_reason}): {self.reason}"
        )

    def as_json(self) -> dict[str, str]:
        return {**asdict(self), "line": self.line()}


def explain_spec(ttt_spec: Any) -> list[EnginePlan]:
    """The plan on the spec's device; with `device: auto`, on a GPU and on a CPU (the machine
    that validates is seldom the one that runs)."""
    if str(getattr(ttt_spec, "device", "auto")) == "auto":
        return [explain_plan(ttt_spec, "cuda"), explain_plan(ttt_spec, "cpu")]
    return [explain_plan(ttt_spec)]


def spec_line(plans: list[EnginePlan]) -> str:
    """explain_spec's plans as one line."""
    if len(plans) == 1:
        return plans[0].line()
    return "device auto: " + "; ".join(p.line() for p in plans)


def explain_plan(ttt_spec: Any, device: str | None = None) -> EnginePlan:
    """The engine `spec.ttt` runs on `device` (default: the spec's), its members and path,
    as ttt.engine.select, members and ensemble decide them, without loading the model."""
    choice = explain_engine(ttt_spec, device)
    if choice.engine == "sequential":
        return EnginePlan("sequential", choice.device, "1", "sequential", choice.reason, "")
    size = planned_members(ttt_spec, choice.device)
    if getattr(ttt_spec, "ensemble_size", None):
        members = f"E = {size} (ensembleSize)"
    elif size is None:
        members = "E from free memory (at most 64)"
    else:
        members = "E = 1 (ensembleSize unset off a GPU)"
    if not ttt_spec.reset_optimizer:
        members += ", each member a task with its carried optimizer"
    path, why = predict_path(ttt_spec, choice.device, size)
    return EnginePlan("ensemble", choice.device, members, path, choice.reason, why)
