"""The sections of a run spec (corpus, embedding, index, retrieval, ttt, eval, storage, metrics, tracking) and their field rules."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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


class Section(BaseModel):
    # camelCase in YAML (the Kubernetes habit), snake_case in Python; unknown keys are errors
    # so that a misspelt field never silently falls back to a default.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class CorpusSpec(Section):
    """Where the training corpus and the test documents live, and how to shard the corpus."""

    train: list[str] = Field(default_factory=list, description="paths, globs or s3:// URIs")
    test: list[str] = Field(default_factory=list, description="paths, globs or s3:// URIs")
    shards: int = Field(1, ge=1, le=4096)
    strict: bool = Field(False, description="fail on the first bad corpus line")

    @field_validator("train", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EmbeddingSpec(Section):
    """The encoder that turns documents and queries into vectors (the paper: RoBERTa-large)."""

    model: str = Field(
        PAPER_ENCODER,
        description="HF id, directory, offline name, or a model pushed into this run's store "
        "(s3://bucket/prefix, `ttt models push`); the default is the paper's RoBERTa-large "
        "fine-tuned one epoch on the Pile",
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


class IndexSpec(Section):
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


class RetrievalSpec(Section):
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


class TTTSpec(Section):
    """The language model and the test-time training loop (paper defaults)."""

    model: str = Field(
        "gpt2-large",
        description="HF id, directory, .gguf file, offline name, or a model pushed into this "
        "run's store (s3://bucket/prefix, `ttt models push`: fetched, verified, loaded offline)",
    )
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
        description="auto = the fastest engine proven equal on the device: the ensemble "
        "(method ttt-nn, not float16), on a CPU one member of it; `ttt validate` names it",
    )
    ensemble_size: int | None = Field(
        None, ge=1, le=1024, description="documents trained at once; none = from free memory"
    )
    recompute: bool = Field(
        False,
        description="keep only each layer's input for the backward and run the layer again "
        "there: less memory (activations), one more forward per step, the same numbers "
        "(the sequential loop and the ensemble's stacked path)",
    )
    compile: bool = Field(
        False,
        description="the ensemble's stacked step compiled by torch.compile at one chunk shape "
        "(chunks padded to maxLength), and under bf16 autocast Adam writing the bf16 weights "
        "the forward reads; equal within float rounding, dropout masks the compiled "
        "kernels' own; compiles once per worker (seconds to minutes)",
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


class EvalSpec(Section):
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


class StorageSpec(Section):
    """The artifact store: a local directory by default, or any S3-compatible endpoint."""

    endpoint: str | None = Field(None, description="host:port of MinIO/S3; none = local")
    bucket: str = "ttt"
    secure: bool = False
    region: str | None = None
    root: str = Field("ttt-store", description="local store directory")
    credentials_file: str | None = Field(None, description="mounted Secret (dir or file)")
    cache_dir: str | None = None


class MetricsSpec(Section):
    """Prometheus exposition and the optional Pushgateway for batch jobs."""

    enabled: bool = True
    port: int = Field(9090, ge=0, le=65535, description="0 = any free port")
    pushgateway: str | None = None


class MlflowSpec(Section):
    """MLflow experiment tracking: where the resolved spec, bits per byte and report go."""

    tracking_uri: str = Field(
        description="the tracking server, e.g. http://mlflow.mlflow:5000 (or any URI MLflow takes)"
    )
    experiment: str = Field("ttt-nn", min_length=1, max_length=500)
    run_name: str | None = Field(
        None,
        min_length=1,
        max_length=250,
        description="the run's name; default <metadata.name>-<eval hash>[-kfp-<KFP run id>]",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on every run")
    timeout_seconds: int = Field(10, ge=1, le=600, description="one HTTP request's limit")
    retries: int = Field(
        1, ge=0, le=10, description="HTTP retries; a server still down is a warning, not a failure"
    )

    @field_validator("tracking_uri")
    @classmethod
    def _a_uri(cls, value: str) -> str:
        value = value.strip()
        if "://" not in value and value not in ("databricks", "databricks-uc"):
            raise ValueError("expected a URI such as http://mlflow:5000")
        return value


class TrackingSpec(Section):
    """Experiment trackers; none unless configured. They never change a result (no hash)."""

    mlflow: MlflowSpec | None = None


class RunSpec(Section):
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    retrieval: RetrievalSpec = Field(default_factory=RetrievalSpec)
    ttt: TTTSpec = Field(default_factory=TTTSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)


class Metadata(Section):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
