"""The Helm chart, rendered by real Helm (helm-python-sdk) and checked object by object."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart_schema import SCHEMA, with_run_schema

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "ttt"
RELEASE, NAMESPACE = "ttt", "ttt"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Prometheus Operator CRDs: kubernetes-validate has no schema for them; checked by hand below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
ALL_ON = {
    "eval": {"enabled": True},
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
}
VARIANTS = {
    "default": None,
    "all-on": ALL_ON,
    "gpu": CHART / "values-gpu.yaml",
    "cpu": CHART / "values-cpu.yaml",
}

# checkov findings accepted on purpose, each with the reason; anything else fails the test.
CHECKOV_SKIPS = {
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: images are pinned by version tag or digest "
    "(images.*.digest), and Always would forbid the images kind loads locally in CI",
    "CKV_K8S_43": "digests are only known when the release job pushes the images; the chart "
    "takes one per image in images.*.digest",
    "CKV_DOCKER_7": "the stage images start FROM ${BASE_IMAGE}, whose default is a pinned "
    "version tag; the ARG lets CI build on a locally built base",
}


def _load(source: Path | dict | None) -> dict:
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    return yaml.safe_load(source.read_text(encoding="utf-8"))


def render(values: dict | None = None) -> dict[str, str]:
    return helm.Chart.load(CHART).render(values=values or {}, name=RELEASE, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: objects(render(_load(src))) for name, src in VARIANTS.items()}


def pod_specs(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("StatefulSet", "Job")]


def telemetry_names() -> set[str]:
    from ttt import telemetry

    names = set()
    for value in vars(telemetry).values():
        if hasattr(value, "_name") and hasattr(value, "_type"):
            name = value._name
            names.add(name + "_total" if value._type == "counter" else name)
    return names


def metric_names(promql: str) -> set[str]:
    """The ttt_* series a query reads, with histogram suffixes mapped to the metric name."""
    return {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\bttt_[a-z_]+", promql)}


def test_lint_is_clean() -> None:
    for values in (None, ALL_ON, *(_load(p) for p in VARIANTS.values() if isinstance(p, Path))):
        report = helm.lint(CHART, values, strict=True)
        assert not report["errors"], report
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates(rendered, variant) -> None:
    docs = rendered[variant]
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        if doc["kind"] in CRD_KINDS:
            check_prometheus_operator_object(doc)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def check_prometheus_operator_object(doc: dict) -> None:
    """A minimal structural check of the monitoring.coreos.com/v1 objects we render."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"] and spec["endpoints"]
        assert all(e["port"] and e["path"] == "/metrics" for e in spec["endpoints"])
    elif doc["kind"] == "PodMonitor":
        assert spec["selector"]["matchLabels"] and spec["podMetricsEndpoints"]
    else:
        known = telemetry_names()
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
                assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", rule["for"])
                assert metric_names(rule["expr"]) <= known, rule["expr"]


def test_index_replicas_are_shards_times_replicas() -> None:
    run = {"spec": {"corpus": {"shards": 3}, "index": {"replicas": 2}}}
    docs = objects(render({"run": run}))
    (sts,) = by_kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 6
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    # The name deploy-index patches: <release>-index, container "index".
    assert sts["metadata"]["name"] == "ttt-index" and container["name"] == "index"
    assert "--shard-from-hostname" in container["args"]
    assert "--host=0.0.0.0" in container["args"]


def test_headless_service_gives_each_pod_a_name(rendered) -> None:
    docs = rendered["default"]
    (sts,) = by_kind(docs, "StatefulSet")
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert services["ttt-index-any"]["spec"]["type"] == "ClusterIP"
    selector = sts["spec"]["template"]["metadata"]["labels"]
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= selector.items()
    env = {
        e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TTT_RETRIEVAL__SERVICE"] == "ttt-index.ttt-index:8080"


def test_probes_and_security(rendered) -> None:
    for variant, docs in rendered.items():
        (sts,) = by_kind(docs, "StatefulSet")
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for spec in pod_specs(docs):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
                assert sc["capabilities"]["drop"] == ["ALL"], variant
                assert c["resources"]["limits"] and c["resources"]["requests"]


def gpus(docs: list[dict]) -> list[Any]:
    return [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for spec in pod_specs(docs)
        for c in spec["containers"]
    ]


def test_gpu_resources_only_in_the_gpu_render(rendered) -> None:
    assert gpus(rendered["gpu"]) == [1, 1]  # the index server and the eval worker
    for variant in ("default", "all-on", "cpu"):
        assert not any(gpus(rendered[variant])), variant


def test_secrets_are_referenced_never_created(rendered) -> None:
    for variant, docs in rendered.items():
        assert not by_kind(docs, "Secret"), variant
        for spec in pod_specs(docs):
            secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            assert secrets == {"ttt-auth", "ttt-store"}
            for c in spec["containers"]:
                # Files, not environment variables: nothing secret in `kubectl describe`.
                assert not any("valueFrom" in e for e in c.get("env", [])), variant


def test_eval_is_an_indexed_job_with_world_size(rendered) -> None:
    assert not by_kind(rendered["default"], "Job")
    (job,) = by_kind(rendered["gpu"], "Job")
    workers = _load(VARIANTS["gpu"])["run"]["spec"]["eval"]["workers"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WORLD_SIZE"] == str(workers)
    # The image's entrypoint is `ttt`; the token comes from the mounted Secret by path.
    assert c["args"] == ["eval", "--spec", "/etc/ttt/run.yaml"]
    assert env["TTT_AUTH_TOKEN_FILE"] == "/var/run/ttt/token/token"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/var/run/ttt/token" in mounts


def test_run_configmap_is_a_valid_run_spec(rendered) -> None:
    from ttt.spec import loads_spec

    for variant, docs in rendered.items():
        (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "ttt-run"]
        run = loads_spec(cm["data"]["run.yaml"], f"{variant}: run.yaml", environ={})
        (sts,) = by_kind(docs, "StatefulSet")
        assert sts["spec"]["replicas"] == run.spec.corpus.shards * run.spec.index.replicas


def test_dashboard_configmap(rendered) -> None:
    (cm,) = [
        d for d in by_kind(rendered["default"], "ConfigMap") if "dashboard" in d["metadata"]["name"]
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["ttt.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "ttt.json").read_text())
    assert not [
        d for d in by_kind(rendered["cpu"], "ConfigMap") if "dashboard" in d["metadata"]["name"]
    ]


def test_dashboard_queries_use_documented_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "ttt.json").read_text())
    known = telemetry_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "embedding",
        "training",
        "retrieval latency",
        "bits per byte",
        "documents done",
        "shard health",
        "partial",
    ):
        assert topic in titles, topic
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names and names <= known, (p["title"], t["expr"])
            assert not re.search(r"\[(?!1m\])", t["expr"]), t["expr"]  # rate windows of 1m
            used |= names
    # Every histogram the issue names has its latency quantiles on the dashboard.
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for hist in (
        "ttt_retrieval_duration_seconds_bucket",
        "ttt_index_request_duration_seconds_bucket",
    ):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le" in exprs and hist in exprs
    documented = (ROOT / "docs" / "metrics.md").read_text()
    assert all(name in documented for name in known)


def test_schema_rejects_typos() -> None:
    for bad, where in (
        ({"index": {"prot": 8080}}, "prot"),
        ({"run": {"spec": {"corpus": {"shard": 3}}}}, "shard"),
        ({"secrets": {"auth": {"name": ""}}}, "/secrets/auth/name"),
        ({"images": {"index": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    ):
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            render(bad)


def test_schema_run_part_matches_the_spec_models() -> None:
    current = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert current == with_run_schema(current), "run `python tests/chart_schema.py`"


def test_notes_name_the_secrets_and_the_shards() -> None:
    notes = render()["ttt/templates/NOTES.txt"]
    assert "2 pod(s) = 2 shard(s) x 1 replica(s)" in notes
    assert "creates no Secret" in notes and "ttt-auth" in notes and "ttt-store" in notes


def checkov() -> list[str]:
    """The checkov command: $CHECKOV, build/checkov-venv (what CI creates), or PATH."""
    for candidate in (
        os.environ.get("CHECKOV"),
        ROOT / "build" / "checkov-venv" / "bin" / "checkov",
    ):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    found = shutil.which("checkov")
    if found:
        return [found]
    if os.environ.get("CI"):
        pytest.fail(
            "checkov not found: python -m venv build/checkov-venv && "
            "build/checkov-venv/bin/pip install checkov==3.3.30"
        )
    pytest.skip("checkov not installed (see tests/test_chart.py:checkov)")


def run_checkov(args: list[str]) -> list[dict]:
    proc = subprocess.run(
        [*checkov(), *args, "--quiet", "--compact", "-o", "json", "--skip-download"],
        check=False,  # checkov exits 1 when a check fails; the findings are read below
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports), proc.stdout[:2000]
    return [f for r in reports for f in r["results"]["failed_checks"]]


@pytest.mark.slow
def test_checkov_finds_nothing_insecure(tmp_path) -> None:
    for name, source in VARIANTS.items():
        docs = objects(render(_load(source)))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    failed = run_checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    failed += run_checkov(["-d", str(ROOT / "images"), "--framework", "dockerfile"])
    unexpected = [
        f"{f['check_id']} {f['check_name']} ({f['resource']} in {f['file_path']})"
        for f in failed
        if f["check_id"] not in CHECKOV_SKIPS
    ]
    assert not unexpected, "\n".join(unexpected)
