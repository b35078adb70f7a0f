"""The rank worker: resumable evaluation of one rank's test documents, published with a manifest."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ttt import telemetry
from ttt.engine.select import build_engine
from ttt.eval.carried import CarriedState, resume_point
from ttt.eval.document import evaluate_documents
from ttt.eval.figures import RankFigures
from ttt.eval.records import (
    RESULTS,
    RankRecords,
)
from ttt.eval.retrieve import needs_neighbors
from ttt.eval.sample import partition, select_test_documents, split_for
from ttt.progress import PROGRESS_FILE_ENV, WorkProgress
from ttt.tracking import tracked_rank

log = logging.getLogger(__name__)


def rank_prefix(run: Any, rank: int) -> str:
    """runs/<name>/eval/rank-NNNNN: where a rank publishes its results and manifest."""
    return f"{run.prefix}/eval/rank-{rank:05d}"


def _default_retriever(run: Any, store: Any, local_index: bool) -> Any:
    """The run's shard servers (found by discover_endpoints), or its shards loaded here."""
    from ttt.index.client import LocalRetriever, ShardedRetriever

    if local_index or run.spec.retrieval.in_process:
        return LocalRetriever.from_run(run, store=store)
    return ShardedRetriever.from_run(run, store=store)


def _default_lm(run: Any) -> tuple[Any, Any]:
    from ttt.device import pick_device
    from ttt.engine.precision import load_for_engine
    from ttt.engine.select import choose_engine

    device = pick_device(run.spec.ttt.device)
    return load_for_engine(run.spec.ttt, choose_engine(run.spec.ttt, device), run.spec.storage)


def prepare_worker_process(run: Any) -> int | None:
    """What a process that is an eval worker (`ttt eval`, the ttt-eval component) sets before
    its work, which evaluate_rank as a library call leaves alone: the host allocator of
    ttt.engine.hostmem, for the engine and device this run takes. The threshold set, or None."""
    from ttt.device import pick_device
    from ttt.engine.hostmem import worker_allocator
    from ttt.engine.select import choose_engine

    device = pick_device(run.spec.ttt.device)
    return worker_allocator(choose_engine(run.spec.ttt, device), device)


def evaluate_rank(
    run: Any,
    store: Any,
    rank: int = 0,
    world_size: int = 1,
    *,
    retriever: Any = None,
    lm: tuple[Any, Any] | None = None,
    work_dir: str | Path | None = None,
    flush_seconds: float = 5.0,
    progress: bool = True,
    local_index: bool = False,
    progress_seconds: float = 30.0,
    state_seconds: float = 300.0,
    kfp_run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate one rank's test documents; resumable, one record per document; the manifest.

    Records go to a local results.jsonl and to `runs/<name>/eval/rank-NNNNN/results.jsonl`
    in the store at most every `flush_seconds` (and at the end), a carried optimizer's state
    beside them at most every `state_seconds`; a restarted worker reads
    both back, skips finished documents and never counts one twice. Without a `retriever`,
    the run's shard servers answer (or, with `local_index`, its shards loaded in-process).
    Progress moves within a document too (neighbors, steps, ETA): on the bar on a terminal,
    else in a log line at most every `progress_seconds`.

    With spec.tracking.mlflow, the rank is an MLflow run nested under the run's parent: the
    resolved spec as params, bits per byte per task and checkpoint as metrics, tied to the KFP
    run `kfp_run_id` (default: $KFP_RUN_ID); a tracking server that is down is a warning,
    never a failed rank (ttt.tracking).
    """
    prefix = rank_prefix(run, rank)
    with tracked_rank(run, store, rank, world_size, prefix, kfp_run_id) as outcome:
        outcome["manifest"] = _evaluate_rank(
            run, store, rank, world_size, retriever=retriever, lm=lm, work_dir=work_dir,
            flush_seconds=flush_seconds, progress=progress, local_index=local_index,
            progress_seconds=progress_seconds, state_seconds=state_seconds,
        )  # fmt: skip
    return outcome["manifest"]


def _evaluate_rank(
    run: Any,
    store: Any,
    rank: int,
    world_size: int,
    *,
    retriever: Any,
    lm: tuple[Any, Any] | None,
    work_dir: str | Path | None,
    flush_seconds: float,
    progress: bool,
    local_index: bool,
    progress_seconds: float,
    state_seconds: float,
) -> dict[str, Any]:
    """evaluate_rank's work, without the tracking around it."""
    spec_hash = run.stage_hash("eval")
    prefix = rank_prefix(run, rank)
    split = split_for(run)  # strided per task with a carried optimizer, as the reference
    skipped: set[str] = set()  # selected, but the reader skips them: they keep their place
    mine = partition(select_test_documents(run, store, skipped), rank, world_size, split)
    skipped_here = sum(d.id in skipped for d in mine)
    mine = [d for d in mine if d.id not in skipped]
    manifest = store.read_manifest(prefix)
    if (
        manifest
        and manifest.get("spec_hash") == spec_hash
        and manifest.get("world_size") == world_size
        and manifest.get("split", "bytes") == split
        and manifest.get("count") == len(mine)
    ):
        log.info("eval rank %d: finished already (%d documents)", rank, len(mine))
        return manifest

    # Work to do: a manifest of another world size or count must not say "finished" meanwhile.
    if manifest is not None:
        store.delete(f"{prefix}/manifest.json")
    work = Path(work_dir or Path(tempfile.gettempdir()) / f"ttt-eval-{run.name}")
    work.mkdir(parents=True, exist_ok=True)
    results = RankRecords(store, prefix, work / f"rank-{rank:05d}-{RESULTS}", spec_hash)
    records = results.resume({d.id for d in mine}, run.spec.retrieval.allow_partial)
    carried, resume_state, first_task = None, None, None
    if split == "strided":  # a carried optimizer: resume from its saved state, or re-evaluate
        carried = CarriedState(store, prefix, spec_hash, every=state_seconds)
        cut, facts = resume_point(mine, {r["doc"] for r in records}, carried.saved())
        if facts is not None:
            resume_state = carried.read(facts)
            if resume_state is None:  # damaged: from the task's start, with a fresh optimizer
                cut, _ = resume_point(mine, {d.id for d in mine[:cut]}, [])
        if cut < len(mine) and len(records) > cut:
            log.info("eval rank %d: %d record(s) past the saved optimizer state evaluated "
                     "again", rank, len(records) - cut)  # fmt: skip
        results.keep({d.id for d in mine[:cut]})
        records = results.records
        first_task = mine[cut - 1].domain if resume_state is not None else None
    done = {r["doc"] for r in records}
    todo = [d for d in mine if d.id not in done]
    log.info(
        "eval rank %d/%d: %d documents, %d done before, %d to go",
        rank,
        world_size,
        len(mine),
        len(done),
        len(todo),
    )
    progress_figures = RankFigures(rank, sorted(run.spec.ttt.eval_after) or [0], records)
    progress_figures.start({doc.domain for doc in todo})
    telemetry.DOCUMENTS_PENDING.labels(str(rank)).set(len(todo))
    if run.spec.metrics.enabled:
        try:
            telemetry.start_metrics_server(run.spec.metrics.port, run=run.name)
        except OSError as exc:
            log.warning("metrics port %d unavailable: %s", run.spec.metrics.port, exc)

    if todo:
        if needs_neighbors(run) and retriever is None:
            retriever = _default_retriever(run, store, local_index)
        model, tokenizer = lm or _default_lm(run)
        # the fastest engine proven equal on this device (ttt.engine.rule)
        engine = build_engine(model, tokenizer, run.spec.ttt, rank=str(rank))
        bar = WorkProgress(
            f"eval rank {rank}",
            len(mine),
            len(done),
            enabled=progress,
            every=progress_seconds,
            # the local runner reads each worker's counts from here for its own line
            status_path=os.environ.get(PROGRESS_FILE_ENV) or None,
        )
        engine.on_neighbor = bar.neighbor
        if carried is not None:
            if resume_state is not None:
                engine.load_optimizer_state(resume_state)
            # the state after the last record, saved before the records go up; older ones
            # removed after
            results.before_upload = lambda recs: (
                recs and carried.due() and carried.save(engine.optimizer_state(), recs)
            )
            results.after_upload = lambda n: n and carried.prune(n)
        try:
            with results.appending(flush_seconds) as append:
                finished = evaluate_documents(
                    run, engine, retriever, todo, spec_hash, rank, bar, task=first_task
                )
                for i, record in enumerate(finished):
                    # the split over workers changes a carried optimizer's results: recorded
                    record = {**record, "world_size": world_size, "split": split}
                    append(record)
                    progress_figures.add(record, pending=len(todo) - i - 1)
        finally:
            bar.close()

    manifest = results.publish(
        {
            "stage": "eval",
            "rank": rank,
            "world_size": world_size,
            "split": split,
            "skipped_documents": skipped_here,
            "spec_hash": spec_hash,
            "neighbors_excluded": progress_figures.excluded,
            "partial_retrievals": sum(bool(r.get("partial")) for r in results.records),
        }
    )
    progress_figures.push_final(run)
    log.info("eval rank %d: published %d records to %s", rank, len(results.records), results.key)
    return manifest
