"""Every Grafana panel query returns data from a real Prometheus scraping real ttt processes.

Prometheus (and the Pushgateway) are the Debian packages `prometheus` and
`prometheus-pushgateway`; `make test` installs them (scripts/install-servers). Prometheus
scrapes, every second, a running `ttt serve` shard server, a running `ttt eval` worker and
this test process while it embeds the shard; each panel's PromQL must then answer through /api/v1/query.
The server and the worker are scraped with the relabelings of the chart's rendered monitors,
as a chart index pod and a KFP pipeline pod (their pod labels as service discovery gives them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helm_chart import by_kind, objects, render
from index_shards import TOKEN, free_port, start_server, stop, wait_ready
from prometheus_client import start_http_server
from tiny_run import tiny_spec
from tool_paths import debian_binary, missing

from ttt import telemetry
from ttt.embed import embed_shard
from ttt.index.build import build_shard_index
from ttt.spec import load_spec
from ttt.stages import publish_corpus
from ttt.store import open_store

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "ttt" / "dashboards" / "ttt.json"
RUN = "dash"

# What Grafana puts in for the dashboard's variables before it sends a query: every
# namespace (the local Prometheus's series have none), the run's name, 1m rate windows.
VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$run": RUN}
KFP_RUN = "6f0c2a1e-kfp-run-id"


def binary(name: str) -> str:
    """The path of a Debian-packaged binary: fail in CI when it is missing, skip elsewhere."""
    return debian_binary(name) or missing(
        name, "run scripts/install-servers (`make test` does)", f"apt-get install {name}"
    )


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], substitute(target["expr"]))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_committed_dashboard_is_the_generated_one() -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e .[test]")
    from ttt.dashboard import build

    assert DASHBOARD.read_text(encoding="utf-8") == build(), "run `python -m ttt.dashboard`"


def test_queries_use_rate_interval_and_the_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "namespace", "run"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Grafana's window, never a literal one (too short for a 30 s scrape interval).
            assert all(w == "$__rate_interval" for w in re.findall(r"\[([^\]]+)\]", expr)), expr
            for selector in re.findall(r"ttt_[a-z_]+\{([^}]*)\}", expr):
                assert 'namespace=~"$namespace"' in selector and 'run=~"$run"' in selector, expr


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {stop(proc)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout} s")


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, **kwargs) -> Iterator[subprocess.Popen]:
    """A loopback server subprocess, stopped (and its output closed) on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
    try:
        wait_http(ready_url, proc)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def pushgateway() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with process(cmd, f"{url}/-/ready"):
        yield url


@contextlib.contextmanager
def prometheus(
    tmp: Path,
    targets: dict[str, str],
    gateway: str,
    pods: dict[str, tuple[dict, list]] | None = None,
) -> Iterator[str]:
    """Prometheus on a loopback port scraping `targets` (job -> host:port) every second.

    `pods` gives a job the meta labels its pod would have under Kubernetes service discovery
    and the relabel configs to apply to them (from a rendered monitor).
    """
    pods = pods or {}
    jobs = []
    for job, target in targets.items():
        meta, relabel = pods.get(job, ({}, []))
        jobs.append(
            {
                "job_name": job,
                "static_configs": [{"targets": [target], "labels": meta}],
                "relabel_configs": relabel,
            }
        )
    jobs.append(
        {
            "job_name": "pushgateway",
            "honor_labels": True,
            "static_configs": [{"targets": [gateway.removeprefix("http://")]}],
        }
    )
    config = tmp / "prometheus.yml"
    # JSON is YAML: no YAML writer needed
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": jobs,
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with process(cmd, f"{url}/-/ready", cwd=tmp):
        yield url


def query(prom: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    body = reply.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def series(prom: str, match: str) -> list[dict[str, str]]:
    """The label sets of every series `match` selects, over the last ten minutes."""
    params = {"match[]": match, "start": str(time.time() - 600)}
    body = httpx.get(f"{prom}/api/v1/series", params=params, timeout=5).json()
    assert body["status"] == "success", f"{match}: {body.get('error')}"
    return body["data"]


def has_data(result: list[dict]) -> bool:
    """A non-empty vector with a finite value (Grafana draws nothing for NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@contextlib.contextmanager
def metrics_of_this_process() -> Iterator[int]:
    """This test process's default registry (the in-process embed stage's metrics), each
    series labelled with the run's name as `ttt embed` labels them."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=telemetry.RunLabelled(RUN))
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def monitor_relabelings(kind: str, name: str) -> list[dict]:
    """A rendered monitor's relabelings (values-gpu.yaml) as Prometheus relabel configs, the
    operator's camelCase fields in Prometheus's snake_case."""
    import yaml

    pytest.importorskip("helm_python")
    values = yaml.safe_load((ROOT / "charts" / "ttt" / "values-gpu.yaml").read_text())
    (monitor,) = [
        m for m in by_kind(objects(render(values)), kind) if m["metadata"]["name"] == name
    ]
    endpoint = monitor["spec"].get("podMetricsEndpoints", monitor["spec"].get("endpoints"))[0]
    snake = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{snake.get(k, k): v for k, v in r.items()} for r in endpoint.get("relabelings", [])]


def pod_meta(labels: dict[str, str]) -> dict[str, str]:
    """Pod labels as Kubernetes service discovery names them for relabeling."""
    return {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
        for k, v in labels.items()
    }


def scrape_targets(prom: str) -> dict[str, str]:
    reply = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()
    return {t["labels"]["job"]: t["health"] for t in reply["data"]["activeTargets"]}


@pytest.mark.slow
@pytest.mark.integration
def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    queries = panel_queries()
    assert len(queries) >= 20, "the dashboard lost its panels"
    server_port, eval_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(pushgateway())
        own_port = stack.enter_context(metrics_of_this_process())
        # The shard server as the chart's index pod, the worker as a KFP ttt-eval pod: each
        # with its pod's labels and its monitor's relabelings.
        pods = {
            "ttt-shard": (
                pod_meta({"ttt.dev/run": RUN, "app.kubernetes.io/component": "index"}),
                monitor_relabelings("ServiceMonitor", "ttt-index"),
            ),
            "ttt-eval": (
                pod_meta({"pipeline/runid": KFP_RUN, "app.kubernetes.io/part-of": "ttt"}),
                monitor_relabelings("PodMonitor", "ttt-pipeline"),
            ),
        }
        prom = stack.enter_context(
            prometheus(
                tmp_path,
                {
                    "ttt-shard": f"127.0.0.1:{server_port}",
                    "ttt-eval": f"127.0.0.1:{eval_port}",
                    "ttt-embed": f"127.0.0.1:{own_port}",
                },
                gateway,
                pods,
            )
        )
        # One document per task, two neighbors, short sequences: a few seconds per document
        # on a busy two-core machine, and the worker still lives across several scrapes.
        text = tiny_spec(tmp_path, RUN, shards=1)
        for before, after in (
            ("metrics: {port: 0}", f"metrics: {{port: {eval_port}, pushgateway: '{gateway}'}}"),
            ("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1"),
            ("neighbors: 4", "neighbors: 2"),
            ("evalAfter: [0, 2, 4]", "evalAfter: [0, 2]"),
            ("maxLength: 64", "maxLength: 32"),
        ):
            assert before in text, before
            text = text.replace(before, after)
        spec = tmp_path / "run.yaml"
        spec.write_text(text)
        run = load_spec(spec)
        store = open_store(run.spec.storage)
        publish_corpus(run, store, progress=False)
        embed_shard(run, store, 0, progress=False)
        build_shard_index(run, store, 0)

        server = start_server(spec, 0, server_port, TOKEN)
        stack.callback(stop, server)
        wait_ready(f"http://127.0.0.1:{server_port}")
        work = tmp_path / "work"
        work.mkdir()
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ttt",
                "eval",
                "--spec",
                str(spec),
                "--rank",
                "0",
                "--world-size",
                "1",
                "--no-progress",
                "--flush-seconds",
                "0",
            ],
            # its own TMPDIR: the worker keeps its results file under tempfile.gettempdir()
            env={
                **os.environ,
                "TTT_AUTH_TOKEN": TOKEN,
                "TTT_LOG_LEVEL": "WARNING",
                "TMPDIR": str(work),
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        stack.callback(stop, worker)

        # Poll every panel while the worker runs (its gauges vanish once it exits) and for a
        # few scrapes after it (the rates need two samples); each must answer at some point.
        missing = dict.fromkeys(queries)
        seen_eval_up = False
        deadline = time.monotonic() + 300
        ended: float | None = None
        while missing and time.monotonic() < deadline:
            for title, expr in list(missing):
                if has_data(query(prom, expr)):
                    del missing[(title, expr)]
            seen_eval_up |= scrape_targets(prom).get("ttt-eval") == "up"
            if worker.poll() is not None:
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 5:
                    break
            time.sleep(0.25)
        if worker.poll() is None:
            worker.wait(300)
        output = stop(worker)
        assert worker.returncode == 0, output
        assert seen_eval_up, "Prometheus never scraped the eval worker"
        assert scrape_targets(prom)["ttt-shard"] == "up"
        assert not missing, "panels without data:\n" + "\n".join(
            f"  {title}: {expr}" for title, expr in missing
        )

        # ... and the data came from the process that owns each metric (this test process
        # may hold other metrics of earlier in-process tests, so the job is checked).
        for job, metric in (
            ("ttt-shard", "ttt_index_shard_ready"),
            ("ttt-shard", "ttt_index_request_duration_seconds_count"),
            ("ttt-eval", "ttt_eval_documents_total"),
            ("ttt-eval", "ttt_train_steps_total"),
            ("ttt-eval", "ttt_retrieval_duration_seconds_count"),
            ("ttt-embed", "ttt_embed_documents_total"),
        ):
            assert query(prom, f'count_over_time({metric}{{job="{job}"}}[5m])'), (job, metric)

        # The dashboard's `run`: one value for the chart's pod and the pipeline's alike, from
        # the series themselves; the KFP run id stays apart as `kfp_run`.
        # (instance="": the worker's final figures, pushed with job ttt-eval, not scraped)
        scraped = series(prom, '{__name__=~"ttt_.+", job=~"ttt-shard|ttt-eval", instance!=""}')
        assert {(s["job"], s.get("run")) for s in scraped} == {
            ("ttt-shard", RUN),
            ("ttt-eval", RUN),
        }, scraped
        assert {s.get("kfp_run") for s in scraped if s["job"] == "ttt-eval"} == {KFP_RUN}
        assert not [s for s in scraped if "exported_run" in s]

        # The worker's final figures reached the Pushgateway and, through it, Prometheus.
        pushed = httpx.get(f"{gateway}/metrics", timeout=5).text
        assert (
            f'ttt_eval_final_documents{{instance="",job="ttt-eval",rank="0",run="{RUN}"}}' in pushed
        )
        assert "ttt_eval_final_bits_per_byte{" in pushed
        deadline = time.monotonic() + 10
        while not query(prom, f'ttt_eval_final_documents{{run="{RUN}"}}'):
            assert time.monotonic() < deadline, "Prometheus never scraped the pushed figures"
            time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.integration
def test_push_final_reaches_a_real_pushgateway() -> None:
    with pushgateway() as gateway:
        telemetry.push_final(
            gateway,
            job="ttt-test",
            grouping={"run": "push", "rank": "3"},
            figures={
                "test_final_documents": 7,
                "test_final_bits_per_byte": {(("phase", "after"), ("task", "ArXiv")): 0.75},
            },
        )
        pushed = httpx.get(f"{gateway}/metrics", timeout=5).text
    lines = {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in pushed.splitlines()
        if line.startswith("ttt_test_final")
    }
    assert (
        float(lines['ttt_test_final_documents{instance="",job="ttt-test",rank="3",run="push"}'])
        == 7
    )
    key = (
        'ttt_test_final_bits_per_byte{instance="",job="ttt-test",phase="after",rank="3",'
        'run="push",task="ArXiv"}'
    )
    assert float(lines[key]) == 0.75


@pytest.mark.integration
def test_push_final_without_a_gateway_or_with_a_dead_one_is_not_fatal() -> None:
    telemetry.push_final(None, job="ttt-test", grouping={}, figures={"x": 1})
    telemetry.push_final(
        f"http://127.0.0.1:{free_port()}", job="ttt-test", grouping={}, figures={"x": 1}
    )
