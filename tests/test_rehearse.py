"""`ttt rehearse`: its pieces against the real manifests, then the whole rehearsal of the demo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from ttt.rehearse.apiserver import ApiServer, merge
from ttt.rehearse.images import image_for
from ttt.rehearse.pods import Objects, Pod, PodError, command, environment, process, quantity
from ttt.rehearse.standins import DOCS, Keys, StandInError, documented_secrets

ROOT = Path(__file__).resolve().parents[1]
KEYS = Keys("AK", "SK", "ROAK", "ROSK", "tok")


def test_images_are_read_from_their_dockerfiles():
    index = image_for("ghcr.io/acme/ttt-index:0.1.0@sha256:ab")
    assert index.entrypoint == ["ttt"] and index.cmd[0] == "serve"
    assert index.user == (10001, 10001) and index.workdir == "/home/ttt"
    assert index.env["HOME"] == "/home/ttt" and index.env["PATH"].startswith(sys.prefix)
    assert image_for("ttt-cpu:ci").cmd == ["--help"]
    with pytest.raises(Exception, match="not one of the project's"):
        image_for("python:3.11")


def test_secrets_are_made_as_getting_started_says(tmp_path):
    made = documented_secrets(KEYS)
    for ns in ("ttt", "kubeflow"):
        assert made[(ns, "ttt-store")] == {"accesskey": b"AK", "secretkey": b"SK"}
        assert made[(ns, "ttt-auth")] == {"token": b"tok"}
    assert made[("ttt", "ttt-store-readonly")] == {"accesskey": b"ROAK", "secretkey": b"ROSK"}
    # A doc line reading a file the rehearsal cannot fill is an error naming the line.
    doc = tmp_path / "doc.md"
    doc.write_text("kubectl -n ttt create secret generic x --from-file=k=./mystery\n")
    with pytest.raises(StandInError, match=r"doc.md:1: secret x reads ./mystery"):
        documented_secrets(KEYS, doc)
    assert DOCS.is_file()


def _pod(spec: dict) -> Pod:
    return Pod("p-0", "ttt", {"app": "a"}, "10.244.1.2", "p-0", spec)


def test_a_pods_environment_is_only_what_its_manifest_and_image_give():
    objects = Objects(secrets={("ttt", "s"): {"k": b"v"}}, configmaps={("ttt", "c"): {"x": "y"}},
                      api_host="10.244.2.3:443")  # fmt: skip
    container = {"name": "c", "image": "ttt-eval:ci", "args": ["eval", "$(A)"], "env": [
        {"name": "A", "value": "a"},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "x"}}},
        {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]}  # fmt: skip
    env = environment(_pod({"containers": [container]}), container, objects)
    assert {k: env[k] for k in "ABCDE"} == {
        "A": "a",
        "B": "v",
        "C": "y",
        "D": "a",
        "E": "10.244.1.2",
    }
    assert env["KUBERNETES_SERVICE_HOST"] == "10.244.2.3" and "TTT_S3_ACCESS_KEY" not in env
    assert command(container, env) == ["ttt", "eval", "a"]  # ENTRYPOINT + args, $(A) expanded
    missing = {
        **container,
        "env": [{"name": "B", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}],
    }
    with pytest.raises(PodError, match="secret ttt/nope not found"):
        environment(_pod({"containers": [missing]}), missing, objects)


def test_resource_fields_round_up_as_the_downward_api_does():
    import os

    from ttt.rehearse.pods import resource_field

    res = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2"}}
    assert resource_field(res, {"resource": "requests.cpu"}) == "1"  # 0.5 core -> 1
    assert resource_field(res, {"resource": "limits.cpu", "divisor": "1"}) == "2"
    assert resource_field(res, {"resource": "requests.cpu", "divisor": "100m"}) == "5"
    assert resource_field(res, {"resource": "requests.memory", "divisor": "1Mi"}) == "1024"
    # an unset limit is the node's allocatable; an unset request its limit
    assert resource_field({}, {"resource": "limits.cpu"}) == str(os.cpu_count())
    assert resource_field({"limits": {"cpu": "3"}}, {"resource": "requests.cpu"}) == "3"


def test_the_charts_pods_get_their_cpu_limit_as_openmp_threads():
    """torch and FAISS start a thread per core unless told: each pod gets its CPU limit."""
    from ttt.rehearse.run import render_chart

    values = yaml.safe_load((ROOT / "charts" / "ttt" / "values-cpu.yaml").read_text())
    values["eval"]["enabled"] = True
    objects = Objects(secrets={}, configmaps={}, api_host="10.244.2.3:443")
    seen = {}
    for doc in render_chart(values):
        if doc["kind"] not in ("StatefulSet", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            mine = {**container, "env": [e for e in container["env"] if "resourceFieldRef"
                                         in e.get("valueFrom", {})]}  # fmt: skip
            env = environment(_pod({"containers": [mine]}), mine, objects)
            seen[doc["kind"]] = env["OMP_NUM_THREADS"]
    limits = {
        k: str(int(float(values[k]["resources"]["limits"]["cpu"]))) for k in ("index", "eval")
    }
    assert seen == {"StatefulSet": limits["index"], "Job": limits["eval"]}


def test_volumes_sizes_and_the_user_come_from_the_manifest(tmp_path):
    objects = Objects(secrets={("ttt", "s"): {"token": b"t"}}, sa_tokens={("ttt", "default"): "x"})
    spec = {
        "securityContext": {"runAsUser": 10001, "runAsNonRoot": True, "fsGroup": 10001},
        "containers": [{"name": "c", "image": "ttt-index:ci", "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"}, {"name": "tok", "mountPath": "/var/run/t"}],
            "securityContext": {"readOnlyRootFilesystem": True}}],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "tok", "secret": {"secretName": "s", "defaultMode": 288}}],
    }  # fmt: skip
    got = process(_pod(spec), objects, tmp_path / "created")
    by_path = {m["path"]: m for m in got["mounts"]}
    assert by_path["/home/ttt"]["owner"] == 10001  # the image's home, its user's
    assert [m["size"] for m in got["mounts"] if m["path"] == "/tmp"][-1] == quantity("1Gi")
    assert by_path["/var/run/t"]["files"]["token"]["mode"] == 0o440
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in by_path  # automounted token
    assert got["readOnlyRoot"] and got["uid"] == 10001 and got["fsGroup"] == 10001


def test_the_api_stand_in_authorizes_by_the_charts_roles():
    sys.path.insert(0, str(ROOT / "tests"))
    from helm_chart import objects, render

    rbac = [o for o in objects(render(yaml.safe_load((ROOT / "charts/ttt/values-cpu.yaml").read_text())))
            if o["kind"] in ("Role", "RoleBinding")]  # fmt: skip
    api = ApiServer.__new__(ApiServer)
    api.rbac = rbac
    kfp = ("kubeflow", "pipeline-runner")
    assert api.allowed(kfp, "patch", "apps", "statefulsets", "ttt", "ttt-index")
    assert api.allowed(kfp, "get", "apps", "statefulsets/status", "ttt", "ttt-index")
    assert api.allowed(kfp, "get", "", "configmaps", "ttt", "ttt-run")
    assert not api.allowed(kfp, "delete", "apps", "statefulsets", "ttt", "ttt-index")
    assert not api.allowed(kfp, "get", "", "configmaps", "ttt", "other")
    assert not api.allowed(
        ("kubeflow", "default"), "get", "apps", "statefulsets", "ttt", "ttt-index"
    )
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}


def test_a_task_pod_gets_what_its_platform_spec_declares():
    """deploy-index and ttt-eval as KFP's driver makes their pods from full-cpu.yaml: the
    store Secret's keys as env (the loop's `pipelinechannel--store_secret` resolved to the
    run's `store_secret`), the auth Secret as a volume, the labels, the KFP account."""
    from types import SimpleNamespace

    from ttt.rehearse.network import Node
    from ttt.rehearse.pipeline import TaskPods, read_pipeline

    spec, platform = read_pipeline(ROOT / "pipelines" / "full-cpu.yaml")
    cluster = SimpleNamespace(run_id="r1", node=Node())
    tasks = TaskPods(
        cluster, spec, platform, {"store_secret": "ttt-store", "auth_secret": "ttt-auth"}
    )
    image = spec["deploymentSpec"]["executors"]["exec-deploy-index"]["container"]["image"]
    deploy = tasks.pod("exec-deploy-index", image, ["sh", "-c", "x"], {"store_secret": "ttt-store"})
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in deploy.container["env"]}
    assert env["TTT_S3_ACCESS_KEY"] == {"name": "ttt-store", "key": "accesskey", "optional": False}
    assert deploy.namespace == "kubeflow" and deploy.spec["serviceAccountName"] == "pipeline-runner"
    evaluate = tasks.pod("exec-ttt-eval", image, ["sh", "-c", "x"], {})
    assert evaluate.spec["volumes"][0]["secret"]["secretName"] == "ttt-auth"
    assert evaluate.container["volumeMounts"][0]["mountPath"] == "/var/run/ttt/token"
    assert evaluate.labels["ttt.dev/index-client"] == "true"
    # the pushed models' cache: a sized emptyDir where TTT_MODELS_CACHE points
    models = {v["name"]: v for v in evaluate.spec["volumes"]}["models"]
    assert models["emptyDir"]["sizeLimit"] == "1Gi"
    mounts = {m["name"]: m["mountPath"] for m in evaluate.container["volumeMounts"]}
    cache = {e["name"]: e.get("value") for e in evaluate.container["env"]}["TTT_MODELS_CACHE"]
    assert mounts["models"] == cache == "/var/cache/ttt-models"


def test_the_spec_names_its_models_by_store_path_where_they_can_be_pushed(tmp_path):
    from ttt.rehearse.models import ModelPushError, plan_pushes

    spec = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    pushes = plan_pushes(spec, "ttt", "demo.yaml")
    assert pushes == {
        "spec.embedding.model": ("all-minilm-l6-v2", "s3://ttt/rehearse/models/all-minilm-l6-v2"),
        "spec.ttt.model": ("smollm2-135m", "s3://ttt/rehearse/models/smollm2-135m"),
    }
    assert spec["spec"]["ttt"]["model"] == "s3://ttt/rehearse/models/smollm2-135m"
    # already by store path: left alone; a hub id: nothing here to push (no egress)
    assert plan_pushes(spec, "ttt", "demo.yaml") == {}
    spec["spec"]["ttt"]["model"] = "gpt2-large"
    with pytest.raises(ModelPushError, match=r"spec\.ttt\.model: 'gpt2-large'"):
        plan_pushes(spec, "ttt", "demo.yaml")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(3000)
def test_the_demo_rehearses_with_the_cpu_values_and_pushed_models(tmp_path):
    """The README's test command runs the rehearsal itself: the chart with values-cpu.yaml and
    pipelines/full-cpu.yaml on the demo spec (cut to --slice documents per file), its models
    pushed into the store and fetched by the pods with no egress, and its report equals
    `ttt run`'s (with the offline models) to the printed digit."""
    import json
    import subprocess

    if sys.platform != "linux":
        pytest.skip("the rehearsal needs Linux namespaces")
    work = tmp_path / "rehearsal"
    done = subprocess.run(
        [sys.executable, "-m", "ttt", "rehearse", "--values", "charts/ttt/values-cpu.yaml",
         "--spec", "examples/demo.yaml", "--slice", "400", "--push-models",
         "--workdir", str(work)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=2900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert "ttt rehearse: passed" in done.stdout
    assert "stand-in: the Kubernetes API" in done.stdout
    assert "spec.ttt.model: smollm2-135m pushed to s3://ttt/rehearse/models/smollm2-135m" in (
        done.stdout
    )
    # The pods really ran as their manifests say: every task of the pipeline and both index
    # pods have logs, deploy-index went through the API stand-in, artifacts reached the store.
    logs = {p.name: p for p in (work / "logs").glob("*.log")}
    for name in ("ttt_ttt-index-0.log", "ttt_ttt-index-1.log"):
        assert name in logs, sorted(logs)
    for task in (
        "corpus-shard",
        "shard-embed",
        "index-build",
        "deploy-index",
        "ttt-eval",
        "report",
    ):
        assert any(n.startswith(f"kubeflow_{task}-") for n in logs), (task, sorted(logs))
    # each ttt-eval pod fetched the language model from the store into its models volume
    evals = [p.read_text() for n, p in logs.items() if n.startswith("kubeflow_ttt-eval-")]
    assert evals and all(
        "fetched model s3://ttt/rehearse/models/smollm2-135m" in t for t in evals
    ), evals[0][-3000:]
    pod = json.loads(next((work / "pods").glob("ttt_ttt-index-0.json")).read_text())
    assert pod["readOnlyRoot"] and pod["uid"] == 10001 and "TTT_S3_ACCESS_KEY" not in pod["env"]
    # one OpenMP thread each: the index pod's CPU limit and the eval tasks' request (1 core)
    assert pod["env"]["OMP_NUM_THREADS"] == "1"
    for task in (work / "pods").glob("kubeflow_ttt-eval-*.json"):
        assert json.loads(task.read_text())["env"]["OMP_NUM_THREADS"] == "1", task.name
