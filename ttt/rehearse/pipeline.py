"""The compiled pipeline, walked by kfp's local orchestrator, each task a pod as KFP's launcher makes it."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ttt.rehearse.kubelet import RunningPod
from ttt.rehearse.pods import Pod

KFP_NAMESPACE = "kubeflow"
KFP_ACCOUNT = "pipeline-runner"  # the ServiceAccount KFP runs pipeline pods as


def read_pipeline(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline spec and its kubernetes platform spec (`{}` when it has none)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    platform = docs[1] if len(docs) > 1 else {}
    return docs[0], platform.get("platforms", {}).get("kubernetes", {})


def _executor(spec: dict[str, Any], command: list[str]) -> str:
    """Which executor a command is (the function each lightweight component runs)."""
    function = command[command.index("--function_to_execute") + 1]
    for label, e in spec["deploymentSpec"]["executors"].items():
        args = e["container"].get("args", [])
        if (
            "--function_to_execute" in args
            and args[args.index("--function_to_execute") + 1] == function
        ):
            return label
    raise KeyError(f"no executor runs {function!r}")


class TaskPods:
    """What KFP's driver and launcher make of a task: a pod in `kubeflow` with the executor's
    image, command and env, plus exactly what its kubernetes platform spec adds (secretAsEnv,
    secretAsVolume, fieldPathAsEnv, podMetadata, activeDeadlineSeconds)."""

    def __init__(self, cluster: Any, spec: dict, platform: dict, arguments: dict[str, Any]):
        self.cluster, self.spec, self.arguments = cluster, spec, arguments
        self.executors = platform.get("deploymentSpec", {}).get("executors", {})
        self.pods: list[RunningPod] = []
        self.tasks: list[tuple[str, int]] = []

    def _parameter(self, ref: dict[str, Any], inputs: dict[str, Any], where: str) -> Any:
        if "runtimeConstant" in ref:
            return ref["runtimeConstant"]
        name = ref["componentInputParameter"]
        if name in inputs:
            return inputs[name]
        plain = name.removeprefix("pipelinechannel--")  # a root parameter passed into a loop
        if plain in self.arguments:
            return self.arguments[plain]
        raise KeyError(f"{where}: parameter {name} has no value")

    def pod(self, label: str, image: str, command: list[str], inputs: dict[str, Any]) -> Pod:
        k8s = self.executors.get(label, {})
        container = dict(self.spec["deploymentSpec"]["executors"][label]["container"])
        env = [dict(e) for e in container.get("env", [])]
        volumes, mounts = [], []
        for s in k8s.get("secretAsEnv", []):
            name = s.get("secretName") or self._parameter(s["secretNameParameter"], inputs, label)
            for k in s["keyToEnv"]:
                env.append(
                    {
                        "name": k["envVar"],
                        "valueFrom": {
                            "secretKeyRef": {
                                "name": name,
                                "key": k["secretKey"],
                                "optional": s.get("optional", False),
                            }
                        },
                    }
                )
        for i, s in enumerate(k8s.get("secretAsVolume", [])):
            name = s.get("secretName") or self._parameter(s["secretNameParameter"], inputs, label)
            volumes.append(
                {
                    "name": f"secret-{i}",
                    "secret": {"secretName": name, "optional": s.get("optional", False)},
                }
            )
            mounts.append({"name": f"secret-{i}", "mountPath": s["mountPath"]})
        for f in k8s.get("fieldPathAsEnv", []):
            env.append(
                {"name": f["name"], "valueFrom": {"fieldRef": {"fieldPath": f["fieldPath"]}}}
            )
        meta = k8s.get("podMetadata", {})
        n = len(self.tasks)
        name = f"{label.removeprefix('exec-')}-{n}"
        labels = {**meta.get("labels", {}), "pipeline/runid": self.cluster.run_id}
        container = {"name": "main", "image": image, "command": command[:3], "args": command[3:],
                     "env": env, "volumeMounts": mounts}  # fmt: skip
        spec = {"containers": [container], "volumes": volumes, "restartPolicy": "Never",
                "serviceAccountName": KFP_ACCOUNT}  # fmt: skip
        return Pod(name=name, namespace=KFP_NAMESPACE, labels=labels,
                   annotations=meta.get("annotations", {}), hostname=name,
                   ip=self.cluster.node.pod_ip(f"{KFP_NAMESPACE}/{name}"), spec=spec)  # fmt: skip

    def run(self, image: str, command: list[str], pipeline_root: str) -> int:
        """Run one task's pod to its end; the exit code (KFP's success or failure)."""
        label = _executor(self.spec, command)
        executor_input = json.loads(command[command.index("--executor_input") + 1])
        inputs = executor_input.get("inputs", {}).get("parameterValues", {})
        pod = self.pod(label, image, command, inputs)
        # The launcher's output folders are the pod user's to write, as in the pod's own FS.
        for root, dirs, _ in os.walk(pipeline_root):
            os.chmod(root, 0o777)
        running = RunningPod(pod, self.cluster.node, self.cluster.objects,
                             self.cluster.workdir, restart="Never")  # fmt: skip
        self.pods.append(running.start())
        deadline = float(self.executors.get(label, {}).get("activeDeadlineSeconds", 0) or 0)
        if not running.wait(deadline or None):  # activeDeadlineSeconds: the pod is killed
            running.stop()
            with running.log.open("a") as f:
                f.write(f"[rehearsal] activeDeadlineSeconds {deadline:.0f} exceeded\n")
        code = running.exit_codes[-1] if running.exit_codes else 1
        if running.error:
            code = code or 1
        self.tasks.append((pod.name, code))
        if code == 0:
            self.cluster.upload_outputs(pod.name, executor_input)
        return code


@contextmanager
def pods_for_tasks(task_pods: TaskPods):
    """kfp.local with its subprocess task handler replaced by TaskPods (kfp has no hook)."""
    from kfp.local import status, subprocess_task_handler

    class PodTaskHandler:
        def __init__(self, image: str, full_command: list[str], pipeline_root: str, runner: Any):
            self.image, self.command, self.root = image, full_command, pipeline_root

        def run(self) -> Any:
            code = task_pods.run(self.image, self.command, self.root)
            return status.Status.SUCCESS if code == 0 else status.Status.FAILURE

    saved = subprocess_task_handler.SubprocessTaskHandler
    subprocess_task_handler.SubprocessTaskHandler = PodTaskHandler
    try:
        yield
    finally:
        subprocess_task_handler.SubprocessTaskHandler = saved


def run_pipeline(task_pods: TaskPods, path: Path, pipeline_root: Path) -> bool:
    """Run the compiled pipeline at `path` with `task_pods.arguments`; True when it succeeded."""
    from kfp import components, local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=False)  # fmt: skip
    pipeline = components.load_component_from_file(str(path))
    with pods_for_tasks(task_pods):
        try:
            task = pipeline(**task_pods.arguments)
        except RuntimeError as exc:  # the orchestrator's "task failed"
            task_pods.error = str(exc)
            return False
    return bool(task) and all(code == 0 for _, code in task_pods.tasks)
