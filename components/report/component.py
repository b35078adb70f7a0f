"""report: merge every rank's results into the per-domain table, summary and plots."""

from kfp import dsl

from components import CPU_IMAGE, exec_python


@exec_python
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(
    spec: str,
    summary: dsl.Output[dsl.Artifact],
    table: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
    page: dsl.Output[dsl.HTML],
    kfp_run_id: str = "",
) -> None:
    """Write report/ to the store; summary, table, headline figures (run comparison), report.html
    (viewer) also as KFP artifacts, and to MLflow (spec.tracking) under KFP run `kfp_run_id`."""
    import json

    from ttt.report import build_report, headline_figures
    from ttt.spec import resolve_spec
    from ttt.store import open_store

    run = resolve_spec(spec)
    result = build_report(run, open_store(run.spec.storage), kfp_run_id=kfp_run_id or None)
    with open(summary.path, "w") as f:
        json.dump(result, f)
    with open(table.path, "w") as f:
        f.write(result.get("table_markdown", ""))
    for name, value in headline_figures(result).items():
        metrics.log_metric(name, value)
    with open(f"{result['local_dir']}/report.html", "rb") as src, open(page.path, "wb") as out:
        out.write(src.read())
