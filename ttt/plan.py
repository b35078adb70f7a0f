"""What a run costs before it is paid for: corpus figures x measured throughputs, per stage.

Every figure is a product or quotient of a corpus figure and a throughput, printed with the
formula, so a plan can be checked by hand. Corpus figures are counted from the spec's files
(sampled where large: the first `sample_documents` of each file, scaled by the file's size)
or given; throughputs come from `ttt bench` (its --json output) or are given. Nothing is
assumed silently: a figure without its input is reported as missing, not guessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ttt.corpus.figures import CorpusFigures, count_corpus, given_corpus
from ttt.errors import TTTError
from ttt.index.choice import IndexChoice, bytes_per_vector, choose_index

GB = 1e9


class PlanError(TTTError, ValueError):
    """A plan input that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Throughputs:
    """Per device (GPU, or pod for CPU stages) rates of each stage, and where they came from."""

    embed_tokens_per_second: float | None = None
    index_vectors_per_second: float | None = None
    train_tokens_per_second: float | None = None
    score_tokens_per_second: float | None = None
    query_seconds: float | None = None
    # the paper's unit: seconds per neighbor (training + one scoring pass), instead of tokens;
    # one figure for every task, or {task: seconds} (the paper's per-task figures)
    eval_seconds_per_neighbor: float | dict[str, float] | None = None
    source: str = "given"


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0
    server_memory_gb: float = 256.0
    bytes_per_token: float = 4.0  # only where tokens are not counted
    text_compression: float = 0.3  # zstd text store size / raw bytes, when not measured


# --- the plan --------------------------------------------------------------------------------


def _hours(work: float, rate: float | None) -> float | None:
    return None if not rate else work / rate / 3600


def eval_documents(run: Any, test: CorpusFigures) -> dict[str, tuple[float, float]]:
    """{task: (documents, tokens)} evaluated: the spec's portion of each task, counted as
    ttt.eval.sample.select_test_documents counts it (`int(portion x n)` for the reference's
    selection, rounded and at least 1 otherwise)."""
    e = run.spec.eval
    out: dict[str, tuple[float, float]] = {}
    for task, f in test.domains.items():
        if e.tasks != "all" and task not in e.tasks:
            continue
        if e.selection == "reference":
            n = float(int(e.portion * f.documents))
        else:
            n = max(1, math.floor(e.portion * f.documents + 0.5))
        if e.max_documents_per_task is not None:
            n = min(n, e.max_documents_per_task)
        out[task] = (n, n * f.tokens / max(f.documents, 1))
    return out


def eval_seconds(
    per_task: dict[str, tuple[float, float]], neighbors: int, rate: float | dict[str, float]
) -> float:
    """GPU-seconds of evaluation: per task, its documents x k x that task's seconds per
    neighbor (as the paper's per-task cost column; one figure for all tasks is allowed)."""
    if not isinstance(rate, dict):
        return sum(n for n, _ in per_task.values()) * neighbors * rate
    missing = sorted(set(per_task) - set(rate))
    if missing:
        raise PlanError(
            f"throughputs.evalSecondsPerNeighbor: no figure for task(s) {missing} "
            f"(it has {sorted(rate)})"
        )
    return sum(n * neighbors * rate[t] for t, (n, _) in per_task.items())


def make_plan(
    run: Any,
    train: CorpusFigures,
    test: CorpusFigures,
    rates: Throughputs,
    hw: Hardware,
    *,
    recall_target: float = 0.95,
    bytes_per_vector_budget: float | None = None,
    measured_indexes: Sequence[dict[str, Any]] = (),
    dim: int | None = None,
) -> dict[str, Any]:
    """Every stage's GPU-hours, wall time, memory, storage and network, with their formulas."""
    s = run.spec
    n, dim, shards = train.total("documents"), dim or _dim(run), s.corpus.shards
    k, workers = s.retrieval.neighbors, s.eval.workers
    per_shard = n / shards
    stages: dict[str, Any] = {}

    vector_bytes = 4 if s.embedding.storage == "float32" else 2  # spec.embedding.storage
    embed_tokens = train.total("embed_tokens")
    gpu_h = _hours(embed_tokens, rates.embed_tokens_per_second)
    stages["embed"] = {
        "tokens": embed_tokens,
        "gpu_hours": gpu_h,
        "wall_hours": None if gpu_h is None else gpu_h / shards,
        "storage_gb": n * dim * vector_bytes / GB,
        "formula": "tokens / embed_tokens_per_second / 3600; wall = / shards (one pod each); "
        f"storage = documents x dim x {vector_bytes} B ({s.embedding.storage})",
    }

    budget = bytes_per_vector_budget or hw.gpu_memory_gb * GB / n
    try:
        choice: IndexChoice = choose_index(n, dim, budget, recall_target, measured_indexes, k)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    index_gb = per_shard * choice.bytes_per_vector / GB
    meta_gb = per_shard * 16 / GB  # the text store's offsets (int64 start, length) per row
    build_h = _hours(n, rates.index_vectors_per_second)
    spec_bpv = bytes_per_vector(s.index.type, n, dim)
    stages["index"] = {
        "spec_type": s.index.type,
        "spec_memory_per_shard_gb": None if spec_bpv is None else per_shard * spec_bpv / GB,
        "spec_total_memory_gb": None if spec_bpv is None else n * spec_bpv / GB,
        "type": choice.factory,
        "why": choice.reason,
        "bytes_per_vector": choice.bytes_per_vector,
        "recall": choice.recall,
        "memory_per_shard_gb": index_gb,
        "memory_per_server_gb": index_gb + meta_gb,
        "servers": shards * s.index.replicas,
        "fits_server_memory": index_gb + meta_gb <= hw.server_memory_gb,
        "gpu_hours": build_h,
        "wall_hours": None if build_h is None else build_h / shards,
        "storage_gb": n * choice.bytes_per_vector / GB,
        "text_store_gb": train.total("bytes") * hw.text_compression / GB,
        "formula": "memory/shard = documents/shards x bytes_per_vector; server adds 16 B/row "
        "of text offsets; build = documents / index_vectors_per_second / 3600",
    }

    per_task = eval_documents(run, test)
    docs = sum(n for n, _ in per_task.values())
    test_tokens = sum(t for _, t in per_task.values())
    mean_train_tokens = train.total("tokens") / max(n, 1)
    neighbors = k if s.ttt.method == "ttt-nn" else 0
    train_tokens = docs * neighbors * s.ttt.steps_per_neighbor * mean_train_tokens
    score_tokens = test_tokens * max(1, len(s.ttt.eval_after))
    th, sh = (
        _hours(train_tokens, rates.train_tokens_per_second),
        _hours(score_tokens, rates.score_tokens_per_second),
    )
    eval_h = None if th is None or sh is None else th + sh
    if rates.eval_seconds_per_neighbor is not None:
        eval_h = eval_seconds(per_task, max(neighbors, 1), rates.eval_seconds_per_neighbor) / 3600
    candidates = s.retrieval.candidate_count
    request = shards * dim * 12  # one query vector as JSON (~12 B a number) to every shard
    response = shards * candidates * 60  # id, row, domain, distance per hit
    if s.retrieval.selection == "sift":
        response += shards * candidates * dim * 12  # the candidates' vectors for SIFT
    texts = neighbors * train.total("bytes") / max(n, 1)
    query_h = None if rates.query_seconds is None else docs * rates.query_seconds / 3600
    stages["eval"] = {
        "documents": docs,
        "train_tokens": train_tokens,
        "score_tokens": score_tokens,
        "gpu_hours": eval_h,
        "wall_hours": None if eval_h is None else (eval_h + (query_h or 0)) / workers,
        "retrieval_hours": query_h,
        "network_per_query_bytes": request + response + texts,
        "formula": "train = docs x k x stepsPerNeighbor x mean train tokens; score = test "
        "tokens x checkpoints; GPU-hours = train / train_tps + score / score_tps (or the sum over "
        "tasks of docs x k x the task's eval_seconds_per_neighbor) / 3600; wall = (GPU-hours + docs x query_seconds) / workers; network = "
        "shards x (dim x 12 + K' x 60 [+ K' x dim x 12 for SIFT]) + k x mean document bytes",
    }
    total = [v["gpu_hours"] for v in stages.values()]
    return {
        "run": run.name,
        "train": {
            "documents": n,
            "bytes": train.total("bytes"),
            "tokens": train.total("tokens"),
            "sampled": train.sampled,
        },
        "test": {"documents": test.total("documents"), "evaluated": docs},
        "throughputs": rates.__dict__,
        "hardware": hw.__dict__,
        "stages": stages,
        "gpu_hours": None if None in total else sum(total),
    }


def _dim(run: Any) -> int:
    dims = {"roberta-large": 1024, "roberta-base": 768, "all-minilm-l6-v2": 384}
    model = run.spec.embedding.model
    if model not in dims:
        raise PlanError(
            f"spec.embedding.model {model!r}: dimension unknown; give it in the profile (embeddingDim)"
        )
    return dims[model]


# --- inputs and output -----------------------------------------------------------------------

RATE_KEYS = {
    "embedTokensPerSecond": "embed_tokens_per_second",
    "indexVectorsPerSecond": "index_vectors_per_second",
    "trainTokensPerSecond": "train_tokens_per_second",
    "scoreTokensPerSecond": "score_tokens_per_second",
    "querySeconds": "query_seconds",
    "evalSecondsPerNeighbor": "eval_seconds_per_neighbor",
    "source": "source",
}
HARDWARE_KEYS = {
    "gpuMemoryGB": "gpu_memory_gb",
    "serverMemoryGB": "server_memory_gb",
    "bytesPerToken": "bytes_per_token",
    "textCompression": "text_compression",
}


def _section(data: dict, name: str, keys: dict[str, str], where: str) -> dict[str, Any]:
    raw = data.get(name) or {}
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: {name} must be a mapping")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise PlanError(f"{where}: {name}.{unknown[0]} is not a field (fields: {sorted(keys)})")
    out = {}
    for key, value in raw.items():
        if key == "evalSecondsPerNeighbor" and isinstance(value, dict):
            bad = [t for t, v in value.items() if not isinstance(v, int | float) or v <= 0]
            if bad or not value:
                raise PlanError(
                    f"{where}: {name}.{key}.{bad[0] if bad else ''} must be a positive number "
                    "per task"
                )
            out[keys[key]] = {str(t): float(v) for t, v in value.items()}
            continue
        if key != "source" and (not isinstance(value, int | float) or value <= 0):
            raise PlanError(f"{where}: {name}.{key} must be a positive number, got {value!r}")
        out[keys[key]] = value
    return out


def rates_from_bench(figures: dict[str, Any], source: str) -> dict[str, Any]:
    """Throughputs that a `ttt bench ... --json` output measured (embed, index, retrieval)."""
    out: dict[str, Any] = {}
    if "ours_tokens_per_second" in figures:
        out["embed_tokens_per_second"] = float(figures["ours_tokens_per_second"])
    if "approx_build_seconds" in figures and figures.get("vectors"):
        out["index_vectors_per_second"] = figures["vectors"] / figures["approx_build_seconds"]
    if "p50_ms" in figures:
        out["query_seconds"] = float(figures["p50_ms"]) / 1e3
    if out:
        out["source"] = source
    return out


def plan_run(
    run: Any,
    profile: dict[str, Any] | None = None,
    *,
    where: str = "<profile>",
    bench: Sequence[tuple[str, dict[str, Any]]] = (),
    recall_target: float = 0.95,
    bytes_per_vector: float | None = None,
    sample_documents: int = 100_000,
) -> dict[str, Any]:
    """The plan of `run`: its corpus counted (or the profile's `corpus`), the profile's
    `throughputs` and `hardware`, and `ttt bench --json` outputs (name, figures) on top."""
    profile = profile or {}
    hw = Hardware(**_section(profile, "hardware", HARDWARE_KEYS, where))
    rates = _section(profile, "throughputs", RATE_KEYS, where)
    measured, sources = [], [rates.pop("source")] if "source" in rates else []
    for name, figures in bench:
        device = " on CPU" if figures.get("faiss_gpus") == 0 else ""
        found = rates_from_bench(figures, f"ttt bench{device} ({name})")
        if found:
            sources.append(found.pop("source"))
        rates.update(found)
        if "approx_type" in figures:
            measured.append(figures)
    rates["source"] = "; ".join(sources) or "given"
    max_tokens = run.spec.embedding.max_tokens
    given = profile.get("corpus")
    if given is not None:
        if not isinstance(given, dict) or set(given) - {"train", "test"}:
            raise PlanError(f"{where}: corpus must hold train and test")
        train = given_corpus(
            given.get("train"), f"{where}: corpus.train", max_tokens, hw.bytes_per_token
        )
        test = given_corpus(
            given.get("test"), f"{where}: corpus.test", max_tokens, hw.bytes_per_token
        )
    else:
        count = {"max_tokens": max_tokens, "bytes_per_token": hw.bytes_per_token}
        train = count_corpus(run.spec.corpus.train, sample_documents=sample_documents, **count)
        test = count_corpus(run.spec.corpus.test, sample_documents=sample_documents, **count)
    return make_plan(
        run,
        train,
        test,
        Throughputs(**rates),
        hw,
        recall_target=recall_target,
        bytes_per_vector_budget=bytes_per_vector,
        measured_indexes=measured,
        dim=profile.get("embeddingDim"),
    )


def load_profile(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the plan profile: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a plan profile must be a mapping")
    unknown = sorted(set(data) - {"throughputs", "hardware", "corpus", "embeddingDim"})
    if unknown:
        raise PlanError(f"{path}: unknown field {unknown[0]!r}")
    return data


def _num(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        digits = 0
    return f"{value:,.{digits}f}{unit}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text: corpus, then each stage's figures and formula."""
    t = plan["train"]
    sampled = " (sampled, scaled by file size)" if t["sampled"] else ""
    lines = [
        f"plan for run {plan['run']}",
        (
            f"  train corpus: {t['documents']:,.0f} documents, {t['bytes'] / GB:,.1f} GB, "
            f"{t['tokens'] / 1e9:,.2f} G tokens{sampled}"
        ),
        (
            f"  test: {plan['test']['documents']:,.0f} documents, "
            f"{plan['test']['evaluated']:,.0f} evaluated"
        ),
        f"  throughputs ({plan['throughputs']['source']})",
    ]
    for stage, v in plan["stages"].items():
        lines.append(f"== {stage}")
        for key, value in v.items():
            if key == "formula":
                continue
            shown = _num(value, digits=3) if isinstance(value, float) or value is None else value
            lines.append(f"  {key:<26} {shown}")
        lines.append(f"  formula: {v['formula']}")
    lines.append(f"total GPU-hours: {_num(plan['gpu_hours'])}")
    needs = {
        "embed": "embedTokensPerSecond (ttt bench embed --json)",
        "index": "indexVectorsPerSecond (ttt bench index --json)",
        "eval": "trainTokensPerSecond and scoreTokensPerSecond, or evalSecondsPerNeighbor",
    }
    for stage, v in plan["stages"].items():
        if v["gpu_hours"] is None:
            lines.append(f"  {stage}: '-' = not measured; give {needs[stage]}")
    return "\n".join(lines) + "\n"
