"""Evaluation ranks: which test documents, whose, and the resumable worker that scores them."""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ttt import telemetry
from ttt.bpb import TaskTotals
from ttt.corpus import Document, iter_documents
from ttt.engine.select import build_engine
from ttt.errors import TTTError
from ttt.eval_document import evaluate_documents, needs_neighbors
from ttt.progress import WorkProgress
from ttt.results import (
    ATTEMPTS,
    RESULTS,
    attempt_id,
    checkpoint_score,
    load_existing,
    publish_rank,
    task_totals,
    write_records,
)

log = logging.getLogger(__name__)


class EvalError(TTTError, RuntimeError):
    """An evaluation that cannot proceed; the message names the run, rank, file or variable."""


# --- which documents, and whose ------------------------------------------------------------


def select_test_documents(run: Any, store: Any = None) -> list[Document]:
    """The evaluation set: per task, the spec's portion of its test documents, shuffled.

    selection "reference" (default) is tttlm's: per task in the test files' order,
    `random.Random()` seeded with `seed` shuffles, the first `int(portion * n)` are taken (a
    small task may give none). "sorted-ids": ids sorted, a generator seeded by (seed, task),
    at least one per task. Both deterministic, tasks sorted by name.
    """
    spec = run.spec
    if not spec.corpus.test:
        raise EvalError(f"run {run.name}: spec.corpus.test names no test files")
    # Two passes: ids first, texts of the selected only, so a worker never holds the
    # whole test set (the Pile's is about 1.4 GB of text) in memory.
    by_task: dict[str, list[str]] = {}
    for doc in iter_documents(spec.corpus.test, store=store, strict=spec.corpus.strict):
        by_task.setdefault(doc.domain, []).append(doc.id)
    if spec.eval.tasks == "all":
        tasks = sorted(by_task)
    else:
        missing = [t for t in spec.eval.tasks if t not in by_task]
        if missing:
            raise EvalError(
                f"run {run.name}: spec.eval.tasks names {missing}, absent from the test files "
                f"(tasks there: {sorted(by_task)})"
            )
        tasks = sorted(set(spec.eval.tasks))
    order: list[str] = []
    for task in tasks:
        if spec.eval.selection == "reference":
            pool = list(by_task[task])  # the test files' order
            random.Random(spec.eval.seed).shuffle(pool)  # = Random(); seed(1216) as tttlm
            count = int(spec.eval.portion * len(pool))
        else:
            pool = sorted(by_task[task])  # the order of the files must not matter
            random.Random(f"{spec.eval.seed}:{task}").shuffle(pool)
            count = max(1, math.floor(spec.eval.portion * len(pool) + 0.5))
        if spec.eval.max_documents_per_task is not None:
            count = min(count, spec.eval.max_documents_per_task)
        order.extend(pool[:count])
    wanted = set(order)
    found = {
        doc.id: doc
        for doc in iter_documents(spec.corpus.test, store=store, strict=spec.corpus.strict)
        if doc.id in wanted
    }
    return [found[i] for i in order]


def partition(docs: Sequence[Document], rank: int, world_size: int) -> list[Document]:
    """The documents of one rank: every document in exactly one rank, balanced by bytes.

    Longest-first greedy assignment to the lightest rank (ties: the lower rank), so the
    slowest rank finishes soon after the others; each rank keeps the input order.
    """
    if world_size < 1:
        raise EvalError(f"world size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside 0..{world_size - 1}")
    heap = [(0, r) for r in range(world_size)]
    owner: dict[int, int] = {}
    order = sorted(range(len(docs)), key=lambda i: (-docs[i].nbytes, docs[i].id))
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + docs[i].nbytes, r))
    return [doc for i, doc in enumerate(docs) if owner[i] == rank]


def resolve_rank(
    rank: int | None, world_size: int | None, environ: Mapping[str, str], default_world: int
) -> tuple[int, int]:
    """Rank and world size from arguments, else RANK / JOB_COMPLETION_INDEX and WORLD_SIZE."""

    def from_env(var: str) -> int | None:
        value = environ.get(var, "")
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise EvalError(f"environment variable {var}={value!r} is not an integer") from None

    if rank is None:
        # RANK: torchrun and hand-made Jobs; JOB_COMPLETION_INDEX: a Kubernetes Indexed Job
        rank = from_env("RANK")
        if rank is None:
            rank = from_env("JOB_COMPLETION_INDEX")
    if world_size is None:
        world_size = from_env("WORLD_SIZE")
    rank = 0 if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    return rank, world_size


# --- the rank worker -------------------------------------------------------------------------


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
    from ttt.engine.precision import load_for_engine
    from ttt.engine.select import choose_engine

    return load_for_engine(run.spec.ttt, choose_engine(run.spec.ttt))


class _Progress:
    """The worker's Prometheus figures, kept as running sums (not recomputed per document)."""

    def __init__(self, rank: int, checkpoints: list[int], records: Sequence[dict[str, Any]]):
        self.rank = str(rank)
        self.phases = {"before": checkpoints[0], "after": checkpoints[-1]}
        self.totals = {phase: task_totals(records, n) for phase, n in self.phases.items()}
        self.documents = len(records)
        self.excluded = sum(int(r.get("excluded", 0)) for r in records)

    def start(self, tasks: set[str]) -> None:
        """The bits-per-byte counters of every task left, at 0: `rate()` then sees the first
        document's increase (a series born at its first value would hide it)."""
        for task in sorted(tasks):
            for phase in self.phases:
                telemetry.EVAL_LOSS_NATS.labels(self.rank, task, phase)
                telemetry.EVAL_BYTES.labels(self.rank, task, phase)

    def add(self, record: dict[str, Any], pending: int) -> None:
        self.documents += 1
        self.excluded += int(record["excluded"])
        for phase, n in self.phases.items():
            totals = self.totals[phase].setdefault(record["task"], TaskTotals())
            score = checkpoint_score(record, n)
            totals.add(score)
            # Counters of what this process scored: a dashboard weights ranks by bytes.
            telemetry.EVAL_LOSS_NATS.labels(self.rank, record["task"], phase).inc(-score.loglik)
            telemetry.EVAL_BYTES.labels(self.rank, record["task"], phase).inc(score.bytes)
        telemetry.DOCUMENTS_DONE.labels(self.rank, record["task"]).inc()
        telemetry.DOCUMENTS_PENDING.labels(self.rank).set(pending)
        telemetry.NEIGHBORS_EXCLUDED.labels(self.rank).inc(record["excluded"])
        for phase, seconds in record["seconds"].items():
            telemetry.STAGE_SECONDS.labels(phase).observe(seconds)
        telemetry.LAST_PROGRESS.labels(self.rank).set_to_current_time()

    def push_final(self, run: Any) -> None:
        """The rank's final figures to the Pushgateway, when the spec names one."""
        bpb = {
            (("phase", phase), ("task", task)): totals.bits_per_byte
            for phase, by_task in self.totals.items()
            for task, totals in by_task.items()
        }
        telemetry.push_final(
            run.spec.metrics.pushgateway,
            job="ttt-eval",
            grouping={"run": run.name, "rank": self.rank},
            figures={
                "eval_final_bits_per_byte": bpb,
                "eval_final_documents": self.documents,
                "eval_final_neighbors_excluded": self.excluded,
            },
        )


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
) -> dict[str, Any]:
    """Evaluate one rank's test documents; resumable, one record per document; the manifest.

    Records go to a local results.jsonl and to `runs/<name>/eval/rank-NNNNN/results.jsonl`
    in the store at most every `flush_seconds` (and at the end); a restarted worker reads
    both back, skips finished documents and never counts one twice. Without a `retriever`,
    the run's shard servers answer (or, with `local_index`, its shards loaded in-process).
    Progress moves within a document too (neighbors, steps, ETA): on the bar on a terminal,
    else in a log line at most every `progress_seconds`.
    """
    spec_hash = run.stage_hash("eval")
    prefix = rank_prefix(run, rank)
    key = f"{prefix}/{RESULTS}"
    mine = partition(select_test_documents(run, store), rank, world_size)
    manifest = store.read_manifest(prefix)
    if (
        manifest
        and manifest.get("spec_hash") == spec_hash
        and manifest.get("world_size") == world_size
        and manifest.get("count") == len(mine)
    ):
        log.info("eval rank %d: finished already (%d documents)", rank, len(mine))
        return manifest

    # Work to do: a manifest of another world size or count must not say "finished" meanwhile.
    if manifest is not None:
        store.delete(f"{prefix}/manifest.json")
    work = Path(work_dir or Path(tempfile.gettempdir()) / f"ttt-eval-{run.name}")
    work.mkdir(parents=True, exist_ok=True)
    local = work / f"rank-{rank:05d}-{RESULTS}"
    wanted = {d.id for d in mine}
    records = [r for r in load_existing(store, key, local, spec_hash) if r["doc"] in wanted]
    if not run.spec.retrieval.allow_partial:
        # A document scored without every shard is not a result here: evaluate it again.
        partial = [r["doc"] for r in records if r.get("partial")]
        if partial:
            log.warning(
                "eval rank %d: %d partial record(s) (a shard did not answer) evaluated again; "
                "spec.retrieval.allowPartial is false",
                rank,
                len(partial),
            )
            records = [r for r in records if not r.get("partial")]
    write_records(local, records)  # a clean file: a torn line must not precede new ones
    # This attempt writes only its own file (see results.ATTEMPTS): another attempt on the
    # same rank can never overwrite it. Uploaded now, it also marks the evaluation as the
    # one the local copy belongs to (see load_existing), so a crash before the first flush
    # loses nothing.
    attempt = attempt_id()
    attempt_key = f"{prefix}/{ATTEMPTS}/{attempt}.jsonl"
    store.put_file(local, attempt_key)
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
    progress_figures = _Progress(rank, sorted(run.spec.ttt.eval_after) or [0], records)
    progress_figures.start({doc.domain for doc in todo})
    telemetry.DOCUMENTS_PENDING.labels(str(rank)).set(len(todo))
    if run.spec.metrics.enabled:
        try:
            telemetry.start_metrics_server(run.spec.metrics.port)
        except OSError as exc:
            log.warning("metrics port %d unavailable: %s", run.spec.metrics.port, exc)

    if todo:
        if needs_neighbors(run) and retriever is None:
            retriever = _default_retriever(run, store, local_index)
        model, tokenizer = lm or _default_lm(run)
        # the fast engine wherever it equals the sequential loop (ttt.engine.select)
        engine = build_engine(model, tokenizer, run.spec.ttt, rank=str(rank))
        last_flush = time.monotonic()
        bar = WorkProgress(
            f"eval rank {rank}", len(mine), len(done), enabled=progress, every=progress_seconds
        )
        engine.on_neighbor = bar.neighbor
        try:
            with local.open("a", encoding="utf-8") as out:
                finished = evaluate_documents(run, engine, retriever, todo, spec_hash, rank, bar)
                for i, record in enumerate(finished):
                    out.write(json.dumps(record, sort_keys=True) + "\n")
                    out.flush()
                    records.append(record)
                    progress_figures.add(record, pending=len(todo) - i - 1)
                    if time.monotonic() - last_flush >= flush_seconds:
                        store.put_file(local, attempt_key)
                        last_flush = time.monotonic()
        finally:
            # an error or a drain (SIGTERM -> KeyboardInterrupt) keeps what was finished
            bar.close()
            store.put_file(local, attempt_key)

    write_records(local, records)
    facts = {
        "stage": "eval",
        "rank": rank,
        "world_size": world_size,
        "count": len(records),
        "spec_hash": spec_hash,
        "neighbors_excluded": progress_figures.excluded,
        "partial_retrievals": sum(bool(r.get("partial")) for r in records),
        "attempt": attempt,
    }
    manifest = publish_rank(store, prefix, local, facts)
    progress_figures.push_final(run)
    log.info("eval rank %d: published %d records to %s", rank, len(records), key)
    return manifest
