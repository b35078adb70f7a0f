"""The compiled pipeline, walked by kfp's local orchestrator, each task a pod as KFP's launcher makes it."""

from __future__ import annotations

import itertools
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
    secretAsVolume, emptyDirMounts, fieldPathAsEnv, podMetadata, activeDeadlineSeconds)."""

    def __init__(self, cluster: Any, spec: dict, platform: dict, arguments: dict[str, Any]):
        self.cluster, self.spec, self.arguments = cluster, spec, arguments
        self.executors = platform.get("deploymentSpec", {}).get("executors", {})
        self.pods: list[RunningPod] = []
        self.tasks: list[tuple[str, int]] = []
        self.error = ""
        self.status: Any = None  # the root DAG's, as kfp's orchestrator ends it
        self._serial = itertools.count()  # loop iterations make pods at the same time

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

    def pod(self, label: str, image: str, command: list[str], inputs: dict[str, Any],
            outputs: str | None = None) -> Pod:  # fmt: skip
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
        for d in k8s.get("emptyDirMounts", []):  # a tmpfs of its sizeLimit, as the chart's
            volumes.append({"name": d["volumeName"], "emptyDir": {"sizeLimit": d.get("sizeLimit")}})
            mounts.append({"name": d["volumeName"], "mountPath": d["mountPath"]})
        for f in k8s.get("fieldPathAsEnv", []):
            env.append(
                {"name": f["name"], "valueFrom": {"fieldRef": {"fieldPath": f["fieldPath"]}}}
            )
        if outputs:  # the launcher's local artifact folder: here, where kfp.local reads it
            volumes.append({"name": "kfp-outputs", "hostPath": {"path": outputs}})
            mounts.append({"name": "kfp-outputs", "mountPath": outputs})
        meta = k8s.get("podMetadata", {})
        name = f"{label.removeprefix('exec-')}-{next(self._serial)}"
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
        pod = self.pod(label, image, command, inputs, outputs=pipeline_root)
        # The launcher's output folders are the pod user's to write, as in the pod's own FS.
        os.makedirs(pipeline_root, exist_ok=True)
        for root, _, _ in os.walk(pipeline_root):
            os.chmod(root, 0o777)  # nosec B103 - the pod user's, as in its own file system
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


def _in_dependency_order(original: Any, task_pods: TaskPods) -> Any:
    """kfp 2.16's local DAG runner runs a DAG's plain tasks before its ParallelFor loops, so a
    task after a loop (deploy-index, report: the loops' Collected outputs) fails. This runs
    each task alone through kfp's own runner, in dependency order, over one shared IOStore."""
    import threading

    from kfp.compiler.pipeline_spec_builder import to_protobuf_value
    from kfp.local import io, status
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    hand_off = threading.local()  # the store the next IOStore() in this thread returns
    fresh = io.IOStore

    def store() -> Any:
        shared = getattr(hand_off, "store", None)
        hand_off.store = None
        return shared if shared is not None else fresh()

    io.IOStore = store

    depth = threading.local()

    def run(pipeline_resource_name: str, dag_component_spec: Any, *args: Any, **kwargs: Any):
        depth.n = getattr(depth, "n", 0) + 1
        try:
            outputs, state = run_in_order(
                pipeline_resource_name, dag_component_spec, *args, **kwargs
            )
        finally:
            depth.n -= 1
        if depth.n == 0 and threading.current_thread() is threading.main_thread():
            task_pods.status = state
        return outputs, state

    def run_in_order(
        pipeline_resource_name: str, dag_component_spec: Any, *args: Any, **kwargs: Any
    ):
        tasks = dag_component_spec.dag.tasks
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for upstream in sorted(tasks[name].dependent_tasks):
                    visit(upstream)
                order.append(name)

        for name in sorted(tasks):
            visit(name)
        shared = fresh()
        for name in order:
            one = type(dag_component_spec)()
            one.CopyFrom(dag_component_spec)
            one.dag.ClearField("tasks")
            one.dag.ClearField("outputs")
            one.dag.tasks[name].CopyFrom(tasks[name])
            del one.dag.tasks[name].dependent_tasks[:]  # done: their outputs are in the store
            # Upstream outputs become constants, as KFP's driver resolves them: kfp's loop
            # reads its items as a parent input unless the output is called Output, and puts
            # the loop item in place of every other upstream output (a rank's world size).
            for key, param in one.dag.tasks[name].inputs.parameters.items():
                if param.HasField("task_output_parameter"):
                    ref = param.task_output_parameter
                    value = shared.get_task_output(ref.producer_task, ref.output_parameter_key)
                    shared.put_parent_input(key, value)
                    param.ClearField("task_output_parameter")
                    param.runtime_value.constant.CopyFrom(to_protobuf_value(value))
            hand_off.store = shared
            _, state = original(pipeline_resource_name, one, *args, **kwargs)
            if state == status.Status.FAILURE:
                return {}, state
        outputs = OrchestratorUtils.get_dag_outputs(
            dag_outputs_spec=dag_component_spec.dag.outputs, io_store=shared
        )
        return outputs, status.Status.SUCCESS

    def restore() -> None:
        io.IOStore = fresh

    return run, restore


def _with_artifact_lists(original: Any) -> Any:
    """kfp 2.16's local executor input takes one artifact per input: a Collected list (the
    indexes deploy-index gets from the build loop) is made an artifact list here, as KFP's
    driver makes it. A loop iteration that left no artifact fails the task, never shrinks it."""
    from kfp import dsl
    from kfp.local import executor_input_utils

    def construct(component_spec: Any, arguments: dict[str, Any], *args: Any, **kwargs: Any):
        lists = {k: v for k, v in arguments.items() if isinstance(v, list)
                 and k in component_spec.input_definitions.artifacts}  # fmt: skip
        for name, items in lists.items():
            if not items or not all(isinstance(a, dsl.Artifact) for a in items):
                raise ValueError(f"input {name}: {items!r} is not a complete artifact list")
        first = {k: v[0] for k, v in lists.items()}
        executor_input = original(component_spec, {**arguments, **first}, *args, **kwargs)
        for name, items in lists.items():
            listed = executor_input.inputs.artifacts[name]
            del listed.artifacts[:]
            for a in items:
                listed.artifacts.extend(
                    executor_input_utils.dsl_artifact_to_artifact_list(a).artifacts
                )
        return executor_input

    return construct


@contextmanager
def pods_for_tasks(task_pods: TaskPods):
    """kfp.local with its subprocess task handler replaced by TaskPods (kfp has no hook), and
    its DAG runner taking the tasks in dependency order."""
    from kfp.local import executor_input_utils, status, subprocess_task_handler
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dags

    class PodTaskHandler:
        def __init__(self, image: str, full_command: list[str], pipeline_root: str, runner: Any):
            self.image, self.command, self.root = image, full_command, pipeline_root

        def run(self) -> Any:
            code = task_pods.run(self.image, self.command, self.root)
            return status.Status.SUCCESS if code == 0 else status.Status.FAILURE

    saved, saved_dag = subprocess_task_handler.SubprocessTaskHandler, dags.run_enhanced_dag
    saved_input = executor_input_utils.construct_executor_input
    subprocess_task_handler.SubprocessTaskHandler = PodTaskHandler
    dags.run_enhanced_dag, restore = _in_dependency_order(saved_dag, task_pods)
    executor_input_utils.construct_executor_input = _with_artifact_lists(saved_input)
    try:
        yield
    finally:
        subprocess_task_handler.SubprocessTaskHandler = saved
        dags.run_enhanced_dag = saved_dag
        executor_input_utils.construct_executor_input = saved_input
        restore()


def run_pipeline(task_pods: TaskPods, path: Path, pipeline_root: Path) -> bool:
    """Run the compiled pipeline at `path` with `task_pods.arguments`; True when it succeeded."""
    from kfp import components, local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=False)  # fmt: skip
    pipeline = components.load_component_from_file(str(path))
    import builtins

    plain_print = builtins.print  # kfp indents print per task; parallel loop tasks race on it
    with pods_for_tasks(task_pods):
        try:
            pipeline(**task_pods.arguments)
        except RuntimeError as exc:  # the orchestrator's "task failed"
            task_pods.error = str(exc)
            return False
        finally:
            builtins.print = plain_print
    from kfp.local import status

    ok = task_pods.status == status.Status.SUCCESS
    return ok and bool(task_pods.tasks) and all(code == 0 for _, code in task_pods.tasks)
