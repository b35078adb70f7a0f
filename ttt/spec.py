"""The TTTRun specification: one YAML document that drives every stage and entry point."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ttt.errors import TTTError

API_VERSION = "ttt.dev/v1alpha1"
# The paper's encoder (Hardt & Sun 2024): RoBERTa-large fine-tuned one epoch on the Pile.
PAPER_ENCODER = "socialfoundations/roberta-large-pile-lr2e-5-bs16-8gpu-1700000"
ENV_PREFIX = "TTT_"
# What a shard server accepts as k (ttt.index.api.Limits.max_k), and the extra candidates a
# retriever asks for so that excluded copies of the query still leave k neighbors: a spec
# whose neighbors + margin exceed it would fail every query, so validation refuses it.
SERVER_MAX_K = 1024
EXCLUDE_MARGIN = 8


class SpecError(TTTError, ValueError):
    """A run spec that cannot be used; the message names the file and every bad field path."""


class _Section(BaseModel):
    # camelCase in YAML (the Kubernetes habit), snake_case in Python; unknown keys are errors
    # so that a misspelt field never silently falls back to a default.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class CorpusSpec(_Section):
    """Where the training corpus and the test documents live, and how to shard the corpus."""

    train: list[str] = Field(default_factory=list, description="paths, globs or s3:// URIs")
    test: list[str] = Field(default_factory=list, description="paths, globs or s3:// URIs")
    shards: int = Field(1, ge=1, le=4096)
    strict: bool = Field(False, description="fail on the first bad corpus line")

    @field_validator("train", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EmbeddingSpec(_Section):
    """The encoder that turns documents and queries into vectors (the paper: RoBERTa-large)."""

    model: str = Field(
        PAPER_ENCODER,
        description="HF id or directory; the default is the paper's RoBERTa-large fine-tuned "
        "one epoch on the Pile",
    )
    pooling: Literal["mean", "cls"] = "mean"
    max_tokens: int = Field(512, ge=8, le=32768)
    normalize: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    batch_tokens: int = Field(16384, ge=64, description="token budget of one batch")
    storage: Literal["float32", "float16"] = Field(
        "float32",
        description="dtype of the published vectors: float32 as the paper's index; float16 "
        "halves the disk (our option; the index then holds float16-rounded vectors)",
    )


class IndexSpec(_Section):
    """The FAISS index of each shard and how many servers serve it."""

    type: str = Field("flat", description="'flat' (exact L2) or a FAISS factory string")
    replicas: int = Field(1, ge=1)
    train_sample: int = Field(100_000, ge=1, description="vectors used to train IVF/PQ")
    nprobe: int | None = Field(None, ge=1)
    recall_queries: int = Field(200, ge=0, description="held-out queries for recall@k")
    use_gpu: Literal["auto", "always", "never"] = "auto"
    rerank: int = Field(
        0,
        ge=0,
        description="re-rank k x rerank candidates exactly against the float16 embeddings "
        "on disk (0 = off)",
    )


class RetrievalSpec(_Section):
    """How test documents find their neighbors across the shard servers."""

    neighbors: int = Field(50, ge=0, le=10_000)
    distance_threshold: float | None = Field(
        4.0,
        ge=0,
        description="Euclidean (not squared) L2 distance: a neighbor is used when its "
        "distance is < this (the reference's 4.0); null = no threshold",
    )
    timeout_seconds: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0, le=10)
    servers: list[str] = Field(default_factory=list, description="static shard URLs")
    service: str | None = Field(None, description="headless Service '<name>.<service>'")
    in_process: bool = Field(
        False, description="search the published indexes inside the worker (no servers)"
    )
    exclude_identical: bool = Field(True, description="the leakage guard")
    identical_distance: float = Field(
        1e-3, ge=0, description="Euclidean distance at or under which a neighbor is the query"
    )
    allow_partial: bool = Field(
        False,
        description="score a document on the shards that answered (at least minShards); "
        "false: every shard must answer, else the worker waits and retries the document",
    )
    min_shards: int = Field(1, ge=1, description="with allowPartial, shards that must answer")
    deadline_seconds: float = Field(
        30.0, gt=0, description="wall-clock limit of one search, retries and backoff included"
    )
    max_backoff_seconds: float = Field(2.0, gt=0, description="cap of one retry's backoff")
    wait_seconds: float = Field(
        900.0,
        ge=0,
        description="how long an eval worker waits for missing shards before it fails",
    )
    registry_hosts: list[str] = Field(
        default_factory=list,
        description="hosts a registry entry may point at besides loopback (the token goes there)",
    )
    # Beyond the paper: SIFT (Hübotter et al.) chooses the neighbors among K' candidates.
    selection: Literal["nearest", "sift"] = Field(
        "nearest", description="nearest = the paper's TTT-NN; sift = SIFT among `candidates`"
    )
    candidates: int | None = Field(
        None, ge=1, le=1000, description="K', the candidates SIFT chooses among (4 x neighbors)"
    )
    sift_lambda: float = Field(0.01, gt=0, description="SIFT's lambda (observation noise)")

    @model_validator(mode="after")
    def _enough_candidates(self) -> RetrievalSpec:
        if self.candidates is not None and self.candidates < self.neighbors:
            raise ValueError(
                f"candidates ({self.candidates}) must be >= neighbors ({self.neighbors})"
            )
        return self

    @property
    def candidate_count(self) -> int:
        """K': what the retriever is asked for (neighbors itself for nearest selection)."""
        if self.selection == "nearest":
            return self.neighbors
        if self.candidates is not None:
            return self.candidates
        return max(self.neighbors, min(4 * self.neighbors, 1000))  # a server answers k <= 1024


class TTTSpec(_Section):
    """The language model and the test-time training loop (paper defaults)."""

    model: str = "gpt2-large"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    method: Literal[
        "ttt-nn", "dynamic-eval", "in-context", "in-context-prefix", "interpolation"
    ] = "ttt-nn"
    learning_rate: float = Field(2e-5, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    max_length: int = Field(1024, ge=2)
    stride: int | None = Field(None, ge=1, description="defaults to maxLength")
    steps_per_neighbor: int = Field(1, ge=1)
    order: Literal["nearest-first", "farthest-first"] = "nearest-first"
    reset_optimizer: bool = Field(True, description="false = the reference code's carry-over")
    split_text: bool = Field(
        False,
        description="as the reference: the query is the first min(1024, n/2) tokens, the "
        "rest is scored",
    )
    in_context_threshold: float | None = Field(
        2.3, ge=0, description="in-context: neighbors at Euclidean distance < this (reference)"
    )
    eval_after: list[int] = Field(default_factory=lambda: [0, 50])
    engine: Literal["auto", "sequential", "ensemble"] = Field(
        "auto",
        description="auto = the ensemble engine wherever it equals the sequential loop "
        "(ttt-nn, resetOptimizer true), else the sequential loop",
    )
    ensemble_size: int | None = Field(
        None, ge=1, le=1024, description="documents trained at once; none = from free memory"
    )

    @field_validator("eval_after")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError("checkpoints must be >= 0")
        return sorted(set(value))

    @property
    def chunk_stride(self) -> int:
        return self.stride or self.max_length


class EvalSpec(_Section):
    """Which test documents are evaluated and how the work is split into ranks."""

    tasks: Literal["all"] | list[str] = "all"
    portion: float = Field(0.2, gt=0, le=1)
    seed: int = 1216
    selection: Literal["reference", "sorted-ids"] = Field(
        "reference",
        description="reference = the paper's code (test-file order, random.Random(seed) "
        "shuffle, first int(portion * n)); sorted-ids = ids sorted, seeded per task",
    )
    max_documents_per_task: int | None = Field(None, ge=1)
    workers: int = Field(1, ge=1, description="ranks (world size)")


class StorageSpec(_Section):
    """The artifact store: a local directory by default, or any S3-compatible endpoint."""

    endpoint: str | None = Field(None, description="host:port of MinIO/S3; none = local")
    bucket: str = "ttt"
    secure: bool = False
    region: str | None = None
    root: str = Field("ttt-store", description="local store directory")
    credentials_file: str | None = Field(None, description="mounted Secret (dir or file)")
    cache_dir: str | None = None


class MetricsSpec(_Section):
    """Prometheus exposition and the optional Pushgateway for batch jobs."""

    enabled: bool = True
    port: int = Field(9090, ge=0, le=65535, description="0 = any free port")
    pushgateway: str | None = None


class RunSpec(_Section):
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    retrieval: RetrievalSpec = Field(default_factory=RetrievalSpec)
    ttt: TTTSpec = Field(default_factory=TTTSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)


class Metadata(_Section):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


# Which sections each stage's output depends on: a stage is redone when, and only when,
# one of these changes (the hash goes into its manifest).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",),
    "embed": ("corpus", "embedding"),
    "index": ("corpus", "embedding", "index"),
    "eval": ("corpus", "embedding", "index", "retrieval", "ttt", "eval"),
    "report": ("corpus", "embedding", "index", "retrieval", "ttt", "eval"),
}

# Operational fields: how a stage's output is served or reached, never what it contains.
# They stay out of every stage hash, so scaling the index servers (`helm upgrade --set
# index.replicas=3`) or giving retrieval a longer timeout neither makes the servers refuse
# their index nor discards finished eval records.
OPERATIONAL_FIELDS: dict[str, frozenset[str]] = {
    "index": frozenset({"replicas"}),
    "retrieval": frozenset(
        {"timeout_seconds", "retries", "servers", "service", "in_process"}
        # Partial records are never kept where partial results are not allowed (the worker
        # evaluates them again), so allowPartial and minShards can stay out too.
        | {"allow_partial", "min_shards", "deadline_seconds", "max_backoff_seconds"}
        | {"wait_seconds", "registry_hosts"}
    ),
    # each document trains as its own model, so how many train at once never changes a result
    "ttt": frozenset({"ensemble_size"}),
}


class TTTRun(_Section):
    """A whole run: `apiVersion`, `kind`, `metadata` and `spec`, as a Kubernetes object."""

    api_version: Literal["ttt.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["TTTRun"] = "TTTRun"
    metadata: Metadata
    spec: RunSpec = Field(default_factory=RunSpec)

    @model_validator(mode="after")
    def _consistent(self) -> TTTRun:
        t = self.spec.ttt
        if t.chunk_stride > t.max_length:
            raise ValueError("spec.ttt.stride must not exceed spec.ttt.maxLength")
        if t.method == "dynamic-eval" and not t.split_text:
            # without the split it would train on the very tokens it scores
            raise ValueError("spec.ttt.method dynamic-eval needs spec.ttt.splitText: true")
        r = self.spec.retrieval
        margin = EXCLUDE_MARGIN if r.exclude_identical else 0
        if not r.in_process and r.candidate_count + margin > SERVER_MAX_K:
            field = "candidates" if r.selection == "sift" else "neighbors"
            raise ValueError(
                f"spec.retrieval.{field}: {r.candidate_count} (+{margin} leakage-guard candidates) "
                f"is above what a shard server accepts (k <= {SERVER_MAX_K}); at most "
                f"{SERVER_MAX_K - margin}, or set retrieval.inProcess"
            )
        if r.min_shards > self.spec.corpus.shards:
            raise ValueError(
                f"spec.retrieval.minShards: {r.min_shards} is more than the "
                f"{self.spec.corpus.shards} shard(s) of spec.corpus.shards"
            )
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def prefix(self) -> str:
        """The store prefix under which every artifact of this run lives."""
        return f"runs/{self.metadata.name}"

    def stage_hash(self, stage: str) -> str:
        """A digest of the spec sections that a stage's output depends on."""
        sections = {
            s: getattr(self.spec, s).model_dump(
                mode="json", exclude=set(OPERATIONAL_FIELDS.get(s, ()))
            )
            for s in STAGE_INPUTS[stage]
        }
        retrieval = sections.get("retrieval")
        if retrieval is not None and retrieval.get("selection") == "nearest":
            # SIFT's fields change nothing under nearest selection: they stay out of the hash,
            # so runs from before selection existed keep their hashes (and their results)
            for name in ("selection", "candidates", "sift_lambda"):
                retrieval.pop(name, None)
        blob = json.dumps(sections, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> list[str]:
    """Overlay TTT_<SECTION>__<FIELD>=value variables onto the raw spec; returns errors."""
    errors: list[str] = []
    sections = {_normalise(n): n for n in RunSpec.model_fields}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        head = _normalise(parts[0])
        if head == "metadata":
            target, model, path = raw.setdefault("metadata", {}), Metadata, ["metadata"]
        elif head in sections:
            spec = raw.setdefault("spec", {})
            if not isinstance(spec, dict):
                continue
            section = sections[head]
            alias = RunSpec.model_fields[section].alias or section
            target = spec.setdefault(alias, {})
            model = RunSpec.model_fields[section].annotation
            path = ["spec", alias]
        else:
            continue  # other TTT_ variables (credentials, log level) are not spec fields
        if len(parts) != 2 or not isinstance(target, dict):
            errors.append(f"{var}: expected {ENV_PREFIX}<SECTION>__<FIELD>")
            continue
        fields = {_normalise(n): (f.alias or n) for n, f in model.model_fields.items()}
        key = fields.get(_normalise(parts[1]))
        if key is None:
            errors.append(f"{var}: {'.'.join(path)} has no field '{parts[1]}'")
            continue
        target[key] = yaml.safe_load(value) if value != "" else None
    return errors


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} error(s) in the run spec"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(document)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_spec(raw: Any, source: str = "<spec>", environ: dict[str, str] | None = None) -> TTTRun:
    """Validate a parsed YAML document, with TTT_ environment overrides applied first."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a run spec must be a mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # a deep copy that env overrides may change
    env_errors = _apply_env(raw, dict(os.environ if environ is None else environ))
    if env_errors:
        raise SpecError(f"{source}: bad environment overrides\n  " + "\n  ".join(env_errors))
    try:
        return TTTRun.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(source, exc)) from None


def load_spec(path: str | Path, environ: dict[str, str] | None = None) -> TTTRun:
    """Read, override from the environment and validate a run spec YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read run spec: {exc.strerror}") from None
    return loads_spec(text, str(path), environ)


def loads_spec(text: str, source: str = "<spec>", environ: dict[str, str] | None = None) -> TTTRun:
    """Like load_spec, from YAML text (the KFP components pass the spec as a string)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SpecError(f"{source}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(raw, source, environ)


def resolve_spec(value: str, environ: dict[str, str] | None = None) -> TTTRun:
    """A spec given as YAML text, a file path, or an s3:// URI (how pipelines pass it).

    For an s3:// URI the store's endpoint and credentials come from the environment
    (TTT_STORAGE__ENDPOINT, TTT_STORAGE__SECURE, TTT_S3_ACCESS_KEY, ...), as in a pod.
    """
    text = value.strip()
    if "\n" in text or text.startswith(("apiVersion", "{")):
        return loads_spec(text, "<spec parameter>", environ)
    if text.startswith("s3://"):
        from ttt.store import open_store

        bucket, _, key = text[len("s3://") :].partition("/")
        raw: dict[str, Any] = {"metadata": {"name": "spec-fetch"}}
        _apply_env(raw, dict(os.environ if environ is None else environ))
        storage = StorageSpec.model_validate(
            {**raw.get("spec", {}).get("storage", {}), "bucket": bucket}
        )
        if not storage.endpoint:
            raise SpecError(f"{text}: set TTT_STORAGE__ENDPOINT to read a spec from S3")
        data = open_store(storage).get_bytes(key)
        return loads_spec(data.decode("utf-8"), text, environ)
    return load_spec(text, environ)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a TTTRun document (camelCase, as users write it)."""
    schema = TTTRun.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "TTTRun"
    return schema
