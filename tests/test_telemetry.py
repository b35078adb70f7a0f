"""The metric definitions: promtool's lint on their exposition, counters rather than gauges."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from tool_paths import promtool

from ttt import telemetry

METRICS = [m for m in vars(telemetry).values() if isinstance(m, MetricWrapperBase)]


def exposition() -> bytes:
    """Every ttt metric with a sample (promtool lints names only where samples are), in a
    registry of its own; the label sets made for it are removed again."""
    registry = CollectorRegistry()
    made = []
    for metric in METRICS:
        registry.register(metric)
        if metric._labelnames:
            values = ["promtool"] * len(metric._labelnames)
            metric.labels(*values)
            made.append((metric, values))
    try:
        return generate_latest(registry)
    finally:
        for metric, values in made:
            metric.remove(*values)
        for metric in METRICS:
            registry.unregister(metric)


def test_promtool_check_metrics_is_clean() -> None:
    text = exposition()
    for metric in METRICS:
        suffix = "_total" if metric._type == "counter" else ""
        assert f"# TYPE {metric._name}{suffix} ".encode() in text, metric._name
    proc = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def test_no_gauge_duplicates_a_counter_rate() -> None:
    gauges = [m._name for m in METRICS if m._type == "gauge"]
    assert not [g for g in gauges if g.endswith(("_per_second", "_bits_per_byte"))], gauges


def test_bits_per_byte_are_two_counters_with_the_same_labels() -> None:
    nats, scored = telemetry.EVAL_LOSS_NATS, telemetry.EVAL_BYTES
    assert nats._type == scored._type == "counter"
    assert nats._labelnames == scored._labelnames == ("rank", "task", "phase")


def test_run_labelled_adds_the_run_to_every_series_and_keeps_a_series_own() -> None:
    from prometheus_client import Counter, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    Counter("ttt_x_total", "x", ["shard"], registry=registry).labels("0").inc(3)
    Histogram("ttt_y_seconds", "y", buckets=(1,), registry=registry).observe(0.5)
    Counter("ttt_z_total", "z", ["run"], registry=registry).labels("other").inc()
    text = generate_latest(telemetry.RunLabelled("demo", registry)).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert {s.name for s in samples} >= {"ttt_x_total", "ttt_y_seconds_bucket", "ttt_z_total"}
    runs = {s.name: s.labels["run"] for s in samples}
    assert runs["ttt_x_total"] == runs["ttt_y_seconds_count"] == "demo"
    assert runs["ttt_z_total"] == "other"
    assert next(s for s in samples if s.name == "ttt_x_total").value == 3
    # a scrape asking for some names only (`?name[]=`) gets those, still labelled
    with_x = generate_latest(
        telemetry.RunLabelled("demo", registry).restricted_registry(["ttt_x_total"])
    )
    assert b'ttt_x_total{run="demo",shard="0"} 3.0' in with_x and b"ttt_y" not in with_x
    # the same text promtool lints, run label and all
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
