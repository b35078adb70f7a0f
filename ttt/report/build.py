"""The report stage: every rank's verified results from the store, summarized, written, published."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttt.eval.records import RESULTS, ResultsError, merge_records, parse_results
from ttt.report.page import write_page
from ttt.report.page_data import all_ids, task_documents, titles_for
from ttt.report.plots import plot_before_after, plot_bpb_vs_neighbors
from ttt.report.summary import finite, summarize
from ttt.report.table import format_table
from ttt.store import StoreError
from ttt.tracking import tracker

log = logging.getLogger(__name__)

REPORT_FILES = (
    "summary.json",
    "table.md",
    "bpb_vs_neighbors.png",
    "before_after.png",
    "report.html",
)


def read_results(
    run: Any, store: Any, *, allow_incomplete: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every rank's records of this spec, a document seen twice counted once; and rank facts.

    A finished rank's results file must match its manifest (sha256 and record count), and
    every rank 0..world_size-1 must be finished: otherwise ResultsError names the rank, so a
    lost or overwritten results file can never pass for a complete evaluation. With
    `allow_incomplete`, unfinished ranks' results (and their attempts' files) are read as
    they are, for a look at a running evaluation; a checksum mismatch still refuses.
    """
    from ttt.eval.records import rank_results

    spec_hash = run.stage_hash("eval")
    names = sorted(
        {m.group(1) for k in store.list(f"{run.prefix}/eval/") if (m := _RANK.search(k))}
    )
    groups, ranks, missing, worlds = [], {}, [], {}
    for name in names:
        prefix = f"{run.prefix}/eval/{name}"
        manifest = store.read_manifest(prefix)
        finished = bool(manifest and manifest.get("spec_hash") == spec_hash)
        if finished:
            group = _verified_results(store, prefix, manifest)
            worlds[name] = manifest.get("world_size")
        elif allow_incomplete:
            group = rank_results(store, prefix)
        else:
            group = []
            missing.append(name)
        groups.append(group)
        ranks[name] = {
            "records": len(group),
            "finished": finished,
            "world_size": (manifest or {}).get("world_size"),
        }
    world = _world_size(run, worlds)
    absent = [f"rank-{r:05d}" for r in range(world) if f"rank-{r:05d}" not in worlds]
    wrong = [n for n, w in worlds.items() if w != world and int(n[5:]) < world]
    if not allow_incomplete and names and (absent or wrong):
        why = [f"{n}: no finished results of this spec" for n in absent]
        why += [f"{n}: finished with world size {worlds[n]}, not {world}" for n in wrong]
        raise ResultsError(
            f"run {run.name}: the evaluation is incomplete ({world} ranks): "
            + "; ".join(why)
            + " (finish them with `ttt eval`, or report anyway with --allow-incomplete)"
        )
    records = merge_records(groups, spec_hash)
    raw = sum(len(g) for g in groups)
    complete = not absent and not wrong and all(v["finished"] for v in ranks.values())
    facts = {"ranks": ranks, "duplicates_or_stale": raw - len(records), "complete": complete}
    return records, facts


_RANK = re.compile(r"/eval/(rank-\d{5})/")


def _world_size(run: Any, worlds: dict[str, Any]) -> int:
    """The world size the finished ranks agree on (rank 0's), else the spec's workers."""
    if "rank-00000" in worlds and isinstance(worlds["rank-00000"], int):
        return worlds["rank-00000"]
    known = [w for w in worlds.values() if isinstance(w, int)]
    return max(known) if known else run.spec.eval.workers


def _verified_results(store: Any, prefix: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished rank's records, checked against its manifest's sha256 and count."""
    key = f"{prefix}/{RESULTS}"
    name = prefix.rsplit("/", 1)[-1]
    recorded = manifest.get("files", {}).get(RESULTS, {})
    try:
        data = store.get_bytes(key)
    except StoreError as exc:
        raise ResultsError(f"{name}: finished, but its results file is unreadable: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if recorded.get("sha256") != digest:
        raise ResultsError(
            f"{name}: {key} does not match its manifest (sha256 {digest[:12]}..., manifest "
            f"{str(recorded.get('sha256'))[:12]}...): overwritten or corrupt; run `ttt eval` "
            "for this rank again"
        )
    group = parse_results(data, key)
    if manifest.get("count") is not None and len(group) != manifest["count"]:
        raise ResultsError(
            f"{name}: {key} holds {len(group)} records, its manifest says {manifest['count']}"
        )
    return group


def build_report(
    run: Any,
    store: Any,
    *,
    out_dir: str | Path | None = None,
    allow_incomplete: bool = False,
    compare: Sequence[tuple[Any, Any]] = (),
    kfp_run_id: str | None = None,
) -> dict[str, Any]:
    """Merge the ranks, write summary.json, table.md, the two plots and report.html to `report/`.

    Refuses (ResultsError naming the rank) unless every rank finished and its results match
    its manifest; `allow_incomplete` reports what is there, marked "complete": false. With
    `compare` ((run, store) of other runs, e.g. SIFT), the page shows their picks of each
    test document beside this run's. With spec.tracking.mlflow, the figures and files also go
    to the run's MLflow parent run (of KFP run `kfp_run_id`, default $KFP_RUN_ID).
    """
    records, facts = read_results(run, store, allow_incomplete=allow_incomplete)
    if not records:
        raise ResultsError(
            f"run {run.name}: no eval results of this spec under {run.prefix}/eval/ "
            "(run `ttt eval` first)"
        )
    unfinished = [r for r, v in facts["ranks"].items() if not v["finished"]]
    if unfinished:
        log.warning("report over unfinished rank(s) %s: figures are partial", unfinished)
    summary = summarize(records, run.spec.ttt.eval_after or [0], run.spec.ttt.method)
    summary.update(run=run.name, spec_hash=run.stage_hash("eval"), **facts)
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"ttt-report-{run.name}-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(finite(summary), indent=2, sort_keys=True))
    (out / "table.md").write_text(format_table(summary))
    plot_bpb_vs_neighbors(summary, out / "bpb_vs_neighbors.png")
    plot_before_after(summary, out / "before_after.png")
    others = [(o.name, read_results(o, s, allow_incomplete=True)[0]) for o, s in compare]
    titles = titles_for(run, store, all_ids([*records, *(r for _, rs in others for r in rs)]))
    write_page(
        out / "report.html",
        summary,
        task_documents(records, titles, others),
        [name for name, _ in others],
    )
    store.publish(
        f"{run.prefix}/report",
        {name: out / name for name in REPORT_FILES},
        {"stage": "report", "spec_hash": run.stage_hash("report"), "documents": len(records)},
    )
    # MLflow (spec.tracking.mlflow): figures and files on the run's parent; never fails here
    if (tracked := tracker(run, kfp_run_id)) is not None:
        tracked.log_report(finite(summary), {name: out / name for name in REPORT_FILES})
    summary["local_dir"] = str(out)
    summary["table_markdown"] = format_table(summary)
    return summary
