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

from tqdm import tqdm

from ttt import telemetry
from ttt.bpb import TaskTotals
from ttt.corpus import Document, iter_documents
from ttt.engine.select import build_engine
from ttt.errors import TTTError
from ttt.results import (
    RESULTS,
    checkpoint_score,
    load_existing,
    result_record,
    task_totals,
    write_records,
)
from ttt.train import select_neighbors

log = logging.getLogger(__name__)


class EvalError(TTTError, RuntimeError):
    """An evaluation that cannot proceed; the message names the run, rank, file or variable."""


# --- which documents, and whose ------------------------------------------------------------


def select_test_documents(run: Any, store: Any = None) -> list[Document]:
    """The evaluation set: per task, the spec's portion of its test documents, seeded-shuffled.

    Deterministic: the same spec and test files give the same documents in the same order
    (tasks sorted by name, each task in its shuffled order). Each task is shuffled with its
    own generator seeded by (seed, task), so adding a task never changes another's selection.
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


def guard_neighbors(text: str, neighbors: Sequence[Any], retrieval: Any) -> tuple[list, list]:
    """(kept, excluded) neighbors, nearest first: the distance threshold, then the leakage guard.

    The rule is train.select_neighbors' (one definition); it is applied neighbor by neighbor
    here so that the record can name which neighbors were used and which were excluded.
    """
    kept, excluded = [], []
    for n in sorted(neighbors, key=lambda n: n.distance):
        verdict = select_neighbors(
            text,
            [n.text or ""],
            [n.distance],
            distance_threshold=retrieval.distance_threshold,
            exclude_identical=retrieval.exclude_identical,
            identical_distance=retrieval.identical_distance,
        )
        if verdict.texts:
            kept.append(n)
        elif verdict.excluded_identical:
            excluded.append(n)
    return kept, excluded


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


def _needs_neighbors(run: Any) -> bool:
    t = run.spec.ttt
    return run.spec.retrieval.neighbors > 0 and t.method != "dynamic-eval"


class _Progress:
    """The worker's Prometheus figures, kept as running sums (not recomputed per document)."""

    def __init__(self, rank: int, checkpoints: list[int], records: Sequence[dict[str, Any]]):
        self.rank = str(rank)
        self.phases = {"before": checkpoints[0], "after": checkpoints[-1]}
        self.totals = {phase: task_totals(records, n) for phase, n in self.phases.items()}
        self.documents = len(records)
        self.excluded = sum(int(r.get("excluded", 0)) for r in records)
        for phase in self.phases:
            for task in self.totals[phase]:
                self._set(phase, task)

    def _set(self, phase: str, task: str) -> None:
        value = self.totals[phase][task].bits_per_byte
        telemetry.BITS_PER_BYTE.labels(self.rank, task, phase).set(value)

    def add(self, record: dict[str, Any], pending: int) -> None:
        self.documents += 1
        self.excluded += int(record["excluded"])
        for phase, n in self.phases.items():
            totals = self.totals[phase].setdefault(record["task"], TaskTotals())
            totals.add(checkpoint_score(record, n))
            self._set(phase, record["task"])
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
) -> dict[str, Any]:
    """Evaluate one rank's test documents; resumable, one record per document; the manifest.

    Records go to a local results.jsonl and to `runs/<name>/eval/rank-NNNNN/results.jsonl`
    in the store at most every `flush_seconds` (and at the end); a restarted worker reads
    both back, skips finished documents and never counts one twice. Without a `retriever`,
    the run's shard servers answer (or, with `local_index`, its shards loaded in-process).
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
    write_records(local, records)  # a clean file: a torn line must not precede new ones
    # The store's file marks this evaluation as the one the local copy belongs to (see
    # load_existing): upload it now, so a crash before the first flush loses nothing.
    store.put_file(local, key)
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
    telemetry.DOCUMENTS_PENDING.labels(str(rank)).set(len(todo))
    if run.spec.metrics.enabled:
        try:
            telemetry.start_metrics_server(run.spec.metrics.port)
        except OSError as exc:
            log.warning("metrics port %d unavailable: %s", run.spec.metrics.port, exc)

    if todo:
        if _needs_neighbors(run) and retriever is None:
            retriever = _default_retriever(run, store, local_index)
        model, tokenizer = lm or _default_lm(run)
        # the fast engine wherever it equals the sequential loop (ttt.engine.select)
        engine = build_engine(model, tokenizer, run.spec.ttt, rank=str(rank))
        k = run.spec.retrieval.neighbors
        last_flush = time.monotonic()
        bar = tqdm(
            desc=f"eval rank {rank}",
            unit="doc",
            initial=len(done),
            total=len(mine),
            disable=None if progress else True,
        )
        try:
            with local.open("a", encoding="utf-8") as out:
                finished = _evaluate_documents(run, engine, retriever, todo, k, spec_hash, rank)
                for i, record in enumerate(finished):
                    bar.update(1)
                    out.write(json.dumps(record, sort_keys=True) + "\n")
                    out.flush()
                    records.append(record)
                    progress_figures.add(record, pending=len(todo) - i - 1)
                    if time.monotonic() - last_flush >= flush_seconds:
                        store.put_file(local, key)
                        last_flush = time.monotonic()
        finally:
            # an error or a drain (SIGTERM -> KeyboardInterrupt) keeps what was finished
            bar.close()
            store.put_file(local, key)

    write_records(local, records)
    manifest = store.publish(
        prefix,
        {RESULTS: local},
        {
            "stage": "eval",
            "rank": rank,
            "world_size": world_size,
            "count": len(records),
            "spec_hash": spec_hash,
            "neighbors_excluded": progress_figures.excluded,
            "partial_retrievals": sum(bool(r.get("partial")) for r in records),
        },
    )
    progress_figures.push_final(run)
    log.info("eval rank %d: published %d records to %s", rank, len(records), key)
    return manifest


def _evaluate_documents(
    run: Any,
    engine: Any,
    retriever: Any,
    docs: Sequence[Document],
    k: int,
    spec_hash: str,
    rank: int,
) -> Any:
    """Result records of `docs`, in the order the engine finishes them (several train at once).

    Documents are retrieved as the engine asks for them, so retrieval overlaps training.
    """
    items = (_retrieve_document(run, engine, retriever, doc, k) for doc in docs)
    for facts, outcome in engine.evaluate_stream(items):
        yield _document_record(facts, outcome, spec_hash, rank)


def _retrieve_document(run: Any, ttt: Any, retriever: Any, doc: Document, k: int) -> tuple:
    """(facts, text, neighbor texts, distances): one document's retrieval, guarded."""
    retrieval_spec = run.spec.retrieval
    kept: list[Any] = []
    excluded: list[Any] = []
    retriever_excluded = 0
    partial, failed = False, []
    start = time.perf_counter()
    if retriever is not None and _needs_neighbors(run):
        query = ttt.query_text(doc.text)
        (result,) = retriever.search([query], k=k, with_text=True)
        # The retriever guards against the query; in split-text mode that is half the
        # document, so the whole document is checked here too.
        kept, excluded = guard_neighbors(doc.text, result.neighbors, retrieval_spec)
        retriever_excluded = int(getattr(result, "excluded", 0))
        partial, failed = bool(result.partial), sorted(result.failed_shards)
    retrieve_seconds = time.perf_counter() - start
    facts = (doc, kept, excluded, retriever_excluded, partial, failed, retrieve_seconds)
    return facts, doc.text, [n.text for n in kept], [n.distance for n in kept]


def _document_record(facts: tuple, outcome: Any, spec_hash: str, rank: int) -> dict[str, Any]:
    """One document's result record from its retrieval facts and its training outcome."""
    doc, kept, excluded, retriever_excluded, partial, failed, retrieve_seconds = facts
    return result_record(
        doc,
        outcome,
        spec_hash=spec_hash,
        rank=rank,
        neighbors=len(kept),
        excluded=len(excluded) + retriever_excluded,
        neighbor_ids=[n.id for n in kept],
        excluded_ids=[n.id for n in excluded],
        distances=[float(n.distance) for n in kept],
        partial=partial,
        failed_shards=failed,
        seconds={
            "retrieve": retrieve_seconds,
            "train": float(outcome.seconds_training),
            "score": float(outcome.seconds_scoring),
        },
    )
