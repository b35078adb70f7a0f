"""The TTTRun specification: one YAML document that drives every stage and entry point."""

from __future__ import annotations

from ttt.spec.load import (
    json_schema,
    load_spec,
    loads_spec,
    parse_spec,
    resolve_spec,
)
from ttt.spec.run import OPERATIONAL_FIELDS, STAGE_INPUTS, TTTRun
from ttt.spec.sections import (
    API_VERSION,
    ENV_PREFIX,
    EXCLUDE_MARGIN,
    PAPER_ENCODER,
    SERVER_MAX_K,
    CorpusSpec,
    EmbeddingSpec,
    EvalSpec,
    IndexSpec,
    Metadata,
    MetricsSpec,
    MlflowSpec,
    RetrievalSpec,
    RunSpec,
    Section,
    SpecError,
    StorageSpec,
    TrackingSpec,
    TTTSpec,
)

__all__ = [
    "API_VERSION",
    "ENV_PREFIX",
    "EXCLUDE_MARGIN",
    "OPERATIONAL_FIELDS",
    "PAPER_ENCODER",
    "SERVER_MAX_K",
    "STAGE_INPUTS",
    "CorpusSpec",
    "EmbeddingSpec",
    "EvalSpec",
    "IndexSpec",
    "Metadata",
    "MetricsSpec",
    "MlflowSpec",
    "RetrievalSpec",
    "RunSpec",
    "Section",
    "SpecError",
    "StorageSpec",
    "TTTRun",
    "TTTSpec",
    "TrackingSpec",
    "json_schema",
    "load_spec",
    "loads_spec",
    "parse_spec",
    "resolve_spec",
]
