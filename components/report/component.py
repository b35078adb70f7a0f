"""report: merge every rank's results into the per-domain table, summary and plots."""

from kfp import dsl

from components import CPU_IMAGE, exec_python


@exec_python
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(spec: str, summary: dsl.Output[dsl.Artifact], table: dsl.Output[dsl.Markdown]) -> None:
    """Write report/ to the store; the summary and the Markdown table also as KFP artifacts."""
    import json

    from ttt.report import build_report
    from ttt.spec import resolve_spec
    from ttt.store import open_store

    run = resolve_spec(spec)
    result = build_report(run, open_store(run.spec.storage))
    with open(summary.path, "w") as f:
        json.dump(result, f)
    with open(table.path, "w") as f:
        f.write(result.get("table_markdown", ""))
