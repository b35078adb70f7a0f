"""deploy-index: the served-run check, the one annotation it owns, the wait, its RBAC."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from helm_chart import render

from ttt.deploy import (
    FIELD_MANAGER,
    PUBLISHED,
    DeployError,
    deploy_index,
    rollout_complete,
    statefulset_patch,
)
from ttt.spec import loads_spec
from ttt.stages import shard_prefix
from ttt.store import open_store

SPEC = """apiVersion: ttt.dev/v1alpha1
kind: TTTRun
metadata: {name: pile}
spec:
  corpus: {shards: 3}
  index: {replicas: 2}
"""


@pytest.fixture
def store(tmp_path):
    """A local store where the run's three shard indexes are published."""
    run = loads_spec(SPEC, environ={})
    store = open_store(run.spec.storage.model_copy(update={"root": str(tmp_path)}))
    for shard in range(3):
        f = tmp_path / f"index-{shard}.faiss"
        f.write_bytes(b"index %d" % shard)
        store.publish(shard_prefix(run, "index", shard), {"index.faiss": f}, {"stage": "index"})
    return store


def test_the_patch_is_one_annotation():
    assert statefulset_patch("abc") == {
        "spec": {"template": {"metadata": {"annotations": {PUBLISHED: "abc"}}}}
    }


@pytest.mark.parametrize(
    ("status", "done"),
    [
        ({"observedGeneration": 4, "replicas": 6, "updatedReplicas": 6, "readyReplicas": 6}, True),
        ({"observedGeneration": 3, "replicas": 6, "updatedReplicas": 6, "readyReplicas": 6}, False),
        ({"observedGeneration": 4, "replicas": 6, "updatedReplicas": 6, "readyReplicas": 5}, False),
        ({"observedGeneration": 4, "replicas": 7, "updatedReplicas": 6, "readyReplicas": 6}, False),
        (
            {"observedGeneration": 4, "replicas": 6, "updatedReplicas": None, "readyReplicas": 6},
            False,
        ),
    ],
)
def test_rollout_complete(status, done):
    assert rollout_complete(4, 6, status) is done


class _Cluster:
    """Stands in for AppsV1Api and CoreV1Api of a cluster where the chart is installed.

    Records every call as (verb, resource, name), the way RBAC sees it.
    """

    def __init__(self, served_spec: str, ready_after: int, annotations=None) -> None:
        self.served_spec, self.ready_after, self.polls = served_spec, ready_after, 0
        self.calls: list[tuple[str, str, str]] = []
        self.patches: list[tuple[dict, str]] = []
        self.annotations = dict(annotations or {})

    def read_namespaced_stateful_set(self, name, namespace):
        self.calls.append(("get", "statefulsets", name))
        env = [SimpleNamespace(name="TTT_STORAGE__CACHEDIR", value="/var/cache/ttt")]
        container = SimpleNamespace(name="index", env=env)
        volume = SimpleNamespace(name="run-spec", config_map=SimpleNamespace(name="ttt-run"))
        template = SimpleNamespace(
            metadata=SimpleNamespace(annotations=self.annotations),
            spec=SimpleNamespace(containers=[container], volumes=[volume]),
        )
        return SimpleNamespace(
            metadata=SimpleNamespace(name=name, generation=1),
            spec=SimpleNamespace(replicas=6, template=template),
        )

    def read_namespaced_config_map(self, name, namespace):
        self.calls.append(("get", "configmaps", name))
        return SimpleNamespace(data={"run.yaml": self.served_spec})

    def patch_namespaced_stateful_set(self, name, namespace, body, field_manager=None):
        self.calls.append(("patch", "statefulsets", name))
        self.patches.append((body, field_manager))
        return SimpleNamespace(metadata=SimpleNamespace(generation=2))

    def read_namespaced_stateful_set_status(self, name, namespace):
        self.calls.append(("get", "statefulsets/status", name))
        self.polls += 1
        ready = 6 if self.polls >= self.ready_after else min(self.polls, 5)
        return SimpleNamespace(
            status=SimpleNamespace(
                observed_generation=2, replicas=6, updated_replicas=6, ready_replicas=ready
            )
        )


def deploy(cluster: _Cluster, store, **kwargs):
    return deploy_index(
        loads_spec(SPEC, environ={}),
        store,
        namespace="ttt",
        statefulset="ttt-index",
        apps_api=cluster,
        core_api=cluster,
        **{"poll_s": 0, **kwargs},
    )


def test_deploy_restarts_onto_the_published_index_and_waits(store):
    cluster = _Cluster(SPEC, ready_after=3)
    result = deploy(cluster, store)
    assert cluster.polls == 3 and result["readyReplicas"] == 6
    ((body, manager),) = cluster.patches
    assert manager == FIELD_MANAGER and body == statefulset_patch(result["published"])
    # Helm's fields stay Helm's: no replicas, no env, no spec change.
    assert set(body["spec"]) == {"template"}


def test_deploy_again_restarts_nothing(store):
    first = deploy(_Cluster(SPEC, ready_after=1), store)
    cluster = _Cluster(SPEC, ready_after=1, annotations={PUBLISHED: first["published"]})
    deploy(cluster, store)
    assert cluster.patches == []


def test_a_chart_serving_another_run_is_an_error_naming_both(store):
    other = SPEC.replace("{name: pile}", "{name: other}")
    with pytest.raises(DeployError, match=r"serves run 'other'.*not 'pile'.*helm upgrade"):
        deploy(_Cluster(other, ready_after=1), store)
    # Same name, another index (4 shards): the servers would load the wrong indexes.
    changed = SPEC.replace("{shards: 3}", "{shards: 4}")
    with pytest.raises(DeployError, match="serves run 'pile' \\(index"):
        deploy(_Cluster(changed, ready_after=1), store)


def test_a_replica_change_in_the_chart_is_still_this_run(store):
    scaled = SPEC.replace("{replicas: 2}", "{replicas: 5}")
    deploy(_Cluster(scaled, ready_after=1), store)


def test_deploy_times_out_with_the_figures(store):
    with pytest.raises(DeployError, match="ttt/ttt-index: no pod updated or ready for 0 s"):
        deploy(_Cluster(SPEC, ready_after=10**9), store, timeout_s=0.05, poll_s=0.01)


class _RollingCluster(_Cluster):
    """A rolling update that replaces one pod at a time: every `polls_per_pod` status
    polls one more pod is updated and ready, until `stall_at` (if given)."""

    def __init__(self, polls_per_pod: int, stall_at: int | None = None) -> None:
        super().__init__(SPEC, ready_after=10**9)
        self.polls_per_pod, self.stall_at = polls_per_pod, stall_at

    def read_namespaced_stateful_set_status(self, name, namespace):
        self.calls.append(("get", "statefulsets/status", name))
        self.polls += 1
        done = min(6, self.polls // self.polls_per_pod)
        if self.stall_at is not None:
            done = min(done, self.stall_at)
        return SimpleNamespace(
            status=SimpleNamespace(
                observed_generation=2, replicas=6, updated_replicas=done, ready_replicas=done
            )
        )


def test_the_timeout_bounds_each_pod_of_a_rolling_update_not_the_whole(store):
    """Six pods replaced one at a time, about 0.2 s each: 1.2 s in all against a 0.6 s
    timeout, which a whole-rollout deadline (30 shards against 1800 s) would fail."""
    cluster = _RollingCluster(polls_per_pod=10)
    result = deploy(cluster, store, timeout_s=0.6, poll_s=0.02)
    assert result["readyReplicas"] == 6 and cluster.polls >= 60


def test_a_stalled_rolling_update_fails_after_the_timeout(store):
    cluster = _RollingCluster(polls_per_pod=1, stall_at=3)
    with pytest.raises(DeployError, match=r"no pod updated or ready for 0 s \(6 replicas\)"):
        deploy(cluster, store, timeout_s=0.2, poll_s=0.01)


def test_chart_rbac_covers_exactly_the_calls_deploy_makes(store):
    pytest.importorskip("helm_python")
    cluster = _Cluster(SPEC, ready_after=1)
    deploy(cluster, store)
    made = {(verb, resource, name) for verb, resource, name in cluster.calls}
    docs = list(yaml.safe_load_all(render()["ttt/templates/pipelines-rbac.yaml"]))
    (role,) = [d for d in docs if d and d["kind"] == "Role"]
    granted = {
        (verb, resource, name)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for resource in rule["resources"]
        for name in rule["resourceNames"]
    }
    assert granted == made
    (binding,) = [d for d in docs if d and d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    ]
