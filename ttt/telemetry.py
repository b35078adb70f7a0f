"""Prometheus metrics of servers and batch jobs: one place for every metric name."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    push_to_gateway,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# Names follow the Prometheus conventions: a `ttt_` namespace, base units (seconds, bytes),
# `_total` on counters. docs/metrics.md lists them with their labels.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# --- shard servers -------------------------------------------------------------------------
SEARCH_REQUESTS = Counter(
    "ttt_index_requests_total", "k-NN search requests served", ["shard", "code"]
)
SEARCH_LATENCY = Histogram(
    "ttt_index_request_duration_seconds",
    "k-NN search latency",
    ["shard"],
    buckets=_LATENCY_BUCKETS,
)
VECTORS_SERVED = Counter("ttt_index_vectors_served_total", "neighbors returned", ["shard"])
SHARD_READY = Gauge("ttt_index_shard_ready", "1 once the shard's index is loaded", ["shard"])
SHARD_VECTORS = Gauge("ttt_index_shard_vectors", "vectors in the loaded shard index", ["shard"])
SHARD_AWAITING_INDEX = Gauge(
    "ttt_index_shard_awaiting_index",
    "1 while the server waits for its run's index to be published",
    ["shard"],
)

# --- retrieval client ----------------------------------------------------------------------
RETRIEVAL_LATENCY = Histogram(
    "ttt_retrieval_duration_seconds",
    "fan-out query latency over all shards",
    buckets=_LATENCY_BUCKETS,
)
RETRIEVAL_PARTIAL = Counter(
    "ttt_retrieval_partial_total", "retrievals answered without every shard", ["shard"]
)
SHARD_FAILURES = Counter(
    "ttt_retrieval_shard_failures_total", "failed shard requests (after retries)", ["shard"]
)
SHARD_BAD_ANSWERS = Counter(
    "ttt_retrieval_bad_answers_total",
    "shard answers refused by validation (not JSON, wrong shape, NaN, wrong shard)",
    ["shard"],
)
EVAL_RETRIEVAL_WAITS = Counter(
    "ttt_eval_retrieval_waits_total",
    "times an eval worker waited for missing shards instead of recording a partial result",
    ["rank"],
)
EVAL_WAITING = Gauge(
    "ttt_eval_waiting_for_shards", "1 while an eval worker waits for missing shards", ["rank"]
)

# --- batch stages --------------------------------------------------------------------------
EMBED_TOKENS = Counter("ttt_embed_tokens_total", "tokens embedded", ["shard"])
EMBED_DOCUMENTS = Counter("ttt_embed_documents_total", "documents embedded", ["shard"])
TRAIN_TOKENS = Counter("ttt_train_tokens_total", "tokens trained on at test time", ["rank"])
TRAIN_STEPS = Counter("ttt_train_steps_total", "test-time optimizer steps", ["rank"])
DOCUMENTS_DONE = Counter("ttt_eval_documents_total", "test documents evaluated", ["rank", "task"])
DOCUMENTS_PENDING = Gauge("ttt_eval_documents_pending", "test documents left", ["rank"])
NEIGHBORS_EXCLUDED = Counter(
    "ttt_eval_neighbors_excluded_total", "neighbors dropped by the leakage guard", ["rank"]
)
# Bits per byte as two counters, so ranks are weighted by their bytes:
#   sum(rate(ttt_eval_loss_nats_total)) / sum(rate(ttt_eval_scored_bytes_total)) / ln 2.
# In nats (the loss as the model computes it): promtool's lint rejects "bits" in a name.
EVAL_LOSS_NATS = Counter(
    "ttt_eval_loss_nats_total",
    "negative log-likelihood of the scored documents, in nats",
    ["rank", "task", "phase"],
)
EVAL_BYTES = Counter(
    "ttt_eval_scored_bytes_total", "UTF-8 bytes of the scored documents", ["rank", "task", "phase"]
)
LAST_PROGRESS = Gauge(
    "ttt_eval_last_progress_timestamp_seconds",
    "when a worker last finished a document",
    ["rank"],
)
STAGE_SECONDS = Histogram(
    "ttt_eval_stage_duration_seconds",
    "seconds per test document and phase",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


class RunLabelled:
    """A registry's series, each with `run` (the TTTRun's name) added to its labels.

    Every process that knows its run exports `run` itself: KFP labels its pods with its own
    run id only, so no pod label could give the dashboard's `run` variable one value for the
    chart's index pods and the pipeline's tasks alike. A series that already has `run` (the
    Pushgateway's grouping) keeps its own.
    """

    def __init__(self, run: str, registry: CollectorRegistry = DEFAULT_REGISTRY) -> None:
        self.run = run
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s if "run" in s.labels else s._replace(labels={**s.labels, "run": self.run})
                for s in family.samples
            ]
            yield labelled

    def restricted_registry(self, names: list[str]) -> RunLabelled:
        """Only the series `names` (a scrape's `?name[]=` parameters), still labelled."""
        return RunLabelled(self.run, self.registry.restricted_registry(names))  # type: ignore[arg-type]


def labelled(run: str | None) -> Any:
    """This process's registry, every series carrying `run=<run>` when `run` is given."""
    return RunLabelled(run) if run else DEFAULT_REGISTRY


def exposition(run: str | None = None) -> bytes:
    """This process's metrics in Prometheus's text format, `run`-labelled when given."""
    return generate_latest(labelled(run))


_server_lock = threading.Lock()
_servers: dict[int, int] = {}


def start_metrics_server(port: int, addr: str | None = None, run: str | None = None) -> int:
    """Expose the default registry on `port` (0 = a free port); returns the bound port.

    Loopback unless `addr` or TTT_METRICS_ADDR says otherwise (a pod sets 0.0.0.0 so that
    Prometheus can scrape it). Every series carries `run=<run>` when `run` is given.
    Idempotent per port, so a stage may call it unconditionally.
    """
    addr = addr or os.environ.get("TTT_METRICS_ADDR", "127.0.0.1")
    with _server_lock:
        if port in _servers:
            return _servers[port]
        server, _thread = start_http_server(port, addr=addr, registry=labelled(run))
        bound = server.server_address[1]
        _servers[port] = bound
        log.info("metrics on http://%s:%d/metrics", addr, bound)
        return bound


def push_final(gateway: str | None, job: str, grouping: dict[str, str], figures: dict) -> None:
    """Push a batch job's final figures to a Pushgateway, when one is configured.

    `figures` maps a gauge name (without the ttt_ prefix) to a value or to {labels: value}.
    A push failure is logged, never fatal: the figures are also in the store.
    """
    if not gateway:
        return
    registry = CollectorRegistry()
    for name, value in figures.items():
        if isinstance(value, dict):
            keys = sorted({k for labels in value for k, _ in labels})
            gauge = Gauge(f"ttt_{name}", f"final {name}", keys, registry=registry)
            for labels, v in value.items():
                gauge.labels(**dict(labels)).set(v)
        else:
            Gauge(f"ttt_{name}", f"final {name}", registry=registry).set(value)
    try:
        push_to_gateway(gateway, job=job, grouping_key=grouping, registry=registry)
    except OSError as exc:
        log.warning("could not push final figures to %s: %s", gateway, exc)


__all__ = [name for name in dir() if name.isupper()] + [
    "DEFAULT_REGISTRY",
    "RunLabelled",
    "exposition",
    "push_final",
    "start_metrics_server",
]
