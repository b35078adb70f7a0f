"""TTTRun, the whole run spec, and what each stage's output depends on (its hash)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import yaml
from pydantic import Field, model_validator

from ttt.spec.sections import API_VERSION, EXCLUDE_MARGIN, SERVER_MAX_K, Metadata, RunSpec, Section

# Which sections each stage's output depends on: a stage is redone when, and only when,
# one of these changes (the hash goes into its manifest).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",),
    "embed": ("corpus", "embedding"),
    "index": ("corpus", "embedding", "index"),
    "eval": ("corpus", "embedding", "index", "retrieval", "ttt", "eval"),
    "report": ("corpus", "embedding", "index", "retrieval", "ttt", "eval"),
}

# The sections outside every stage's inputs (storage, metrics, tracking) are operational as a
# whole: where artifacts, metrics and MLflow runs go never changes a figure.

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
    # and recomputing activations in the backward gives the same numbers
    "ttt": frozenset({"ensemble_size", "recompute"}),
}


class TTTRun(Section):
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
