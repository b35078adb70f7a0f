"""A pod manifest made runnable: its environment, volumes and command resolved as a kubelet does."""

from __future__ import annotations

import base64
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt.errors import TTTError
from ttt.rehearse.images import image_for

CODE = str(Path(__file__).resolve().parents[2])  # this checkout: the images' installed code
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


class PodError(TTTError, RuntimeError):
    """A pod cannot start as its manifest says (the kubelet's CreateContainerConfigError)."""


def cpu(text: str | float) -> float:
    """A CPU quantity in cores ("500m" -> 0.5, "2" -> 2)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", str(text))
    if not m:
        raise PodError(f"cpu quantity {text!r} is not one the rehearsal reads")
    return float(m[1]) / (1000 if m[2] else 1)


def resource_field(resources: dict, ref: dict) -> str:
    """The downward API's value of a container resource: rounded up to whole divisors; a
    limit left unset is the node's allocatable (here: this machine's cores and memory), a
    request left unset its limit."""
    kind, _, what = ref["resource"].partition(".")
    value = resources.get(kind, {}).get(what)
    if value is None and kind == "requests":
        value = resources.get("limits", {}).get(what)
    if value is None and kind == "limits":
        value = (
            os.cpu_count() or 1
            if what == "cpu"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
    if what == "cpu":
        return str(math.ceil(cpu(value or 0) / cpu(ref.get("divisor", "1"))))
    return str(math.ceil(quantity(value or 0) / quantity(ref.get("divisor", "1"))))


def quantity(text: str | int) -> int:
    """A Kubernetes quantity in bytes ("2Gi", "512Mi", "1G", 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMG])?", str(text))
    if not m:
        raise PodError(f"quantity {text!r} is not one the rehearsal reads")
    return int(float(m[1]) * UNITS.get(m[2] or "", 1))


@dataclass
class Objects:
    """What the pods can refer to: Secrets, ConfigMaps and the addresses the kubelet injects."""

    secrets: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    configmaps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    sa_tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    ca_pem: bytes = b""
    api_host: str = ""

    def secret(self, namespace: str, name: str, where: str) -> dict[str, bytes]:
        if (namespace, name) not in self.secrets:
            raise PodError(f"{where}: secret {namespace}/{name} not found")
        return self.secrets[(namespace, name)]

    def configmap(self, namespace: str, name: str, where: str) -> dict[str, str]:
        if (namespace, name) not in self.configmaps:
            raise PodError(f"{where}: configmap {namespace}/{name} not found")
        return self.configmaps[(namespace, name)]


@dataclass
class Pod:
    """One pod: its identity and the resolved process the rehearsal starts for it."""

    name: str
    namespace: str
    labels: dict[str, str]
    ip: str
    hostname: str
    spec: dict[str, Any]
    annotations: dict[str, str] = field(default_factory=dict)
    claims: dict[str, Path] = field(default_factory=dict)  # volume name -> a node directory

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def port(self, port: int | str) -> int:
        """A probe's or a Service's target port: a number or a container port's name."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for c in self.spec["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise PodError(f"pod {self.name}: no container port named {port!r}")

    def field_ref(self, path: str) -> str:
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": f"uid-{self.namespace}-{self.name}",
            "status.podIP": self.ip,
            "status.hostIP": "10.244.0.1",
            "spec.nodeName": "rehearsal-node",
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
        }
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (self.labels if m[1] == "labels" else self.annotations).get(m[2], "")
        if path not in fields:
            raise PodError(f"pod {self.name}: fieldRef {path!r} is not one a kubelet resolves")
        return fields[path]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to earlier variables; $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)  # fmt: skip


def environment(pod: Pod, container: dict[str, Any], objects: Objects) -> dict[str, str]:
    """The process environment: the image's ENV, the kubelet's own, then envFrom and env."""
    where = f"pod {pod.namespace}/{pod.name} container {container['name']}"
    env = dict(image_for(container["image"]).env)
    env["HOSTNAME"] = pod.hostname
    host, _, port = objects.api_host.partition(":")
    env |= {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port or "443"}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = objects.configmap(pod.namespace, source["configMapRef"]["name"], where)
            env |= {prefix + k: v for k, v in data.items()}
        elif "secretRef" in source:
            data = objects.secret(pod.namespace, source["secretRef"]["name"], where)
            env |= {prefix + k: v.decode() for k, v in data.items()}
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = _expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            try:
                data = objects.secret(pod.namespace, ref["name"], where)
            except PodError:
                if ref.get("optional"):
                    continue
                raise
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodError(
                    f"{where}: env {name}: secret {ref['name']} has no key {ref['key']!r}"
                )
            env[name] = data[ref["key"]].decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = objects.configmap(pod.namespace, ref["name"], where)
            if ref["key"] not in data:
                raise PodError(
                    f"{where}: env {name}: configmap {ref['name']} has no {ref['key']!r}"
                )
            env[name] = data[ref["key"]]
        elif "fieldRef" in source:
            env[name] = pod.field_ref(source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_field(container.get("resources", {}), source["resourceFieldRef"])
        else:
            raise PodError(f"{where}: env {name}: valueFrom {sorted(source)} not supported")
    return env


def _files(data: dict[str, bytes], items: list[dict] | None, mode: int) -> dict[str, Any]:
    chosen = items or [{"key": k, "path": k} for k in data]
    out = {}
    for item in chosen:
        if item["key"] not in data:
            raise PodError(f"key {item['key']!r} not found")
        out[item["path"]] = {"data": base64.b64encode(data[item["key"]]).decode(),
                             "mode": item.get("mode", mode)}  # fmt: skip
    return out


def volume_source(pod: Pod, volume: dict[str, Any], objects: Objects) -> dict[str, Any]:
    """One pod volume as the in-pod mounter takes it (podproc.mount_volume)."""
    where = f"pod {pod.namespace}/{pod.name} volume {volume['name']}"
    if "emptyDir" in volume:
        limit = (volume["emptyDir"] or {}).get("sizeLimit")
        return {"kind": "tmpfs", "size": quantity(limit) if limit else None, "mode": 0o1777}
    if "secret" in volume:
        s = volume["secret"]
        try:
            data = objects.secret(pod.namespace, s["secretName"], where)
            files = _files(data, s.get("items"), s.get("defaultMode", 0o644))
        except PodError as exc:
            if s.get("optional"):
                return {"kind": "files", "files": {}}
            raise PodError(f"{where}: {exc}") from None
        return {"kind": "files", "files": files}
    if "configMap" in volume:
        c = volume["configMap"]
        data = {
            k: v.encode() for k, v in objects.configmap(pod.namespace, c["name"], where).items()
        }
        try:
            files = _files(data, c.get("items"), c.get("defaultMode", 0o644))
        except PodError as exc:
            raise PodError(f"{where}: {exc}") from None
        return {"kind": "files", "files": files}
    if "hostPath" in volume:
        return {"kind": "bind", "source": volume["hostPath"]["path"]}
    if "persistentVolumeClaim" in volume:
        claim = pod.claims.get(volume["name"])
        if claim is None:
            raise PodError(f"{where}: claim {volume['persistentVolumeClaim']['claimName']} unbound")
        claim.mkdir(parents=True, exist_ok=True)
        return {"kind": "bind", "source": str(claim)}
    raise PodError(f"{where}: volume type {sorted(set(volume) - {'name'})} not supported")


def mounts(pod: Pod, container: dict[str, Any], objects: Objects) -> list[dict[str, Any]]:
    """The image's own writable places first (its home, a private /tmp), then the volumes at
    their mountPaths, then the service account token unless automount is off."""
    image = image_for(container["image"])
    uid = image.user[0] if image.user else 0
    out: list[dict[str, Any]] = [
        {"path": image.env.get("HOME", "/root"), "kind": "tmpfs", "mode": 0o755, "owner": uid},
        {"path": "/tmp", "kind": "tmpfs", "mode": 0o1777},  # nosec B108 - the pod's own
    ]
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    taken = {m["mountPath"] for m in container.get("volumeMounts", [])}
    out = [m for m in out if m["path"] not in taken]  # a volume there replaces the image's
    for m in container.get("volumeMounts", []):
        if m["name"] not in volumes:
            raise PodError(f"pod {pod.name}: volumeMount {m['name']!r} names no volume")
        source = volume_source(pod, volumes[m["name"]], objects)
        out.append({**source, "path": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
    if pod.spec.get("automountServiceAccountToken", True):
        account = pod.spec.get("serviceAccountName", "default")
        token = objects.sa_tokens.get((pod.namespace, account))
        if token is None:
            raise PodError(f"pod {pod.name}: serviceaccount {pod.namespace}/{account} not found")
        data = {"token": token.encode(), "ca.crt": objects.ca_pem,
                "namespace": pod.namespace.encode()}  # fmt: skip
        out.append({"kind": "files", "path": SA_MOUNT, "files": _files(data, None, 0o644)})
    return out


def command(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The argv a runtime starts: command or the image's ENTRYPOINT, args or its CMD."""
    image = image_for(container["image"])
    if "command" in container:
        argv = container["command"] + container.get("args", [])
    else:
        argv = image.entrypoint + container.get("args", image.cmd)
    return [_expand(a, env) for a in argv]


def process(pod: Pod, objects: Objects, created_file: Path) -> dict[str, Any]:
    """The in-pod launcher's input (podproc.main): mounts, user, root lock, env, argv."""
    container = pod.container
    image = image_for(container["image"])
    pod_ctx = pod.spec.get("securityContext", {})
    ctx = {**pod_ctx, **container.get("securityContext", {})}
    uid = ctx.get("runAsUser", image.user[0] if image.user else 0)
    gid = ctx.get("runAsGroup", image.user[1] if image.user else 0)
    if ctx.get("runAsNonRoot") and uid == 0:
        raise PodError(f"pod {pod.name}: runAsNonRoot, but the image runs as root")
    env = environment(pod, container, objects)
    return {
        "name": f"{pod.namespace}/{pod.name}",
        "hostname": pod.hostname,
        "mounts": mounts(pod, container, objects),
        "readOnlyRoot": bool(ctx.get("readOnlyRootFilesystem")),
        "uid": uid,
        "gid": gid,
        "fsGroup": pod_ctx.get("fsGroup"),
        "env": env,
        "cwd": container.get("workingDir", image.workdir),
        "argv": command(container, env),
        "created": str(created_file),
        "reachable": sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, CODE)}),
        "staging": str(created_file.parent.parent / "staging" / f"{pod.namespace}_{pod.name}"),
    }
