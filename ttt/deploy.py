"""deploy-index: check that the Helm-owned index StatefulSet serves a run, restart it, wait."""

from __future__ import annotations

import logging
import time
from typing import Any

from ttt.errors import TTTError
from ttt.spec import TTTRun

log = logging.getLogger(__name__)

CONTAINER = "index"  # the chart's container name in the index StatefulSet
RUN_VOLUME = "run-spec"  # the chart's volume of the run ConfigMap (key run.yaml)
# The one field deploy-index owns: a pod-template annotation the chart never renders, so a
# later `helm upgrade` (three-way merge) leaves it, as it leaves `kubectl rollout restart`'s.
PUBLISHED = "ttt.dev/index-published"
FIELD_MANAGER = "ttt-deploy-index"


class DeployError(TTTError, RuntimeError):
    """The index StatefulSet does not serve this run, or did not become ready in time."""


def published_digest(run: TTTRun, store: Any) -> str:
    """A digest of every shard's published index manifest: changes when an index is rebuilt."""
    import hashlib
    import json

    from ttt.stages import shard_prefix

    digest = hashlib.sha256()
    for shard in range(run.spec.corpus.shards):
        manifest = store.read_manifest(shard_prefix(run, "index", shard))
        if manifest is None:
            raise DeployError(f"run {run.name}: shard {shard} has no published index")
        digest.update(json.dumps(manifest.get("files", {}), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def statefulset_patch(digest: str) -> dict[str, Any]:
    """The only change deploy-index makes: restart the servers onto the published indexes."""
    return {"spec": {"template": {"metadata": {"annotations": {PUBLISHED: digest}}}}}


def served_run(statefulset: Any, read_configmap: Any) -> TTTRun:
    """The run the chart's StatefulSet serves: its run ConfigMap, with the container's
    TTT_ overrides applied as the servers apply them."""
    from ttt.spec import loads_spec

    spec = statefulset.spec.template.spec
    names = [v.config_map.name for v in spec.volumes or [] if v.name == RUN_VOLUME]
    if not names:
        raise DeployError(f"statefulset {statefulset.metadata.name}: no '{RUN_VOLUME}' volume")
    text = read_configmap(names[0]).data["run.yaml"]
    (container,) = [c for c in spec.containers if c.name == CONTAINER]
    env = {e.name: e.value for e in container.env or [] if e.value is not None}
    return loads_spec(text, f"configmap {names[0]}: run.yaml", env)


def rollout_complete(generation: int, replicas: int, status: dict[str, Any]) -> bool:
    """True once the controller saw the patch and every pod is updated and ready."""
    return (
        (status.get("observedGeneration") or 0) >= generation
        and (status.get("updatedReplicas") or 0) == replicas
        and (status.get("readyReplicas") or 0) == replicas
        and (status.get("replicas") or 0) == replicas
    )


def _apis() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api(), client.CoreV1Api()


def deploy_index(
    run: TTTRun,
    store: Any,
    *,
    namespace: str,
    statefulset: str,
    timeout_s: float = 1800.0,
    poll_s: float = 5.0,
    apps_api: Any = None,
    core_api: Any = None,
) -> dict[str, Any]:
    """Check that the Helm-owned `statefulset` serves `run`, restart it onto the published
    indexes (only when they changed), and wait until every pod is updated and ready.

    Helm owns the StatefulSet and the run spec (values `run:`): deploy-index never scales it
    nor rewrites its spec, so `helm upgrade` after a pipeline run changes nothing it did.

    `timeout_s` bounds each step of the rollout, not the whole: a rolling update replaces
    one pod at a time, each loading its shard's index, so the wait fails only when no pod
    became updated or ready for `timeout_s` (the total scales with the shard count).
    """
    if apps_api is None or core_api is None:
        apps_api, core_api = _apis()
    where = f"statefulset {namespace}/{statefulset}"
    try:
        current = apps_api.read_namespaced_stateful_set(statefulset, namespace)
        served = served_run(
            current, lambda name: core_api.read_namespaced_config_map(name, namespace)
        )
    except DeployError:
        raise
    except Exception as exc:  # the kubernetes ApiException carries status and reason
        raise DeployError(f"{where}: cannot read: {getattr(exc, 'reason', exc)}") from exc
    if (served.name, served.stage_hash("index")) != (run.name, run.stage_hash("index")):
        raise DeployError(
            f"{where} serves run {served.name!r} (index {served.stage_hash('index')}), not "
            f"{run.name!r} (index {run.stage_hash('index')}): put this run's spec under `run:` "
            "in the chart's values and `helm upgrade` the release"
        )
    digest = published_digest(run, store)
    annotations = current.spec.template.metadata.annotations or {}
    generation = current.metadata.generation
    if annotations.get(PUBLISHED) != digest:
        try:
            patched = apps_api.patch_namespaced_stateful_set(
                statefulset, namespace, statefulset_patch(digest), field_manager=FIELD_MANAGER
            )
        except Exception as exc:
            raise DeployError(f"{where}: cannot patch: {getattr(exc, 'reason', exc)}") from exc
        generation = patched.metadata.generation
        log.info("%s: restarting onto index %s (generation %d)", where, digest, generation)
    replicas = current.spec.replicas
    deadline = time.monotonic() + timeout_s
    progress = -1
    while True:
        status = apps_api.read_namespaced_stateful_set_status(statefulset, namespace).status
        figures = {
            "observedGeneration": status.observed_generation,
            "replicas": status.replicas,
            "updatedReplicas": status.updated_replicas,
            "readyReplicas": status.ready_replicas,
        }
        if rollout_complete(generation, replicas, figures):
            log.info("%s: all %d index pods ready", where, replicas)
            return {
                "statefulset": statefulset,
                "namespace": namespace,
                "run": run.name,
                "published": digest,
                **figures,
            }
        done = (figures["updatedReplicas"] or 0) + (figures["readyReplicas"] or 0)
        if done > progress:  # another pod updated or ready: the next one gets timeout_s
            progress, deadline = done, time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            raise DeployError(
                f"{where}: no pod updated or ready for {timeout_s:.0f} s "
                f"({replicas} replicas): {figures}"
            )
        time.sleep(poll_s)
