"""deploy-index: the StatefulSet patch, the rollout condition, the wait loop and its timeout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ttt.deploy import DeployError, deploy_index, rollout_complete, statefulset_patch
from ttt.spec import loads_spec

SPEC = """apiVersion: ttt.dev/v1alpha1
kind: TTTRun
metadata: {name: pile}
spec:
  corpus: {shards: 3}
  index: {replicas: 2}
"""


def test_patch_scales_to_shards_times_replicas_and_names_the_run():
    run = loads_spec(SPEC, environ={})
    patch = statefulset_patch(run)
    assert patch["spec"]["replicas"] == 6
    env = {e["name"]: e["value"] for e in patch["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env == {
        "TTT_METADATA__NAME": "pile",
        "TTT_CORPUS__SHARDS": "3",
        "TTT_INDEX__REPLICAS": "2",
    }
    annotations = patch["spec"]["template"]["metadata"]["annotations"]
    assert annotations["ttt.dev/index-hash"] == run.stage_hash("index")


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


class _AppsApi:
    """Stands in for the cluster's AppsV1Api: pods become ready one poll at a time."""

    def __init__(self, ready_after: int) -> None:
        self.ready_after, self.polls, self.patches = ready_after, 0, []

    def patch_namespaced_stateful_set(self, name, namespace, body):
        self.patches.append((name, namespace, body))
        return SimpleNamespace(metadata=SimpleNamespace(generation=2))

    def read_namespaced_stateful_set_status(self, name, namespace):
        self.polls += 1
        ready = 6 if self.polls >= self.ready_after else min(self.polls, 5)
        return SimpleNamespace(
            status=SimpleNamespace(
                observed_generation=2, replicas=6, updated_replicas=6, ready_replicas=ready
            )
        )


def test_deploy_waits_until_every_shard_is_ready():
    api = _AppsApi(ready_after=3)
    result = deploy_index(
        loads_spec(SPEC, environ={}),
        namespace="ttt",
        statefulset="ttt-index",
        poll_s=0,
        apps_api=api,
    )
    assert api.polls == 3 and result["readyReplicas"] == 6
    assert api.patches[0][:2] == ("ttt-index", "ttt")


def test_deploy_times_out_with_the_figures():
    api = _AppsApi(ready_after=10**9)
    with pytest.raises(DeployError, match="ttt/ttt-index: not ready"):
        deploy_index(
            loads_spec(SPEC, environ={}),
            namespace="ttt",
            statefulset="ttt-index",
            timeout_s=0.05,
            poll_s=0.01,
            apps_api=api,
        )
