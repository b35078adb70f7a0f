"""Point the index StatefulSet at a run's shards, scale it, and wait until every shard is ready."""

from __future__ import annotations

import logging
import time
from typing import Any

from ttt.errors import TTTError
from ttt.spec import TTTRun

log = logging.getLogger(__name__)

CONTAINER = "index"  # the chart's container name in the index StatefulSet


class DeployError(TTTError, RuntimeError):
    """The index StatefulSet could not be scaled or did not become ready in time."""


def statefulset_patch(run: TTTRun, container: str = CONTAINER) -> dict[str, Any]:
    """The strategic-merge patch that serves `run`: shards x replicas pods, one run name.

    The run name and shard count go in as `TTT_` spec overrides, so every pod reads the
    new run's index from the store; the annotation rolls the pods when the index changes.
    """
    replicas = run.spec.corpus.shards * run.spec.index.replicas
    env = [
        {"name": "TTT_METADATA__NAME", "value": run.name},
        {"name": "TTT_CORPUS__SHARDS", "value": str(run.spec.corpus.shards)},
        {"name": "TTT_INDEX__REPLICAS", "value": str(run.spec.index.replicas)},
    ]
    return {
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {
                    "annotations": {
                        "ttt.dev/run": run.name,
                        "ttt.dev/index-hash": run.stage_hash("index"),
                    }
                },
                "spec": {"containers": [{"name": container, "env": env}]},
            },
        }
    }


def rollout_complete(generation: int, replicas: int, status: dict[str, Any]) -> bool:
    """True once the controller saw the patch and every pod is updated and ready."""
    return (
        (status.get("observedGeneration") or 0) >= generation
        and (status.get("updatedReplicas") or 0) == replicas
        and (status.get("readyReplicas") or 0) == replicas
        and (status.get("replicas") or 0) == replicas
    )


def _apps_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


def deploy_index(
    run: TTTRun,
    *,
    namespace: str,
    statefulset: str,
    timeout_s: float = 1800.0,
    poll_s: float = 5.0,
    apps_api: Any = None,
) -> dict[str, Any]:
    """Scale `statefulset` to the run's shards x replicas and wait until all are ready."""
    api = apps_api or _apps_api()
    patch = statefulset_patch(run)
    replicas = patch["spec"]["replicas"]
    where = f"statefulset {namespace}/{statefulset}"
    try:
        patched = api.patch_namespaced_stateful_set(statefulset, namespace, patch)
    except Exception as exc:  # the kubernetes ApiException carries status and reason
        raise DeployError(f"{where}: cannot patch: {getattr(exc, 'reason', exc)}") from exc
    generation = patched.metadata.generation
    log.info("%s: %d replicas for run %s (generation %d)", where, replicas, run.name, generation)
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.read_namespaced_stateful_set_status(statefulset, namespace).status
        figures = {
            "observedGeneration": status.observed_generation,
            "replicas": status.replicas,
            "updatedReplicas": status.updated_replicas,
            "readyReplicas": status.ready_replicas,
        }
        if rollout_complete(generation, replicas, figures):
            log.info("%s: all %d shard pods ready", where, replicas)
            return {
                "statefulset": statefulset,
                "namespace": namespace,
                "run": run.name,
                "replicas": replicas,
                **figures,
            }
        if time.monotonic() > deadline:
            raise DeployError(f"{where}: not ready after {timeout_s:.0f} s: {figures}")
        time.sleep(poll_s)
