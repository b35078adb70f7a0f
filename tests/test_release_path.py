"""The documented path from the release workflow's pinned images to the chart and the run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from release_path import DIGESTS, GETTING_STARTED, REGISTRY, ROOT, build_release

from pipelines.compile import NAMES
from ttt.rehearse.run import deep_merge  # Helm's merge of values files

STAGE = re.compile(r"/ttt-(\w+)@")


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    return build_release(tmp_path_factory.mktemp("release"))


def pipeline_docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def executors(doc: dict) -> dict:
    return doc["deploymentSpec"]["executors"]


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml"])
def test_release_pipelines_are_the_committed_ones_pinned_by_digest(user, name):
    """What a user downloads names every image by the registry and the digest the release
    pushed, and differs from the committed pipeline in nothing else."""
    released = pipeline_docs(user / "release" / name)
    committed = pipeline_docs(ROOT / "pipelines" / name)
    for executor, body in executors(released[0]).items():
        image = body["container"]["image"]
        stage = STAGE.search(image).group(1)
        assert image == f"{REGISTRY}/ttt-{stage}@{DIGESTS[stage]}", executor
        body["container"]["image"] = executors(committed[0])[executor]["container"]["image"]
    assert released == committed


def set_value(values: dict, path: str, value: str) -> dict:
    """Helm's `--set a.b[0].c=v` for the paths the docs use (maps and list indexes)."""
    keys = re.findall(r"([^.\[\]]+)(?:\[(\d+)\])?", path)
    node: dict = values
    for i, (key, index) in enumerate(keys):
        last = i == len(keys) - 1
        if index:
            items = node.setdefault(key, [])
            while len(items) <= int(index):
                items.append({})
            if last:
                items[int(index)] = value
            node = items[int(index)]
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
    return values


def test_the_documented_helm_install_pulls_the_released_images(user):
    from helm_chart import by_kind, objects, render

    text = GETTING_STARTED.read_text(encoding="utf-8")
    (line,) = [m for m in re.findall(r"helm install [^`\n]+", text) if "values-images" in m]
    words = shlex.split(line)
    values: dict = {}
    for i, word in enumerate(words):
        if word == "-f":
            path = words[i + 1]
            if path == "my-values.yaml":
                continue  # the user's own spec under `run:`; the chart's default stands in
            where = user / path if path.startswith("release/") else ROOT / path
            values = deep_merge(values, yaml.safe_load(where.read_text(encoding="utf-8")))
        elif word == "--set":
            values = set_value(values, *words[i + 1].split("=", 1))
    docs = objects(render(values))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("StatefulSet", "Job")]
    assert pods and by_kind(docs, "StatefulSet")
    for spec in pods:
        assert spec["imagePullSecrets"] == [{"name": "ghcr-pull"}]
        for container in spec["containers"] + spec.get("initContainers", []):
            stage = STAGE.search(container["image"]).group(1)
            assert container["image"] == f"{REGISTRY}/ttt-{stage}@{DIGESTS[stage]}"


def test_the_documented_recompile_adds_pull_secrets_to_the_released_images(user, tmp_path):
    import shutil

    user = Path(shutil.copytree(user, tmp_path / "user"))  # the other tests read the download
    text = GETTING_STARTED.read_text(encoding="utf-8")
    (line,) = [
        m for m in re.findall(r"python -m pipelines\.compile [^`\n]+", text) if "--pull" in m
    ]
    words = shlex.split(line.replace("OWNER", REGISTRY.split("/")[1]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_IMAGE_")}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, *words[1:]], cwd=user, env=env, check=True, capture_output=True)
    for name in NAMES:
        spec, platform = pipeline_docs(user / "release" / name)
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for executor, body in executors(spec).items():
            stage = STAGE.search(body["container"]["image"]).group(1)
            assert body["container"]["image"] == f"{REGISTRY}/ttt-{stage}@{DIGESTS[stage]}"
            assert [p["secretName"] for p in k8s[executor]["imagePullSecret"]] == ["ghcr-pull"]
