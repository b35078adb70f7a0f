"""The kubelet and the two controllers the chart needs: pods as processes, probes, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ttt.rehearse.network import IP, UNSHARE, Node
from ttt.rehearse.pods import Objects, Pod, PodError, process

BACKOFF_S = (10, 20, 40, 80, 160, 300)  # the kubelet's CrashLoopBackOff steps


@dataclass
class RunningPod:
    """A pod's process, restarted by its restartPolicy, judged ready by its probes."""

    pod: Pod
    node: Node
    objects: Objects
    workdir: Path
    restart: str = "Always"
    ready: bool = False
    exit_codes: list[int] = field(default_factory=list)
    error: str | None = None
    _proc: subprocess.Popen | None = None
    _netns: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def log(self) -> Path:
        return self.workdir / "logs" / f"{self.pod.namespace}_{self.pod.name}.log"

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def start(self) -> RunningPod:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._netns = self.node.pod_netns(
            f"{self.pod.namespace}/{self.pod.name}", self.pod.namespace, self.pod.hostname
        )
        threading.Thread(target=self._run, daemon=True, name=self.pod.name).start()
        return self

    def _spawn(self) -> subprocess.Popen | None:
        created = self.workdir / "created" / f"{self.pod.namespace}_{self.pod.name}"
        created.parent.mkdir(parents=True, exist_ok=True)
        try:
            spec = process(self.pod, self.objects, created)
        except PodError as exc:  # CreateContainerConfigError: retried, as the kubelet does
            self.error = str(exc)
            with self.log.open("a") as f:
                f.write(f"[rehearsal] cannot start: {exc}\n")
            return None
        path = self.workdir / "pods" / f"{self.pod.namespace}_{self.pod.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec))
        out = self.log.open("a")
        out.write(f"[rehearsal] start {' '.join(spec['argv'])}\n")
        out.flush()
        return subprocess.Popen(
            [IP, "netns", "exec", self._netns, UNSHARE, "--uts", "--", sys.executable,
             "-m", "ttt.rehearse.podproc", str(path)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.error = None
            self._proc = self._spawn()
            if self._proc is not None:
                probes = threading.Thread(target=self._probe, args=(self._proc,), daemon=True)
                probes.start()
                code = self._proc.wait()
                self.ready = False
                self.exit_codes.append(code)
                with self.log.open("a") as f:
                    f.write(f"[rehearsal] exited {code}\n")
                if self._stop.is_set():
                    break
                if code == 0 and self.restart != "Always":
                    break
                if self.restart == "Never":
                    break
            elif self.restart == "Never":  # a task pod that cannot start fails (KFP's view)
                break
            failures += 1
            self._stop.wait(BACKOFF_S[min(failures - 1, len(BACKOFF_S) - 1)])
        self._done.set()

    def _check(self, probe: dict[str, Any]) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            get = probe["httpGet"]
            scheme = get.get("scheme", "HTTP").lower()
            url = f"{scheme}://{self.pod.ip}:{self.pod.port(get['port'])}{get.get('path', '/')}"
            try:
                return 200 <= httpx.get(url, timeout=timeout).status_code < 400
            except httpx.HTTPError:
                return False
        if "tcpSocket" in probe:
            import socket

            try:
                port = self.pod.port(probe["tcpSocket"]["port"])
                socket.create_connection((self.pod.ip, port), timeout=timeout).close()
                return True
            except OSError:
                return False
        raise PodError(f"pod {self.pod.name}: probe {sorted(probe)} not supported")

    def _probe(self, proc: subprocess.Popen) -> None:
        """Readiness and liveness as the kubelet polls them (delays, periods, thresholds)."""
        c = self.pod.container
        ready_p, live_p = c.get("readinessProbe"), c.get("livenessProbe")
        if ready_p is None:
            self.ready = True
        started = time.monotonic()
        next_at = {"ready": 0.0, "live": 0.0}
        fails = {"ready": 0, "live": 0}
        while proc.poll() is None and not self._stop.is_set():
            now = time.monotonic() - started
            for kind, probe in (("ready", ready_p), ("live", live_p)):
                if probe is None or now < max(probe.get("initialDelaySeconds", 0), next_at[kind]):
                    continue
                next_at[kind] = now + probe.get("periodSeconds", 10)
                ok = self._check(probe)
                fails[kind] = 0 if ok else fails[kind] + 1
                if kind == "ready":
                    if ok:
                        self.ready = True
                    elif fails[kind] >= probe.get("failureThreshold", 3):
                        self.ready = False
                elif fails[kind] >= probe.get("failureThreshold", 3):
                    with self.log.open("a") as f:
                        f.write("[rehearsal] liveness probe failed: restarting\n")
                    self._terminate(proc)
                    return
            time.sleep(0.5)

    def _terminate(self, proc: subprocess.Popen) -> None:
        grace = self.pod.spec.get("terminationGracePeriodSeconds", 30)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with self.log.open("a") as f:
                    f.write(f"[rehearsal] still running after its {grace} s grace: SIGKILL\n")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        """Delete the pod: SIGTERM, its grace period, SIGKILL; then its network goes."""
        self._stop.set()
        self.ready = False
        if self._proc is not None:
            self._terminate(self._proc)
        self._done.wait(60)
        if self._netns:
            self.node.drop_netns(self._netns)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


def _template_pod(template: dict, name: str, namespace: str, node: Node, **extra: Any) -> Pod:
    meta = template.get("metadata", {})
    return Pod(
        name=name, namespace=namespace, labels=dict(meta.get("labels", {})),
        annotations=dict(meta.get("annotations", {})), ip=node.pod_ip(f"{namespace}/{name}"),
        hostname=name, spec=template["spec"], **extra,
    )  # fmt: skip


@dataclass
class StatefulSet:
    """A StatefulSet's pods by ordinal; a template patch rolls them over, highest first, one
    at a time, each waiting for the previous to be ready (RollingUpdate)."""

    obj: dict[str, Any]
    node: Node
    objects: Objects
    workdir: Path
    generation: int = 1
    updated: int = 0
    pods: dict[int, RunningPod] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.obj["metadata"]["namespace"]

    @property
    def replicas(self) -> int:
        return int(self.obj["spec"].get("replicas", 1))

    def pod_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.replicas)]

    def _pod(self, ordinal: int) -> RunningPod:
        name = f"{self.name}-{ordinal}"
        claims = {
            t["metadata"]["name"]: self.workdir / "claims" / f"{t['metadata']['name']}-{name}"
            for t in self.obj["spec"].get("volumeClaimTemplates", [])
        }
        pod = _template_pod(self.obj["spec"]["template"], name, self.namespace, self.node,
                            claims=claims)  # fmt: skip
        pod.labels["statefulset.kubernetes.io/pod-name"] = name
        return RunningPod(pod, self.node, self.objects, self.workdir)

    def start(self) -> None:
        self.updated = self.replicas
        for i in range(self.replicas):  # podManagementPolicy Parallel, or OrderedReady below
            self.pods[i] = self._pod(i).start()
            if self.obj["spec"].get("podManagementPolicy") != "Parallel":
                while not self.pods[i].ready:
                    time.sleep(0.5)

    def patch(self, template: dict[str, Any]) -> None:
        """The new pod template: roll the pods over in the background."""
        with self._lock:
            self.obj["spec"]["template"] = template
            self.generation += 1
            self.updated = 0
        threading.Thread(target=self._roll, args=(self.generation,), daemon=True).start()

    def _roll(self, generation: int) -> None:
        for i in reversed(range(self.replicas)):
            if generation != self.generation:
                return  # a newer patch took over
            self.pods[i].stop()
            self.pods[i] = self._pod(i).start()
            while not self.pods[i].ready and generation == self.generation:
                time.sleep(0.5)
            self.updated += 1

    def status(self) -> dict[str, Any]:
        ready = sum(p.ready for p in self.pods.values())
        return {
            "observedGeneration": self.generation,
            "replicas": len(self.pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": self.updated,
            "updatedReplicas": self.updated,
        }

    def stop(self) -> None:
        for p in self.pods.values():
            p.stop()


@dataclass
class IndexedJob:
    """A batch/v1 Job with completionMode Indexed: pod i is JOB_COMPLETION_INDEX=i, retried
    up to backoffLimitPerIndex times."""

    obj: dict[str, Any]
    node: Node
    objects: Objects
    workdir: Path
    pods: dict[int, list[RunningPod]] = field(default_factory=dict)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run_index(self, index: int) -> None:
        spec = self.obj["spec"]
        name = self.obj["metadata"]["name"]
        limit = int(spec.get("backoffLimitPerIndex", spec.get("backoffLimit", 6)))
        template = json.loads(json.dumps(spec["template"]))
        for c in template["spec"]["containers"]:
            c.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        for attempt in range(limit + 1):
            pod = _template_pod(template, f"{name}-{index}-{attempt}",
                                self.obj["metadata"]["namespace"], self.node)  # fmt: skip
            pod.annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            running = RunningPod(pod, self.node, self.objects, self.workdir, restart="Never")
            self.pods.setdefault(index, []).append(running.start())
            running.wait()
            if running.exit_codes and running.exit_codes[-1] == 0:
                return

    def _run(self) -> None:
        threads = [threading.Thread(target=self._run_index, args=(i,), daemon=True)
                   for i in range(int(self.obj["spec"].get("completions", 1)))]  # fmt: skip
        for t in threads:
            t.start()

    def succeeded(self) -> bool:
        return all(ps and ps[-1].exit_codes[-1:] == [0] for ps in self.pods.values())

    def stop(self) -> None:
        for ps in self.pods.values():
            for p in ps:
                p.stop()
