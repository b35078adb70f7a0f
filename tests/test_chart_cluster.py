"""The chart's values against the cluster they meet: KFP's MinIO, image pulls, Prometheus."""

from __future__ import annotations

import pytest
import yaml
from helm_chart import CHART, RELEASE, by_kind, objects, render
from netpol import selects

from tests.test_chart import VARIANTS, _load

# Kubeflow Pipelines' own MinIO: the Service `minio-service` in `kubeflow`, port 9000
# (KFP's manifests, third-party/minio/base/minio-service.yaml; the kind workflow reads the
# same name and port from the installed Service).
KFP_MINIO = "minio-service.kubeflow:9000"


def run_spec_text(docs: list[dict]) -> str:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{RELEASE}-run"]
    return cm["data"]["run.yaml"]


@pytest.fixture(scope="module")
def rendered_values() -> dict[str, list[dict]]:
    return {name: objects(render(_load(src))) for name, src in VARIANTS.items()}


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_values_name_kfps_minio_and_corpus_in_the_stores_bucket(
    rendered_values, variant, s3_server
):
    """The run spec each values file renders, loaded by the library's own validation, names
    KFP's MinIO Service, and its corpus URIs pass the corpus reader against a real S3 server
    holding the store's bucket: the reader rejects a URI whose bucket is not the store's
    (`s3://pile/...` against bucket `ttt` failed here)."""
    from ttt.corpus.reader import resolve_sources
    from ttt.spec import loads_spec
    from ttt.store import open_store

    run = loads_spec(run_spec_text(rendered_values[variant]), f"{variant}: run.yaml", environ={})
    storage = run.spec.storage
    assert storage.endpoint == KFP_MINIO, f"{variant}: run.spec.storage.endpoint"
    values = {**yaml.safe_load((CHART / "values.yaml").read_text()), **_load(VARIANTS[variant])}
    store_port = values.get("networkPolicy", {}).get("store", {}).get("port", 9000)
    assert int(storage.endpoint.rsplit(":", 1)[1]) == store_port, "networkPolicy.store.port"
    # The store of the spec, at the stand-in's address: same bucket, same reader.
    store = open_store(storage, endpoint=s3_server)
    store.ensure_bucket()
    uris = [*run.spec.corpus.train, *run.spec.corpus.test]
    assert uris and all(u.startswith("s3://") for u in uris), uris
    for uri in uris:
        # One object per URI (a glob gets one match), as a user's upload would leave it.
        key = uri.split("/", 3)[3].replace("*", "part-00")
        store.put_bytes(key, b'{"text": "x", "meta": {"pile_set_name": "Github"}}\n')
    sources = resolve_sources(uris, store)
    assert len(sources) == len(uris), sources
    assert all(s.name.startswith(f"s3://{storage.bucket}/") for s in sources), sources


# kube-prometheus-stack's Prometheus with its default values (*SelectorNilUsesHelmValues:
# true): each selector is `matchLabels: {release: <its release name>}`, every namespace.
KPS_RELEASE = "kube-prometheus-stack"
KPS_SELECTORS = {
    "ServiceMonitor": {"matchLabels": {"release": KPS_RELEASE}},
    "PodMonitor": {"matchLabels": {"release": KPS_RELEASE}},
    "PrometheusRule": {"matchLabels": {"release": KPS_RELEASE}},
}


MONITORS_ON = {
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}


@pytest.mark.parametrize("variant", ["monitors-on", "gpu"])
def test_kube_prometheus_stacks_default_selectors_pick_up_every_monitor(variant):
    values = MONITORS_ON if variant == "monitors-on" else _load(VARIANTS["gpu"])
    docs = objects(render(values))
    found = [d for d in docs if d["kind"] in KPS_SELECTORS]
    # ServiceMonitor, the eval PodMonitor, the KFP pipeline PodMonitor, the PrometheusRule.
    assert sorted(d["kind"] for d in found) == sorted(
        ["ServiceMonitor", "PodMonitor", "PodMonitor", "PrometheusRule"]
    )
    for doc in found:
        labels = doc["metadata"]["labels"]
        assert selects(KPS_SELECTORS[doc["kind"]], labels), (doc["metadata"]["name"], labels)


def test_monitor_release_label_follows_the_values_and_own_labels_win():
    other = {"monitoring": {**MONITORS_ON["monitoring"], "prometheusRelease": "prom"}}
    for doc in objects(render(other)):
        if doc["kind"] in KPS_SELECTORS:
            assert doc["metadata"]["labels"]["release"] == "prom"
            assert not selects(KPS_SELECTORS[doc["kind"]], doc["metadata"]["labels"])
    off = {"monitoring": {**MONITORS_ON["monitoring"], "prometheusRelease": ""}}
    for doc in objects(render(off)):
        if doc["kind"] in KPS_SELECTORS:
            assert "release" not in doc["metadata"]["labels"], doc["metadata"]["name"]
    own = {
        "monitoring": {
            **MONITORS_ON["monitoring"],
            "serviceMonitor": {"enabled": True, "labels": {"release": "mine", "team": "ml"}},
        }
    }
    (sm,) = [d for d in objects(render(own)) if d["kind"] == "ServiceMonitor"]
    assert (
        sm["metadata"]["labels"]["release"] == "mine" and sm["metadata"]["labels"]["team"] == "ml"
    )


def pod_specs_of(docs: list[dict]) -> dict[str, dict]:
    """Every pod template the chart renders, by workload: the index StatefulSet, the eval Job."""
    kinds = ("StatefulSet", "Job", "Deployment", "DaemonSet", "CronJob")
    specs = {}
    for doc in docs:
        if doc["kind"] in kinds:
            spec = doc["spec"]
            if doc["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            specs[f"{doc['kind']}/{doc['metadata']['name']}"] = spec["template"]["spec"]
    return specs


def test_image_pull_secrets_reach_every_pod():
    pulls = [{"name": "ghcr-pull"}, {"name": "mirror-pull"}]
    docs = objects(render({"imagePullSecrets": pulls, "eval": {"enabled": True}}))
    specs = pod_specs_of(docs)
    assert {k.split("/")[0] for k in specs} == {"StatefulSet", "Job"}, sorted(specs)
    for name, spec in specs.items():
        assert spec.get("imagePullSecrets") == pulls, name
    for name, spec in pod_specs_of(objects(render({"eval": {"enabled": True}}))).items():
        assert "imagePullSecrets" not in spec, name


def test_schema_rejects_malformed_pull_secrets_and_release_labels():
    import helm_python as helm

    for bad, where in (
        ({"imagePullSecrets": ["ghcr-pull"]}, "imagePullSecrets"),
        ({"imagePullSecrets": [{"secret": "ghcr-pull"}]}, "secret"),
        ({"monitoring": {"prometheusRelease": "kube prometheus"}}, "prometheusRelease"),
    ):
        with pytest.raises(helm.HelmValuesError, match=where):
            render(bad)


def documented_helm_installs() -> list[tuple[str, int, str]]:
    """(file, offset, line) of every `helm install` the README and docs/ show."""
    import re

    from tests.test_chart import ROOT

    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"helm install [^`\n]+", text):
            found.append((path.name, m.start(), m.group(0)))
    return found


def test_pipeline_values_leave_the_eval_job_off_and_docs_say_who_evaluates():
    """One evaluation owner per rank: the values used with the pipeline (whose ttt-eval
    evaluates every rank) render no eval Job; a documented install that turns the Job on
    is the path without Kubeflow."""
    for name in ("gpu", "cpu"):
        assert not by_kind(objects(render(_load(VARIANTS[name]))), "Job"), name
    installs = documented_helm_installs()
    assert {"getting-started.md", "paper.md"} <= {f for f, _, _ in installs}, installs
    from tests.test_chart import ROOT

    for file, offset, line in installs:
        if "eval.enabled=true" in line:
            before = (ROOT / "docs" / file).read_text(encoding="utf-8")[
                max(0, offset - 300) : offset
            ]
            assert "Without Kubeflow" in before, (file, line)


def test_documented_installs_create_the_namespace_after_the_secrets():
    """Each documented `helm install` creates its namespace, and getting-started creates
    every Secret the chart and the pipeline name, in both namespaces, before it."""
    import re

    from tests.test_chart import ROOT

    for file, _, line in documented_helm_installs():
        assert "--create-namespace" in line, (file, line)
    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    install = text.index("helm install ")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_ns = re.search(r"helm install \S+ \S+ -n (\S+)", text[install:]).group(1)
    first = text[:install]
    assert f"kubectl create namespace {chart_ns}" in first
    loop = re.search(r"for ns in ([^;]+); do(.*?)done", first, re.DOTALL)
    assert loop, "getting-started creates the Secrets per namespace in a loop"
    namespaces = loop.group(1).split()
    assert chart_ns in namespaces and values["pipelines"]["rbac"]["namespace"] in namespaces
    in_loop = set(re.findall(r"create secret generic (\S+)", loop.group(2)))
    # The pipeline's Secrets (store_secret, auth_secret) in both namespaces.
    assert {values["secrets"]["store"]["name"], values["secrets"]["auth"]["name"]} <= in_loop
    created = set(re.findall(r"create secret generic (\S+)", first))
    assert {s["name"] for s in values["secrets"].values()} <= created, created


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_grace_period_outlasts_drain_and_server_shutdown(variant):
    """The kubelet's SIGKILL comes after terminationGracePeriodSeconds: the server drains
    (--drain-seconds, unready but answering) and then gives in-flight requests uvicorn's
    shutdown timeout; 30 s of grace against 5 + 30 s killed servers mid-answer."""
    from ttt.index.lifecycle import SHUTDOWN_SECONDS

    (sts,) = by_kind(objects(render(_load(VARIANTS[variant]))), "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    (server,) = [c for c in spec["containers"] if c["name"] == "index"]
    (drain,) = [
        float(a.split("=", 1)[1]) for a in server["args"] if a.startswith("--drain-seconds=")
    ]
    assert spec["terminationGracePeriodSeconds"] > drain + SHUTDOWN_SECONDS, variant


def test_chart_refuses_a_grace_period_the_shutdown_does_not_fit():
    with pytest.raises(Exception, match="terminationGracePeriodSeconds"):
        render({"index": {"drainSeconds": 5, "terminationGracePeriodSeconds": 35}})
    render({"index": {"drainSeconds": 5.5, "terminationGracePeriodSeconds": 36}})


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_index_servers_wait_unready_for_the_index_instead_of_crash_looping(variant):
    """Installed before the pipeline has run, a server has no index to load: the rendered
    command, parsed by ttt's own CLI, waits for it (tests/test_index_wait_published.py
    runs that) rather than exiting, which made the kubelet restart it in a loop."""
    from ttt.cli import build_parser

    (sts,) = by_kind(objects(render(_load(VARIANTS[variant]))), "StatefulSet")
    (server,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "index"]
    args = build_parser().parse_args(server["args"])
    assert args.wait_for_index is not None and args.wait_for_index > 0, server["args"]
    # Alive while it waits: the liveness probe asks /healthz, which answers during the wait.
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"


# The store's pods as Kubeflow Pipelines runs them, behind Service minio-service:9000.
# KFP up to 2.14: MinIO (pods app: minio, port 9000), no NetworkPolicy of its own.
# KFP 2.15 and later: SeaweedFS (pods app: seaweedfs, S3 on container port 8333) and its own
# NetworkPolicy (manifests/kustomize/third-party/seaweedfs/base/seaweedfs/
# seaweedfs-networkpolicy.yaml), which admits port 8333 from pods of its own namespace and
# from namespaces labelled app.kubernetes.io/part-of=kubeflow-profile (restated here, with
# its rules for istio-system and the profile controller left out: they admit no ttt pod).
MINIO = ("kubeflow", {"app": "minio"}, 9000)
SEAWEEDFS = ("kubeflow", {"app": "seaweedfs"}, 8333)
SEAWEEDFS_POLICY = {
    "kind": "NetworkPolicy",
    "metadata": {"name": "seaweedfs", "namespace": "kubeflow"},
    "spec": {
        "podSelector": {
            "matchExpressions": [{"key": "app", "operator": "In", "values": ["seaweedfs"]}]
        },
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {
                                    "key": "app.kubernetes.io/part-of",
                                    "operator": "In",
                                    "values": ["kubeflow-profile"],
                                }
                            ]
                        }
                    }
                ],
                "ports": [{"port": 8333}],
            },
            {"from": [{"podSelector": {}}], "ports": [{"port": 8333}]},
        ],
    },
}


def chart_pods(docs: list[dict]) -> dict[str, object]:
    from netpol import Pod

    return {
        d["kind"]: Pod(d["metadata"]["namespace"], d["spec"]["template"]["metadata"]["labels"])
        for d in docs
        if d["kind"] in ("StatefulSet", "Job")
    }


@pytest.mark.parametrize(
    ("values", "store", "reachable"),
    [
        ({}, MINIO, True),
        ({}, SEAWEEDFS, True),
        (
            {"networkPolicy": {"store": {"seaweedfs": {"admitFromRelease": False}}}},
            SEAWEEDFS,
            False,
        ),
        ({"networkPolicy": {"store": {"seaweedfs": {"enabled": False}}}}, SEAWEEDFS, False),
    ],
)
def test_the_store_is_reachable_under_both_kfp_stores(values, store, reachable):
    """The index servers and eval workers reach KFP's store, MinIO (KFP <= 2.14) or SeaweedFS
    (KFP >= 2.15), through every NetworkPolicy in force: the chart's egress, SeaweedFS's own
    ingress policy and the chart's admission next to it. Before, the chart allowed only
    app: minio on 9000, and SeaweedFS's policy admitted no ttt pod."""
    from netpol import Pod, allowed

    docs = objects(render({**values, "eval": {"enabled": True}}))
    policies = [*by_kind(docs, "NetworkPolicy"), SEAWEEDFS_POLICY]
    namespace, labels, port = store
    target = Pod(namespace, labels)
    pods = chart_pods(docs)
    assert set(pods) == {"StatefulSet", "Job"}
    for kind, pod in pods.items():
        assert allowed(policies, pod, target, port) is reachable, (kind, store)
    # The evaluator can say no: nothing else in kubeflow is opened to the release's pods.
    assert not allowed(policies, pods["Job"], Pod("kubeflow", {"app": "ml-pipeline"}), 8888)


def test_scaling_down_deletes_the_removed_pods_claims():
    """values-gpu.yaml gives each index pod a 100Gi claim: fewer shards must not leave the
    removed pods' claims bound (the StatefulSet controller deletes them on scale-down)."""
    (sts,) = by_kind(objects(render(_load(VARIANTS["gpu"]))), "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"], "values-gpu.yaml persists the index cache"
    policy = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert policy == {"whenDeleted": "Retain", "whenScaled": "Delete"}
    keep = {"index": {"persistence": {"enabled": True, "deleteOnScaleDown": False}}}
    (sts,) = by_kind(objects(render(keep)), "StatefulSet")
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    (sts,) = by_kind(objects(render({})), "StatefulSet")  # an emptyDir: no claims at all
    assert "persistentVolumeClaimRetentionPolicy" not in sts["spec"]
