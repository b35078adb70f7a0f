"""What a spec will train on, in words: engine, members and path, and why (`ttt validate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ttt.engine.rule import explain_engine

# Models whose dropout is known without loading them: the offline SmolLM2's GGUF config has
# attention_dropout 0.0 (read with transformers' AutoConfig); GPT-2's released configs train
# with dropout 0.1 (attn_pdrop, resid_pdrop, embd_pdrop).
KNOWN_DROPOUT = {
    "smollm2-135m": False,
    "gpt2": True,
    "gpt2-medium": True,
    "gpt2-large": True,
    "gpt2-xl": True,
}
# their architectures (model_type): both have a stacked forward (ttt.engine.stacked)
KNOWN_TYPE = {"smollm2-135m": "llama"} | {name: "gpt2" for name in KNOWN_DROPOUT if "gpt2" in name}
STACKED_TYPES = ("gpt2", "llama")


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


def config_dropout(model: str) -> bool | None:
    """Whether `model` trains with dropout, from KNOWN_DROPOUT or a config already on this
    machine (nothing is downloaded); None when neither says."""
    return config_facts(model)[0]


def config_facts(model: str) -> tuple[bool | None, str | None]:
    """(whether `model` trains with dropout, its model_type), from the tables above or a
    config already on this machine; None where neither says."""
    if model in KNOWN_DROPOUT:
        return KNOWN_DROPOUT[model], KNOWN_TYPE[model]
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError):  # not here, or a model type transformers lacks
        return None, None
    rates = [
        v
        for k, v in config.to_dict().items()
        if ("dropout" in k or "pdrop" in k) and isinstance(v, int | float)
    ]
    return any(float(v) > 0 for v in rates), getattr(config, "model_type", None)


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
    size = getattr(ttt_spec, "ensemble_size", None)
    if size:
        members = f"E = {size} (ensembleSize)"
    elif choice.device == "cuda":
        members = "E from free memory (at most 64)"
    else:
        size, members = 1, "E = 1 (ensembleSize unset off a GPU)"
    if not ttt_spec.reset_optimizer:
        members += ", each member a task with its carried optimizer"
    dropout, kind = config_facts(ttt_spec.model)
    # as ttt.engine.precision resolves it: bf16 autocast on a GPU unless float32 is asked
    autocast = ttt_spec.dtype == "bfloat16" or (
        ttt_spec.dtype == "auto" and choice.device == "cuda"
    )
    if kind is None:
        batched = "stacked or vmap"
    else:
        batched = "stacked" if kind in STACKED_TYPES else "vmap"
    if batched == "stacked":
        how = "all members in one batched forward, attention one fused call"
    elif batched == "vmap":
        how = f"all members in one vmap call (no stacked forward for {kind})"
    else:
        how = "all members batched (stacked for gpt2 and llama, else vmap)"
    if size == 1 and (dropout and not autocast or batched == "vmap"):
        why = "one member: " + ("its own dropout masks" if dropout else "nothing to batch")
        path = "loop"
    elif size == 1:
        path = "stacked" if batched == "stacked" else "stacked or loop"
        why = "one member: the stacked forward, which keeps no per-parameter copies"
    elif dropout and not autocast:
        path, why = "loop", "the model has dropout: each member replays its own masks"
    elif dropout:
        path = batched
        why = f"{how}; dropout masks drawn per member (bf16 autocast: within 0.01 bpb)"
    elif dropout is None:
        path, why = f"{batched} or loop", f"{how}, unless the model has dropout; no config here"
    else:
        path, why = batched, f"no dropout: {how}"
    return EnginePlan("ensemble", choice.device, members, path, choice.reason, why)
