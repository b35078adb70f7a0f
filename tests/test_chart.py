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
from helm_chart import CHART, NAMESPACE, by_kind, objects, render
from tool_paths import missing, promtool

from tests.chart_schema import SCHEMA, with_run_schema

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
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
_GPU = yaml.safe_load((CHART / "values-gpu.yaml").read_text(encoding="utf-8"))
VARIANTS = {
    "default": None,
    "all-on": ALL_ON,
    "gpu": CHART / "values-gpu.yaml",
    "cpu": CHART / "values-cpu.yaml",
    # Without Kubeflow (docs): the GPU values with the chart's eval Job as the rank owner.
    "gpu-no-kfp": {**_GPU, "eval": {**_GPU["eval"], "enabled": True}},
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
        # One object lives in the store's namespace: the NetworkPolicy admitting this
        # release's pods to KFP's SeaweedFS (values networkPolicy.store.seaweedfs).
        store_admission = doc["metadata"]["name"] == f"ttt-{NAMESPACE}-store"
        expected = "kubeflow" if store_admission else NAMESPACE
        assert doc["metadata"]["namespace"] == expected, doc["metadata"]["name"]
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
        assert all(e.get("port") or e.get("portNumber") for e in spec["podMetricsEndpoints"])
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


def test_the_gpu_values_run_is_the_papers() -> None:
    """values-gpu.yaml names its run pile-gpt2-large: it is the paper's, departing in nothing."""
    from ttt.spec import loads_spec
    from ttt.spec.parity import departures

    raw = _load(VARIANTS["gpu"])["run"]
    assert raw["metadata"]["name"] == "pile-gpt2-large"
    run = loads_spec(yaml.safe_dump(raw), source=str(VARIANTS["gpu"]), environ={})
    assert [d.line() for d in departures(run)] == []


def test_gpu_resources_only_in_the_gpu_render(rendered) -> None:
    assert gpus(rendered["gpu"]) == [1]  # the index server (the pipeline evaluates)
    assert gpus(rendered["gpu-no-kfp"]) == [1, 1]  # the index server and the eval worker
    for variant in ("default", "all-on", "cpu"):
        assert not any(gpus(rendered[variant])), variant


def test_secrets_are_referenced_never_created(rendered) -> None:
    for variant, docs in rendered.items():
        assert not by_kind(docs, "Secret"), variant
        for doc in docs:
            if doc["kind"] not in ("StatefulSet", "Job"):
                continue
            spec = doc["spec"]["template"]["spec"]
            secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            # The index servers only read the store: they get the read-only keys.
            store = "ttt-store-readonly" if doc["kind"] == "StatefulSet" else "ttt-store"
            assert secrets == {"ttt-auth", store}, (variant, doc["kind"])
            for c in spec["containers"]:
                # Files, not environment variables: nothing secret in `kubectl describe`
                # (the only env from elsewhere: OMP_NUM_THREADS, the container's CPU limit).
                sources = [e["valueFrom"] for e in c.get("env", []) if "valueFrom" in e]
                assert all(list(v) == ["resourceFieldRef"] for v in sources), (variant, sources)


def test_eval_is_an_indexed_job_with_world_size(rendered) -> None:
    assert not by_kind(rendered["default"], "Job")
    (job,) = by_kind(rendered["gpu-no-kfp"], "Job")
    workers = _load(VARIANTS["gpu-no-kfp"])["run"]["spec"]["eval"]["workers"]
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


def test_eval_pods_cache_pushed_models_on_a_sized_volume(rendered) -> None:
    """The GPU values name their models by store path (no hub egress): the eval pods fetch
    them into a volume sized for gpt2-large and the encoder, told by TTT_MODELS_CACHE."""
    spec = _load(VARIANTS["gpu"])["run"]["spec"]
    assert spec["ttt"]["model"] == "s3://ttt/models/gpt2-large"
    assert spec["embedding"]["model"] == "s3://ttt/models/roberta-large-pile"
    (job,) = by_kind(rendered["gpu-no-kfp"], "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["TTT_MODELS_CACHE"] == mounts["models"] == "/var/cache/ttt-models"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume == {"name": "models", "emptyDir": {"sizeLimit": "8Gi"}}
    notes = render(_load(VARIANTS["gpu"]))["ttt/templates/NOTES.txt"]
    for model in (spec["ttt"]["model"], spec["embedding"]["model"]):
        assert f"ttt models push <model directory or .gguf> {model} --hub-id" in notes
    assert "emptyDir, 8Gi" in notes and "ttt models push" not in render()["ttt/templates/NOTES.txt"]
    values = {**_GPU, "eval": {**_GPU["eval"], "enabled": True}}
    values["models"] = {"cache": {"existingClaim": "ttt-models"}}
    (job,) = by_kind(objects(render(values)), "Job")
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"]
    assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "ttt-models"}}


def test_run_configmap_is_a_valid_run_spec(rendered) -> None:
    from ttt.spec import loads_spec

    for variant, docs in rendered.items():
        (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "ttt-run"]
        run = loads_spec(cm["data"]["run.yaml"], f"{variant}: run.yaml", environ={})
        (sts,) = by_kind(docs, "StatefulSet")
        assert sts["spec"]["replicas"] == run.spec.corpus.shards * run.spec.index.replicas


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu", "all-on"])
def test_the_run_the_pods_read_is_the_run_the_values_give(rendered, variant) -> None:
    """run.yaml is the values' run merged over the chart's, a null included: Helm deletes a
    key that a user's values set to null where the chart's values.yaml sets it, so a
    `distanceThreshold: null` (no threshold, values-cpu.yaml) once came out as the 4.0 default."""
    from ttt.rehearse.run import deep_merge
    from ttt.spec import loads_spec

    default = yaml.safe_load((CHART / "values.yaml").read_text())["run"]
    given = (_load(VARIANTS[variant]) or {}).get("run", {})
    want = loads_spec(yaml.safe_dump(deep_merge(default, given)), variant, environ={})
    (cm,) = [
        d for d in by_kind(rendered[variant], "ConfigMap") if d["metadata"]["name"] == "ttt-run"
    ]
    got = loads_spec(cm["data"]["run.yaml"], f"{variant}: run.yaml", environ={})
    assert got.spec.model_dump() == want.spec.model_dump()
    if variant == "cpu":
        assert given["spec"]["retrieval"]["distanceThreshold"] is None
        assert got.spec.retrieval.distance_threshold is None


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
            assert not re.search(r"\[(?!\$__rate_interval\])", t["expr"]), t["expr"]
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
    missing(
        "checkov",
        "python -m venv build/checkov-venv && build/checkov-venv/bin/pip install checkov==3.3.30",
        "see tests/test_chart.py:checkov",
    )


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


# --- upgrades: what `helm upgrade` would change ------------------------------------------

IMMUTABLE = {
    "StatefulSet": ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"),
    "Job": ("template", "selector", "completionMode", "podFailurePolicy"),
}


def keyed(values: dict) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in objects(render(values))}


def upgrade(before: dict, after: dict) -> tuple[dict, dict]:
    """Render a release before and after an upgrade; check no immutable field changes in
    an object kept under the same name (the API server would refuse the upgrade)."""
    old, new = keyed(before), keyed(after)
    for key in old.keys() & new.keys():
        for field in IMMUTABLE.get(key[0], ()):
            assert old[key]["spec"].get(field) == new[key]["spec"].get(field), (key, field)
    return old, new


def with_run(spec: dict, eval_on: bool = True, **values) -> dict:
    base = yaml.safe_load((CHART / "values.yaml").read_text())["run"]
    base["spec"] = {
        section: {**base["spec"].get(section, {}), **spec.get(section, {})}
        for section in {*base["spec"], *spec}
    }
    return {"run": base, "eval": {"enabled": eval_on}, **values}


def index_template(docs: dict) -> dict:
    return docs[("StatefulSet", "ttt-index")]["spec"]["template"]


def test_operational_fields_leave_every_pod_template_alone() -> None:
    from ttt.spec import OPERATIONAL_FIELDS, RetrievalSpec

    samples = {
        "timeout_seconds": 99,
        "retries": 7,
        "servers": [],
        "service": "x.y:1",
        "in_process": False,
        "allow_partial": True,
        "min_shards": 2,
        "deadline_seconds": 77,
        "max_backoff_seconds": 1.5,
        "wait_seconds": 60,
        "registry_hosts": ["10.0.0.7"],
    }
    aliases = {
        "index": {"replicas": 3},
        "ttt": {"ensembleSize": 4, "recompute": True},
        "retrieval": {RetrievalSpec.model_fields[f].alias or f: v for f, v in samples.items()},
    }
    assert {s: set(v) for s, v in OPERATIONAL_FIELDS.items()} == {
        "index": {"replicas"},
        "ttt": {"ensemble_size", "recompute"},
        "retrieval": set(samples),
    }, "a new operational field: add it to ttt.runChecksum in _helpers.tpl and a sample here"
    old, new = upgrade(with_run({}), with_run(aliases))
    assert index_template(old) == index_template(new)
    jobs = [k for k in old if k[0] == "Job"]
    assert jobs and all(old[k] == new[k] for k in jobs)  # the running Job is left alone
    assert new[("StatefulSet", "ttt-index")]["spec"]["replicas"] == 6  # 2 shards x 3


def test_an_eval_only_change_replaces_the_job_and_leaves_the_index() -> None:
    before = with_run({})
    after = with_run({})
    after["eval"]["resources"] = {"requests": {"cpu": "3", "memory": "1Gi"}, "limits": {"cpu": "4"}}
    old, new = upgrade(before, after)
    assert index_template(old) == index_template(new)
    (old_job,) = [k for k in old if k[0] == "Job"]
    (new_job,) = [k for k in new if k[0] == "Job"]
    # A new name, not a patch of the immutable template: the new Job resumes from the store.
    assert old_job != new_job and new_job[1].startswith("ttt-eval-pile-gpt2-large-")


def test_a_build_change_rolls_the_servers() -> None:
    old, new = upgrade(with_run({}), with_run({"corpus": {"shards": 3}}))
    assert index_template(old) != index_template(new)


# --- the eval Job: waits for the index, survives disruptions -----------------------------


def test_eval_job_failure_policy(rendered) -> None:
    (job,) = by_kind(rendered["all-on"], "Job")
    spec = job["spec"]
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec
    assert spec["podReplacementPolicy"] == "Failed"
    ignore, fail = spec["podFailurePolicy"]["rules"]
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert fail["action"] == "FailIndex" and fail["onExitCodes"]["containerName"] == "eval"


def test_eval_waits_for_every_shard_with_the_rendered_command(rendered, tmp_path, monkeypatch):
    from ttt.index import wait

    docs = rendered["all-on"]
    (job,) = by_kind(docs, "Job")
    (init,) = job["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:3] == ["python", "-m", "ttt.index.wait"]
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert "/etc/ttt" in mounts
    # Run the rendered command's arguments against the rendered spec and environment: with
    # no server up it must fail naming the shards, at the chart's service address.
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "ttt-run"]
    (tmp_path / "run.yaml").write_text(cm["data"]["run.yaml"])
    args = [a.replace("/etc/ttt", str(tmp_path)) for a in init["command"][3:]]
    args[args.index("--timeout") + 1] = "0"
    from ttt.rehearse.pods import resource_field  # the downward API, as the kubelet resolves it

    for e in init["env"]:
        ref = e.get("valueFrom", {}).get("resourceFieldRef")
        value = resource_field(init["resources"], ref) if ref else e["value"]
        monkeypatch.setenv(e["name"], value)
    seen: list[str] = []
    monkeypatch.setattr(wait, "ready", lambda url, timeout=2.0: seen.append(url) or False)
    assert wait.main(args) == 1
    assert seen == ["http://ttt-index-0.ttt-index:8080", "http://ttt-index-1.ttt-index:8080"]


# --- network policy, disruption budget, monitoring of the KFP pods -------------------------


def test_network_policy_admits_only_index_clients_and_limits_egress(rendered) -> None:
    from pipelines.full import INDEX_CLIENT_LABEL

    policies = {
        p["metadata"]["name"]: p["spec"] for p in by_kind(rendered["default"], "NetworkPolicy")
    }
    index, worker = policies["ttt-index"], policies["ttt-eval"]
    for spec in (index, worker):
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                # No "every pod of a namespace": each peer names the pods it admits.
                assert peer.get("podSelector", {}).get("matchLabels"), peer
    peers = index["ingress"][0]["from"]
    assert {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "ttt",
                "app.kubernetes.io/instance": "ttt",
                "app.kubernetes.io/component": "eval",
            }
        }
    } in peers
    kfp = [
        p
        for p in peers
        if p.get("namespaceSelector", {}).get("matchLabels")
        == {"kubernetes.io/metadata.name": "kubeflow"}
    ]
    assert kfp == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
            "podSelector": {"matchLabels": {INDEX_CLIENT_LABEL[0]: INDEX_CLIENT_LABEL[1]}},
        }
    ]
    egress_ports = [{p["port"] for p in rule["ports"]} for rule in worker["egress"]]
    assert {53} in egress_ports and {9000} in egress_ports and {8080} in egress_ports
    # DNS, the store as MinIO (KFP <= 2.14) and as SeaweedFS (KFP >= 2.15): nothing else.
    assert [{p["port"] for p in r["ports"]} for r in index["egress"]] == [{53}, {9000}, {8333}]


@pytest.mark.parametrize(
    ("replicas", "pdb", "expected"),
    [
        (1, {}, 0),
        (1, {"allowEvictingSoleServer": True}, 1),
        (2, {}, 1),
        (2, {"maxUnavailable": 5}, 1),
        (3, {"maxUnavailable": 2}, 2),
        (1, {"maxUnavailable": "50%"}, 0),
    ],
)
def test_pdb_never_silently_evicts_a_sole_server(replicas, pdb, expected) -> None:
    values = {"run": {"spec": {"index": {"replicas": replicas}}}}
    values["index"] = {"podDisruptionBudget": pdb}
    (budget,) = by_kind(objects(render(values)), "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == expected
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    notes = render(values)["ttt/templates/NOTES.txt"]
    assert ("no index pod may be evicted" in notes) == (expected == 0)


def test_a_pod_monitor_scrapes_the_kfp_pods(rendered) -> None:
    from pipelines.full import METRICS_LABEL

    monitors = {m["metadata"]["name"]: m["spec"] for m in by_kind(rendered["gpu"], "PodMonitor")}
    kfp = monitors["ttt-pipeline"]
    assert kfp["namespaceSelector"] == {"matchNames": ["kubeflow"]}
    assert kfp["selector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "ttt",
        METRICS_LABEL[0]: METRICS_LABEL[1],
    }
    assert kfp["podMetricsEndpoints"][0]["portNumber"] == 9090
    # The dashboard's `run` variable: no monitor maps a pod label to `run` (the series carry
    # the TTTRun's name themselves; tests/test_dashboard.py scrapes through these relabelings);
    # the pipeline's pods keep KFP's run id as `kfp_run`.
    endpoints = [
        e
        for m in (
            *by_kind(rendered["gpu"], "PodMonitor"),
            *by_kind(rendered["gpu"], "ServiceMonitor"),
        )
        for e in m["spec"].get("podMetricsEndpoints", m["spec"].get("endpoints", []))
    ]
    assert len(endpoints) == 3
    assert not [r for e in endpoints for r in e.get("relabelings", []) if r["targetLabel"] == "run"]
    assert kfp["podMetricsEndpoints"][0]["relabelings"] == [
        {"sourceLabels": ["__meta_kubernetes_pod_label_pipeline_runid"], "targetLabel": "kfp_run"}
    ]


def test_notes_state_the_kfp_backend_and_the_rbac() -> None:
    notes = render()["ttt/templates/NOTES.txt"]
    assert "backend 2.14 or newer" in notes
    assert "kubeflow/pipeline-runner" in notes and "ttt-store-readonly" in notes


# --- the alerts, evaluated by promtool ----------------------------------------------------

SHARD_READY = 'ttt_index_shard_ready{{namespace="ttt", shard="{0}", pod="ttt-index-{0}"}}'
AWAITING = 'ttt_index_shard_awaiting_index{{namespace="ttt", shard="{0}", pod="ttt-index-{0}"}}'


def ready(*values: int) -> list[dict]:
    """The input series: shard s's readiness `values[s]` for 15 minutes."""
    return [{"series": SHARD_READY.format(s), "values": f"{v}x15"} for s, v in enumerate(values)]


def alerts(name: str, *expected: dict) -> dict:
    """What alert `name` must fire (nothing, when no `expected`) at 10m."""
    return {"eval_time": "10m", "alertname": name, "exp_alerts": list(expected)}


def shard_down(shard: int) -> dict:
    return {
        "exp_labels": {"severity": "critical", "namespace": "ttt", "shard": str(shard)},
        "exp_annotations": {
            "summary": f"ttt index shard {shard} has no ready server",
            "description": f"No server of shard {shard} in ttt has loaded its index for 5m; "
            "retrievals are partial.",
        },
    }


def shards_missing(ready: int) -> dict:
    return {
        "exp_labels": {"severity": "critical"},
        "exp_annotations": {
            "summary": "ttt index: fewer than 2 shards have a ready server",
            "description": f"Only {ready} of 2 shards in ttt have a ready server; "
            "retrievals are partial.",
        },
    }


def rule_test(series: list[dict], *checks: dict) -> dict:
    return {"interval": "1m", "input_series": series, "alert_rule_test": list(checks)}


RULE_TESTS = {
    "rule_files": ["rules.yml"],
    "evaluation_interval": "1m",
    "tests": [
        rule_test(
            ready(1, 0),
            alerts("TTTIndexShardDown", shard_down(1)),
            alerts("TTTIndexShardsMissing", shards_missing(1)),
        ),
        # Shard 1's only pod is gone: no series at all. Only the count sees it.
        rule_test(
            ready(1),
            alerts("TTTIndexShardDown"),
            alerts("TTTIndexShardsMissing", shards_missing(1)),
        ),
        # Nothing scraped at all (the StatefulSet scaled to 0): still an alert.
        rule_test(ready(), alerts("TTTIndexShardsMissing", shards_missing(0))),
        # Every shard ready: silence.
        rule_test(ready(1, 1), alerts("TTTIndexShardDown"), alerts("TTTIndexShardsMissing")),
        # A fresh install before the pipeline ran: both shards' servers await their index
        # (alive, unready): no shard alert. Then shard 1's index arrives but its server
        # fails to load it: that one pages.
        rule_test(
            [
                {"series": SHARD_READY.format(0), "values": "0x30"},
                {"series": SHARD_READY.format(1), "values": "0x30"},
                {"series": AWAITING.format(0), "values": "1x30"},
                {"series": AWAITING.format(1), "values": "1x10 0x20"},
            ],
            {**alerts("TTTIndexShardDown"), "eval_time": "9m"},
            {**alerts("TTTIndexShardsMissing"), "eval_time": "9m"},
            {**alerts("TTTIndexShardDown", shard_down(1)), "eval_time": "20m"},
        ),
    ],
}


def test_alert_rules_pass_promtool_tests(rendered, tmp_path) -> None:
    (rule,) = by_kind(rendered["all-on"], "PrometheusRule")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(RULE_TESTS))
    for command in (["check", "rules", "rules.yml"], ["test", "rules", "tests.yml"]):
        proc = subprocess.run(
            [promtool(), *command], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
