"""Where a run spec departs from the paper's reference code (tttlm), and what restores parity."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ttt.spec.evidence import Evidence, count_train_files, gather
from ttt.spec.sections import PAPER_ENCODER

# The paper's three language models and their settings (its Table / Figure 4 runs).
PAPER_MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {"learningRate": 2e-5, "maxLength": 1024},
    "gpt2-large": {"learningRate": 2e-5, "maxLength": 1024},
    "EleutherAI/gpt-neo-1.3B": {"learningRate": 5e-6, "maxLength": 2048},
}
# The hub ids that name those models exactly. A local path is not known to hold the same
# weights, so it departs even when its name ends the same way; a pushed copy
# (s3://bucket/prefix, `ttt models push`) is the model its manifest's identity names.
PAPER_MODEL_IDS: dict[str, str] = {
    "gpt2": "gpt2",
    "openai-community/gpt2": "gpt2",
    "gpt2-large": "gpt2-large",
    "openai-community/gpt2-large": "gpt2-large",
    "EleutherAI/gpt-neo-1.3B": "EleutherAI/gpt-neo-1.3B",
}
# What the paper's baselines ran with (GPT-2 Large): 20 neighbors, 20 dynamic-eval passes.
BASELINE_NEIGHBORS = 20
# The Pile's training set as the paper indexed it: its 30 files, one index each.
PILE_TRAIN_FILES = 30
# `ttt validate --paper` exit status: at parity; a departure; nothing departs but something
# could not be checked (2 is argparse's usage error, so "unchecked" is 3).
EXIT_PARITY, EXIT_DEPARTS, EXIT_UNCHECKED = 0, 1, 3


@dataclass(frozen=True)
class Departure:
    """One setting that differs from the reference: the spec's value and the paper's."""

    field: str  # camelCase path, as written in the YAML
    value: Any
    paper: Any
    why: str

    def line(self) -> str:
        return f"{self.field}: {_show(self.value)} -> {_show(self.paper)}  # {self.why}"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and len(value) > 6 and value == list(range(value[0], value[-1] + 1)):
        return f"[{value[0]}, {value[1]}, ..., {value[-1]}]"
    return str(value)


def _paper_id(name: str) -> str:
    """The paper's hub id that a path or alias seems to mean (gpt2-large when none)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    for hub_id, model in PAPER_MODEL_IDS.items():
        if base == hub_id.rsplit("/", 1)[-1]:
            return model
    return "gpt2-large"


def _paper_model(name: str) -> dict[str, Any] | None:
    for key, settings in PAPER_MODELS.items():
        if name == key or name.rsplit("/", 1)[-1] == key.rsplit("/", 1)[-1]:
            return settings
    return None


def train_files(patterns: list[str]) -> int | None:
    """How many training files the spec names without a store: listed files, local globs
    expanded; None where a glob is remote (s3://), which only the store can count."""
    try:
        return count_train_files(patterns)
    except LookupError:
        return None


def _model_identity(name: str, facts: Evidence) -> tuple[str, str]:
    """(the hub id a model field stands for, how to show it): itself, or for a pushed copy
    the hub id its manifest records (shown with its revision)."""
    from ttt.models import describe_identity, identity

    if name in facts.models:
        body = facts.models[name]
        return identity(body).get("hubId") or "", f"{name} ({describe_identity(body)})"
    if name in facts.bad_models:
        return "", f"{name} ({facts.bad_models[name]})"
    return name, name


def _identity_checks(run: Any, facts: Evidence) -> dict[str, tuple[Any, Any, str]]:
    """The model's and the encoder's identity: a hub id, or a pushed copy whose manifest
    names it. A pushed copy the store could not be asked about is not compared (a note)."""
    s = run.spec
    paper_models = ", ".join(PAPER_MODELS)
    checks: dict[str, tuple[Any, Any, str]] = {}
    for path, name, why in (
        ("spec.embedding.model", s.embedding.model, "the paper's encoder, by hub id"),
        (
            "spec.ttt.model",
            s.ttt.model,
            (
                f"the paper's models by hub id: {paper_models} (a path is not known to hold "
                "them; a pushed copy is what its manifest names)"
            ),
        ),
    ):
        hub, shown = _model_identity(name, facts)
        if name.startswith("s3://") and name not in facts.models and name not in facts.bad_models:
            continue  # not read: unchecked() says so
        if path == "spec.embedding.model":
            checks[path] = (shown, shown if hub == PAPER_ENCODER else PAPER_ENCODER, why)
        else:
            paper = shown if hub in PAPER_MODEL_IDS else _paper_id(hub or name)
            checks[path] = (shown, paper, why)
    return checks


def paper_settings(run: Any, facts: Evidence | None = None) -> dict[str, tuple[Any, Any, str]]:
    """Every checked setting: {path: (the spec's value, the paper's value, why it matters)};
    `facts` are what the run's store says (read here when not given)."""
    facts = gather(run) if facts is None else facts
    s = run.spec
    e, r, t, ev = s.embedding, s.retrieval, s.ttt, s.eval
    method = t.method
    k = BASELINE_NEIGHBORS if method in ("interpolation", "in-context") else 50
    lm_id = _model_identity(t.model, facts)[0] or t.model
    model = _paper_model(lm_id)
    lr = model["learningRate"] if model else 2e-5
    length = model["maxLength"] if model else 1024
    identity = _identity_checks(run, facts)
    checks: dict[str, tuple[Any, Any, str]] = {
        **{k: v for k, v in identity.items() if k == "spec.embedding.model"},
        "spec.embedding.pooling": (e.pooling, "mean", "mean of the last hidden states"),
        "spec.embedding.maxTokens": (e.max_tokens, 512, "the encoder reads 512 tokens"),
        "spec.embedding.normalize": (e.normalize, False, "unnormalized vectors"),
        "spec.embedding.dtype": (e.dtype, "float32", "the encoder ran in float32"),
        "spec.embedding.storage": (e.storage, "float32", "a float32 index"),
        "spec.index.type": (s.index.type, "flat", "exact L2 (IndexFlatL2)"),
        "spec.retrieval.neighbors": (r.neighbors, k, f"{k} neighbors"),
        "spec.retrieval.distanceThreshold": (
            r.distance_threshold,
            None if method == "interpolation" else 4.0,
            "the interpolation baseline mixes every neighbor"
            if method == "interpolation"
            else "Euclidean distance < 4.0",
        ),
        "spec.retrieval.excludeIdentical": (
            r.exclude_identical,
            False,
            "the reference has no leakage guard (it trains on train/test duplicates)",
        ),
        **{k: v for k, v in identity.items() if k == "spec.ttt.model"},
        "spec.ttt.splitText": (
            t.split_text,
            t.split_text
            if method == "dynamic-eval" or PAPER_MODEL_IDS.get(lm_id) == "gpt2"
            else False,
            "the whole document is the query and is scored (split text: GPT-2 117M only)",
        ),
        "spec.retrieval.selection": (
            r.selection,
            "nearest",
            "the nearest neighbors (SIFT is ours)",
        ),
        "spec.retrieval.allowPartial": (
            r.allow_partial,
            False,
            "every query answered by every shard",
        ),
        "spec.ttt.dtype": (t.dtype, "float32", "float32 training"),
        "spec.ttt.compile": (t.compile, False, "eager PyTorch (its rounding, its dropout masks)"),
        "spec.ttt.optimizer": (t.optimizer, "adamw", "torch.optim.AdamW"),
        "spec.ttt.weightDecay": (t.weight_decay, 0.01, "AdamW's default weight decay"),
        "spec.ttt.eps": (t.eps, 1e-8, "Adam's epsilon"),
        "spec.ttt.learningRate": (t.learning_rate, lr, "the paper's rate for this model"),
        "spec.ttt.maxLength": (t.max_length, length, "the model's context"),
        "spec.ttt.stride": (t.chunk_stride, t.max_length, "stride = maxLength"),
        "spec.ttt.gradClip": (t.grad_clip, 1.0, "gradient norm clipped at 1.0"),
        "spec.ttt.stepsPerNeighbor": (t.steps_per_neighbor, 1, "one step per window"),
        "spec.ttt.order": (t.order, "nearest-first", "nearest first"),
        "spec.ttt.resetOptimizer": (
            t.reset_optimizer,
            False,
            "one AdamW per task, its state carried across the task's documents",
        ),
        "spec.eval.tasks": (ev.tasks, "all", "all 22 Pile tasks"),
        "spec.eval.portion": (ev.portion, 0.2, "20 % of each task's test documents"),
        "spec.eval.seed": (ev.seed, 1216, "random.Random seeded 1216"),
        "spec.eval.selection": (ev.selection, "reference", "the reference's shuffle and cut"),
        "spec.eval.maxDocumentsPerTask": (ev.max_documents_per_task, None, "no cap"),
    }
    files = facts.train_files
    if files is not None:
        checks["spec.corpus.train"] = (
            f"{files} file(s)",
            f"{PILE_TRAIN_FILES} file(s)",
            "the Pile's 30 training files",
        )
    if method == "ttt-nn":
        checks["spec.ttt.evalAfter"] = (
            list(t.eval_after),
            list(range(r.neighbors + 1)),
            "a score after every neighbor",
        )
    if method == "dynamic-eval":
        checks["spec.ttt.splitText"] = (t.split_text, True, "the query is the first tokens")
        checks["spec.ttt.evalAfter"] = (
            max(t.eval_after, default=0),
            BASELINE_NEIGHBORS,
            "20 passes on the query",
        )
    if method == "in-context":
        checks["spec.ttt.inContextThreshold"] = (
            t.in_context_threshold,
            2.3,
            "neighbors at Euclidean distance < 2.3",
        )
    if method == "in-context-prefix":
        checks["spec.ttt.method"] = (method, "in-context", "our in-context variant")
    return checks


def departures(run: Any, facts: Evidence | None = None) -> list[Departure]:
    """The settings of `run` that differ from the paper's reference code, in spec order."""
    out = []
    for path, (value, paper, why) in paper_settings(run, facts).items():
        same = (
            abs(value - paper) <= 1e-12 * max(abs(paper), 1.0)
            if isinstance(value, float) and isinstance(paper, float)
            else value == paper
        )
        if not same:
            out.append(Departure(path, value, paper, why))
    return out


def unchecked(run: Any, facts: Evidence | None = None) -> list[str]:
    """What changes the numbers but could not be compared, said so rather than passed in
    silence: a training corpus behind an s3:// glob, or a pushed model's identity, when the
    run's store cannot be reached."""
    return list((gather(run) if facts is None else facts).notes)


def exit_status(found: list[Departure], notes: list[str]) -> int:
    """0 at parity, 1 when a setting departs, 3 when none departs but one is unchecked."""
    if found:
        return EXIT_DEPARTS
    return EXIT_UNCHECKED if notes else EXIT_PARITY


def departures_json(run: Any, source: str, facts: Evidence | None = None) -> dict[str, Any]:
    """The departures for machines: {source, count, departures: [{field, value, paper, why}],
    unchecked: [what could not be compared], status: parity|departs|unchecked, exit}."""
    facts = gather(run) if facts is None else facts
    found = departures(run, facts)
    code = exit_status(found, facts.notes)
    return {
        "source": source,
        "count": len(found),
        "departures": [asdict(d) for d in found],
        "unchecked": list(facts.notes),
        "status": {EXIT_PARITY: "parity", EXIT_DEPARTS: "departs"}.get(code, "unchecked"),
        "exit": code,
    }


def format_departures(run: Any, source: str, facts: Evidence | None = None) -> str:
    """A header, then one `field: ours -> paper  # why` line per departure (none: the
    header), then a `# not checked:` line for each thing that could not be compared."""
    facts = gather(run) if facts is None else facts
    found = departures(run, facts)
    lines = [f"# {source}: {len(found)} departure(s) from the paper's reference code (tttlm)"]
    lines += [d.line() for d in found]
    lines += [f"# not checked: {note}" for note in facts.notes]
    return "\n".join(lines) + "\n"
