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
