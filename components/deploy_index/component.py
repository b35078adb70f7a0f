"""deploy-index: restart the chart's index StatefulSet onto the published indexes; wait."""

from kfp import dsl

from components import CPU_IMAGE, exec_python


@exec_python
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy_index(
    spec: str,
    indexes: dsl.Input[list[dsl.Artifact]],
    namespace: str,
    statefulset: str,
    deployment: dsl.Output[dsl.Artifact],
    timeout_s: float = 1800.0,
) -> None:
    """Restart the chart's `statefulset` onto this run's indexes (manifests in `indexes`); wait."""
    import json

    from ttt.deploy import deploy_index as deploy
    from ttt.spec import resolve_spec
    from ttt.store import open_store

    run = resolve_spec(spec)
    store = open_store(run.spec.storage)
    result = deploy(run, store, namespace=namespace, statefulset=statefulset, timeout_s=timeout_s)
    result["indexes"] = len(indexes)
    with open(deployment.path, "w") as f:
        json.dump(result, f)
