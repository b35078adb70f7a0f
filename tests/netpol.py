"""Kubernetes NetworkPolicy semantics, enough to ask whether one pod may reach another."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict = field(default_factory=dict)
    namespace_labels: dict = field(default_factory=dict)

    def ns_labels(self) -> dict:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def selects(selector: dict | None, labels: dict) -> bool:
    """A label selector; an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pods here are addressed by labels only
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.ns_labels()):
            return False
    elif pod.namespace != policy_ns:
        return False  # a podSelector alone means the policy's namespace
    return "podSelector" not in peer or selects(peer["podSelector"], pod.labels)


def _port_matches(ports: list | None, port: int) -> bool:
    return not ports or any(p.get("port") in (None, port) for p in ports)


def _applies(policy: dict, pod: Pod, kind: str) -> bool:
    spec = policy["spec"]
    types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
    return (
        policy["metadata"]["namespace"] == pod.namespace
        and kind in types
        and selects(spec.get("podSelector"), pod.labels)
    )


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int) -> bool:
    """Whether `src` may open a connection to `dst` on `port` (the pod's port, after a
    Service's translation): egress of src's policies and ingress of dst's, each allowed by
    default and, once a policy selects the pod, only by a rule of some selecting policy."""
    egress = [p for p in policies if _applies(p, src, "Egress")]
    if egress and not any(
        _rule_matches(rule, "to", p["metadata"]["namespace"], dst, port)
        for p in egress
        for rule in p["spec"].get("egress") or []
    ):
        return False
    ingress = [p for p in policies if _applies(p, dst, "Ingress")]
    return not ingress or any(
        _rule_matches(rule, "from", p["metadata"]["namespace"], src, port)
        for p in ingress
        for rule in p["spec"].get("ingress") or []
    )


def _rule_matches(rule: dict, side: str, policy_ns: str, pod: Pod, port: int) -> bool:
    peers = rule.get(side)  # absent or empty: every peer
    peer_ok = not peers or any(_peer_matches(peer, policy_ns, pod) for peer in peers)
    return peer_ok and _port_matches(rule.get("ports"), port)
