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
from ttt.errors import TTTError
from ttt.index.retrieval import euclidean
from ttt.progress import WorkProgress
from ttt.results import (
    ATTEMPTS,
    RESULTS,
    attempt_id,
    checkpoint_score,
    load_existing,
    publish_rank,
    result_record,
    task_totals,
    write_records,
)
from ttt.train import TTTNN, select_neighbors

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


def guard_neighbors(text: str, neighbors: Sequence[Any], retrieval: Any) -> tuple[list, list]:
    """(kept, excluded) neighbors, nearest first: the distance threshold, then the leakage guard.

    The rule is train.select_neighbors' (one definition); it is applied neighbor by neighbor
    here so that the record can name which neighbors were used and which were excluded.
    Neighbors carry FAISS's squared L2; the rule compares Euclidean distances.
    """
    kept, excluded = [], []
    for n in sorted(neighbors, key=lambda n: n.distance):
        verdict = select_neighbors(
            text,
            [n.text or ""],
            [euclidean(n.distance)],
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
    from ttt.lm import load_lm

    t = run.spec.ttt
    return load_lm(t.model, dtype=t.dtype, device=t.device)


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
        if _needs_neighbors(run) and retriever is None:
            retriever = _default_retriever(run, store, local_index)
        model, tokenizer = lm or _default_lm(run)
        ttt = TTTNN(model, tokenizer, run.spec.ttt, rank=str(rank))
        k = run.spec.retrieval.neighbors
        last_flush = time.monotonic()
        bar = WorkProgress(
            f"eval rank {rank}", len(mine), len(done), enabled=progress, every=progress_seconds
        )
        ttt.on_neighbor = bar.neighbor
        try:
            with local.open("a", encoding="utf-8") as out:
                task = None
                for i, doc in enumerate(todo):
                    bar.start_document(doc.id)
                    if doc.domain != task:  # a carried optimizer state stays within a task
                        ttt.new_task()
                        task = doc.domain
                    record = _evaluate_document(run, ttt, retriever, doc, k, spec_hash, rank)
                    bar.finish_document()
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


def _retrieve(
    retriever: Any, query: str, k: int, rank: int, wait_seconds: float, vectors: bool = False
) -> Any:
    """The query's retrieval, waiting (bounded, with backoff) while too few shards answer.

    A shard not yet ready or restarting must not turn into a document scored on fewer
    neighbors: the worker waits, says so in its log and in ttt_eval_waiting_for_shards /
    ttt_eval_retrieval_waits_total, and fails after `wait_seconds` (its Job retries it).
    """
    from ttt.index.retrieval import ShardsUnavailable

    start, pause = time.monotonic(), 1.0
    label = str(rank)
    try:
        while True:
            try:
                extra = {"with_vectors": True} if vectors else {}  # SIFT's candidates
                (result,) = retriever.search([query], k=k, with_text=True, **extra)
                return result
            except ShardsUnavailable as exc:
                waited = time.monotonic() - start
                if waited >= wait_seconds:
                    raise EvalError(
                        f"eval rank {rank}: shards {exc.failed} did not answer for "
                        f"{waited:.0f} s (spec.retrieval.waitSeconds): {exc}"
                    ) from exc
                telemetry.EVAL_RETRIEVAL_WAITS.labels(label).inc()
                telemetry.EVAL_WAITING.labels(label).set(1)
                sleep = min(pause, wait_seconds - waited)
                log.warning(
                    "eval rank %d: waiting %.1f s for shard(s) %s (waited %.0f of %.0f s): %s",
                    rank,
                    sleep,
                    exc.failed,
                    waited,
                    wait_seconds,
                    exc,
                )
                time.sleep(sleep)
                pause = min(2 * pause, 30.0)
    finally:
        telemetry.EVAL_WAITING.labels(label).set(0)


def _evaluate_document(
    run: Any, ttt: Any, retriever: Any, doc: Document, k: int, spec_hash: str, rank: int
) -> dict[str, Any]:
    """Retrieve, guard, train and score one test document; its result record."""
    retrieval_spec = run.spec.retrieval
    kept: list[Any] = []
    excluded: list[Any] = []
    retriever_excluded = 0
    partial, failed = False, []
    start = time.perf_counter()
    sift = retrieval_spec.selection == "sift"
    selected: dict[str, Any] = {}
    if retriever is not None and _needs_neighbors(run):
        query = ttt.query_text(doc.text)
        # SIFT: K' candidates with their vectors; it picks k of them below
        want = retrieval_spec.candidate_count if sift else k
        result = _retrieve(retriever, query, want, rank, retrieval_spec.wait_seconds, sift)
        # The retriever guards against the query; in split-text mode that is half the
        # document, so the whole document is checked here too.
        kept, excluded = guard_neighbors(doc.text, result.neighbors, retrieval_spec)
        retriever_excluded = int(getattr(result, "excluded", 0))
        partial, failed = bool(result.partial), sorted(result.failed_shards)
        if sift:
            kept, selected = _sift(kept, result.query_vector, k, retrieval_spec)
    retrieve_seconds = time.perf_counter() - start - selected.get("seconds", 0.0)
    distances = [euclidean(n.distance) for n in kept]  # the record's and in-context's unit
    # SIFT's picks train in pick order (its most informative first), so the loop is not
    # given distances to re-order by; the threshold was applied to the candidates already.
    outcome = ttt.evaluate(doc.text, [n.text for n in kept], distances=None if sift else distances)
    return result_record(
        doc,
        outcome,
        spec_hash=spec_hash,
        rank=rank,
        neighbors=len(kept),
        excluded=len(excluded) + retriever_excluded,
        neighbor_ids=[n.id for n in kept],
        excluded_ids=[n.id for n in excluded],
        distances=distances,
        distance_unit="euclidean",
        partial=partial,
        failed_shards=failed,
        seconds={
            "retrieve": retrieve_seconds,
            "train": float(outcome.seconds_training),
            "score": float(outcome.seconds_scoring),
            **({"select": selected["seconds"]} if sift else {}),
        },
        **({"selection": "sift", **selected["facts"]} if sift else {}),
    )


def _sift(candidates: list, query_vector: Any, k: int, retrieval: Any) -> tuple[list, dict]:
    """SIFT's k picks among the guarded candidates, and what the record says about them."""
    from ttt.index.selection import choose_neighbors

    start = time.perf_counter()
    picked, selection = choose_neighbors(candidates, query_vector, k, "sift", retrieval.sift_lambda)
    seconds = time.perf_counter() - start
    facts = {
        "candidates": len(candidates),
        # each neighbor's rank by distance among the candidates (0 = nearest): what SIFT
        # chose that nearest neighbors would not have
        "neighbor_ranks": selection.indices,
        "sift_variances": selection.variances,
    }
    return picked, {"seconds": seconds, "facts": facts}
