"""The Grafana dashboard as code: `python -m ttt.dashboard` writes charts/ttt/dashboards/ttt.json."""

from __future__ import annotations

import sys
from pathlib import Path

# The chart's copy; tests/test_dashboard.py checks it is byte-identical to a fresh build.
TARGET = Path(__file__).resolve().parents[1] / "charts" / "ttt" / "dashboards" / "ttt.json"
# Every query is filtered by the dashboard's variables: `run` is the TTTRun name of the
# chart's pods, or the KFP run id of a pipeline's pods (the chart's monitors relabel both).
F = 'namespace=~"$namespace", run=~"$run"'
RATE = "[$__rate_interval]"
LN2 = "0.6931471805599453"  # the loss counter is in nats; bits = nats / ln 2


def rate(metric: str, by: str, extra: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{F}{extra}}}{RATE}))"


def quantile(q: str, histogram: str, by: str = "") -> str:
    keys = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) (rate({histogram}_bucket{{{F}}}{RATE})))"


def bits_per_byte(by: str, phase: str = "") -> str:
    extra = f', phase="{phase}"' if phase else ""
    nats = rate("ttt_eval_loss_nats_total", by, extra)
    scored = rate("ttt_eval_scored_bytes_total", by, extra)
    return f"{nats} / {scored} / {LN2}"


# (row, [(kind, title, description, unit, [(expr, legend)])]) in display order.
PANELS = [
    (
        "Evaluation",
        [
            (
                "timeseries",
                "Documents done",
                "Test documents evaluated per second, by task.",
                "ops",
                [(rate("ttt_eval_documents_total", "task"), "{{task}}")],
            ),
            (
                "stat",
                "Documents pending",
                "Test documents left, over all ranks.",
                "short",
                [(f"sum(ttt_eval_documents_pending{{{F}}})", "pending")],
            ),
            (
                "stat",
                "Seconds since last progress",
                "Since a worker last finished a document (alert: TTTEvalStalled).",
                "s",
                [(f"time() - max(ttt_eval_last_progress_timestamp_seconds{{{F}}})", "seconds")],
            ),
            (
                "timeseries",
                "Bits per byte by task: before and after",
                "Of the documents scored in the window, weighted by their bytes over all ranks.",
                "none",
                [(bits_per_byte("task, phase"), "{{task}} {{phase}}")],
            ),
            (
                "timeseries",
                "Bits per byte gained",
                "Before minus after training on the neighbors, per task (higher is better).",
                "none",
                [
                    (
                        f"({bits_per_byte('task', 'before')}) - ({bits_per_byte('task', 'after')})",
                        "{{task}}",
                    )
                ],
            ),
            (
                "timeseries",
                "Training throughput",
                "Tokens trained on per second, by rank.",
                "short",
                [(rate("ttt_train_tokens_total", "rank"), "rank {{rank}}")],
            ),
            (
                "timeseries",
                "Optimizer steps",
                "Test-time optimizer steps per second, by rank.",
                "ops",
                [(rate("ttt_train_steps_total", "rank"), "rank {{rank}}")],
            ),
            (
                "timeseries",
                "Seconds per document by phase (p50)",
                "Median seconds per document spent retrieving, training and scoring.",
                "s",
                [(quantile("0.5", "ttt_eval_stage_duration_seconds", "phase"), "{{phase}}")],
            ),
        ],
    ),
    (
        "Retrieval",
        [
            (
                "timeseries",
                "Retrieval latency",
                "Client fan-out over all shards, merge included.",
                "s",
                [
                    (quantile("0.5", "ttt_retrieval_duration_seconds"), "p50"),
                    (quantile("0.99", "ttt_retrieval_duration_seconds"), "p99"),
                ],
            ),
            (
                "timeseries",
                "Shard search latency",
                "Search latency on each shard server.",
                "s",
                [
                    (
                        quantile("0.5", "ttt_index_request_duration_seconds", "shard"),
                        "p50 {{shard}}",
                    ),
                    (
                        quantile("0.99", "ttt_index_request_duration_seconds", "shard"),
                        "p99 {{shard}}",
                    ),
                ],
            ),
            (
                "timeseries",
                "Partial retrievals",
                "Retrievals answered without every shard, and failed shard requests.",
                "ops",
                [
                    (
                        f"sum(rate(ttt_retrieval_partial_total{{{F}}}{RATE})) or vector(0)",
                        "partial",
                    ),
                    (
                        f"sum(rate(ttt_retrieval_shard_failures_total{{{F}}}{RATE})) or vector(0)",
                        "shard failures",
                    ),
                ],
            ),
            (
                "timeseries",
                "Shard requests by code",
                "Search requests per second by status.",
                "reqps",
                [(rate("ttt_index_requests_total", "shard, code"), "shard {{shard}} {{code}}")],
            ),
            (
                "timeseries",
                "Neighbors served",
                "Neighbors returned per second, by shard.",
                "ops",
                [(rate("ttt_index_vectors_served_total", "shard"), "shard {{shard}}")],
            ),
            (
                "timeseries",
                "Neighbors excluded by the leakage guard",
                "Neighbors dropped because they are the test document itself.",
                "ops",
                [(rate("ttt_eval_neighbors_excluded_total", "rank"), "rank {{rank}}")],
            ),
        ],
    ),
    (
        "Shards",
        [
            (
                "stat",
                "Shard health",
                "1 once a shard's index is loaded and served.",
                "short",
                [(f"max by (shard) (ttt_index_shard_ready{{{F}}})", "shard {{shard}}")],
            ),
            (
                "stat",
                "Vectors per shard",
                "Vectors in each loaded shard index.",
                "short",
                [(f"max by (shard) (ttt_index_shard_vectors{{{F}}})", "shard {{shard}}")],
            ),
        ],
    ),
    (
        "Embedding",
        [
            (
                "timeseries",
                "Embedding throughput",
                "Tokens embedded per second, by shard.",
                "short",
                [(rate("ttt_embed_tokens_total", "shard"), "shard {{shard}}")],
            ),
            (
                "timeseries",
                "Documents embedded",
                "Documents embedded per second, by shard.",
                "ops",
                [(rate("ttt_embed_documents_total", "shard"), "shard {{shard}}")],
            ),
        ],
    ),
]


def build() -> str:
    """The dashboard's JSON text (deterministic: the same code gives the same bytes)."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")

    def variable(name: str, label: str, query: str):
        return (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(source)
            .query(query)
            .include_all(True)
            .all_value(".*")
            .refresh(2)  # on time range change: new runs and namespaces appear
        )

    board = (
        dashboard.Dashboard("TTT-NN: test-time training on nearest neighbors")
        .uid("ttt-nn")
        .description(
            "Evaluation progress, bits per byte, retrieval and shard health "
            "(metric names: docs/metrics.md). Generated by `python -m ttt.dashboard`."
        )
        .tags(["ttt", "faiss", "kubeflow"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
        .with_variable(
            variable("namespace", "Namespace", "label_values(ttt_index_shard_ready, namespace)")
        )
        .with_variable(variable("run", "Run", 'label_values({__name__=~"ttt_.+"}, run)'))
    )
    for row, panels in PANELS:
        board = board.with_row(dashboard.Row(row))
        for kind, title, description, unit, targets in panels:
            panel = timeseries.Panel() if kind == "timeseries" else stat.Panel()
            panel = panel.title(title).description(description).unit(unit).datasource(source)
            panel = panel.height(8).span(8)
            for ref, (expr, legend) in zip("ABCD", targets, strict=False):
                panel = panel.with_target(
                    prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
                )
            board = board.with_panel(panel)
    return JSONEncoder(sort_keys=True, indent=2).encode(board.build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    target = Path(argv[0]) if argv else TARGET
    target.write_text(build(), encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
