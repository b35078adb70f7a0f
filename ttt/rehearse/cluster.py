"""The rehearsal's cluster: the rendered chart's objects brought up on the node, beside KFP's pieces."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt.rehearse.apiserver import ApiServer
from ttt.rehearse.kubelet import IndexedJob, RunningPod, StatefulSet
from ttt.rehearse.network import Node, ServiceProxy, service_names
from ttt.rehearse.pipeline import KFP_ACCOUNT, KFP_NAMESPACE
from ttt.rehearse.pods import Objects
from ttt.rehearse.standins import ObjectStore, documented_secrets

# Objects the rehearsal reads but cannot enforce on one machine: said in its output.
NOT_ENFORCED = {"NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
                "PodMonitor"}  # fmt: skip


@dataclass
class Cluster:
    """One node: Services, the chart's StatefulSets and Jobs, the S3 stand-in at KFP's store
    address, the API stand-in at kubernetes.default; KFP's namespace and ServiceAccount."""

    workdir: Path
    store_service: tuple[str, str, int]  # name, namespace, port (from the values)
    buckets: list[str]
    node: Node = field(default_factory=Node)
    objects: Objects = field(default_factory=Objects)
    statefulsets: dict[tuple[str, str], StatefulSet] = field(default_factory=dict)
    jobs: list[IndexedJob] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))
    store: ObjectStore | None = None
    api: ApiServer | None = None
    _proxies: list[ServiceProxy] = field(default_factory=list)

    def up(self, rendered: list[dict[str, Any]]) -> None:
        """Network, store, Secrets, API; Services and ConfigMaps; then the workloads."""
        self.node.up()
        name, namespace, port = self.store_service
        address = self.node.service_ip(name, namespace)
        self.node.name(address, service_names(name, namespace))
        self.node.name(address, [name], namespace)
        self.store = ObjectStore(address, port, self.buckets)
        self.objects.secrets.update(documented_secrets(self.store.keys))
        # KFP's own Secret for its object store (its launcher's keys): the same pair in kind.
        k = self.store.keys
        self.objects.secrets[(KFP_NAMESPACE, "mlpipeline-minio-artifact")] = {
            "accesskey": k.access.encode(), "secretkey": k.secret.encode()}  # fmt: skip
        api_ip = self.node.service_ip("kubernetes", "default")
        api_names = service_names("kubernetes", "default")
        self.node.name(api_ip, api_names)
        self.objects.api_host = f"{api_ip}:443"
        configmaps = {}
        for o in rendered:
            if o["kind"] == "ConfigMap":
                configmaps[(o["metadata"]["namespace"], o["metadata"]["name"])] = o.get("data", {})
        self.objects.configmaps.update(configmaps)
        rbac = [o for o in rendered if o["kind"] in ("Role", "RoleBinding")]
        self.api = ApiServer(api_ip, rbac, self.statefulsets, configmaps, self.workdir,
                             ["kubernetes.default.svc", *api_names])  # fmt: skip
        self.objects.ca_pem = self.api.ca_pem
        accounts = {(KFP_NAMESPACE, KFP_ACCOUNT), (KFP_NAMESPACE, "default")}
        for o in rendered:
            ns = o["metadata"].get("namespace")
            accounts.add((ns, "default"))
            if o["kind"] == "ServiceAccount":
                accounts.add((ns, o["metadata"]["name"]))
        for ns, account in accounts:
            self.objects.sa_tokens[(ns, account)] = self.api.token(ns, account)
        workloads: list[StatefulSet | IndexedJob] = []
        for o in rendered:  # pods' names first: a Service names the pods it selects
            kind, meta = o["kind"], o["metadata"]
            if kind == "StatefulSet":
                sts = StatefulSet(o, self.node, self.objects, self.workdir)
                self.statefulsets[(meta["namespace"], meta["name"])] = sts
                sub = o["spec"]["serviceName"]
                for pod in sts.pod_names():
                    ip = self.node.pod_ip(f"{meta['namespace']}/{pod}")
                    self.node.name(
                        ip, [f"{pod}.{n}" for n in service_names(sub, meta["namespace"])]
                    )
                    self.node.name(ip, [f"{pod}.{sub}"], meta["namespace"])
                workloads.append(sts)
            elif kind == "Job":
                job = IndexedJob(o, self.node, self.objects, self.workdir)
                self.jobs.append(job)
                workloads.append(job)
            elif kind in NOT_ENFORCED:
                self.ignored.append(f"{kind} {meta.get('namespace')}/{meta['name']}")
        for o in rendered:
            if o["kind"] == "Service":
                self._service(o)
        for workload in workloads:
            workload.start()

    def _selected(self, selector: dict[str, str], namespace: str) -> list[RunningPod]:
        pods = [p for s in self.statefulsets.values() for p in s.pods.values()]
        pods += [p for j in self.jobs for ps in j.pods.values() for p in ps]
        return [p for p in pods if p.pod.namespace == namespace
                and all(p.pod.labels.get(k) == v for k, v in selector.items())]  # fmt: skip

    def _service(self, svc: dict[str, Any]) -> None:
        meta, spec = svc["metadata"], svc["spec"]
        name, namespace = meta["name"], meta["namespace"]
        selector = spec.get("selector", {})
        if spec.get("clusterIP") == "None":  # headless: the name resolves to its pods
            for sts in self.statefulsets.values():
                labels = sts.obj["spec"]["template"]["metadata"].get("labels", {})
                if sts.namespace != namespace or any(
                    labels.get(k) != v for k, v in selector.items()
                ):
                    continue
                for pod in sts.pod_names():
                    ip = self.node.pod_ip(f"{namespace}/{pod}")
                    self.node.name(ip, service_names(name, namespace))
                    self.node.name(ip, [name], namespace)
            return
        address = self.node.service_ip(name, namespace)
        self.node.name(address, service_names(name, namespace))
        self.node.name(address, [name], namespace)
        for port in spec.get("ports", []):
            target = port.get("targetPort", port["port"])

            def endpoints(target=target) -> list[tuple[str, int]]:
                return [(p.pod.ip, p.pod.port(target))
                        for p in self._selected(selector, namespace) if p.ready]  # fmt: skip

            self._proxies.append(ServiceProxy(address, int(port["port"]), endpoints))

    def upload_outputs(self, task: str, executor_input: dict[str, Any]) -> None:
        """KFP's launcher: a task's output artifacts go to the object store (bucket mlpipeline)."""
        client = self.store.client()
        for name, artifacts in executor_input.get("outputs", {}).get("artifacts", {}).items():
            for artifact in artifacts.get("artifacts", []):
                path = Path(artifact["uri"])
                files = (
                    [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
                )
                for f in files:
                    key = f"v2/artifacts/{self.run_id}/{task}/{name}/{f.relative_to(path.parent)}"
                    client.upload_file(str(f), "mlpipeline", key)

    def logs(self) -> list[Path]:
        return sorted((self.workdir / "logs").glob("*.log"))

    def down(self) -> None:
        for job in self.jobs:
            job.stop()
        for sts in self.statefulsets.values():
            sts.stop()
        for proxy in self._proxies:
            proxy.close()
        if self.api:
            self.api.close()
        if self.store:
            self.store.close()
        self.node.down()
        # The mount points the pods made on the node's file system, deepest first.
        made = set()
        for record in (p for p in (self.workdir / "created").glob("*") if p.is_file()):
            made |= set(filter(None, record.read_text().splitlines()))
        for path in sorted(made, key=lambda p: -p.count("/")):
            try:
                Path(path).rmdir()
            except OSError:
                pass
