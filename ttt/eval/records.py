"""The per-document results file of an evaluation rank: its records, and reading them back.

One JSON object per line and per test document (see `result_record`); a worker appends a
line when a document is finished, so a crash can leave at most a torn last line, which
readers drop. The same document twice (a rank restarted, or two ranks) counts once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ttt.bpb import DocScore, TaskTotals
from ttt.errors import TTTError
from ttt.store import fsync_dir

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
# While a rank works, each attempt (a pod, a restarted process) writes only its own file
# under rank-NNNNN/attempts/, so two attempts alive at once (an Indexed Job may briefly run
# both) never overwrite each other; the finished rank's results.jsonl is their merge.
ATTEMPTS = "attempts"
# Every record carries these; a line without them is not a finished document.
RECORD_KEYS = ("doc", "task", "bytes", "words", "tokens", "loglik", "spec_hash")


class ResultsError(TTTError, RuntimeError):
    """A results file that cannot be read; the message names the file and line."""


def result_record(doc: Any, outcome: Any, **fields: Any) -> dict[str, Any]:
    """One document's line of results.jsonl, from TTTNN's DocOutcome and the retrieval facts."""
    if not outcome.checkpoints:
        raise ResultsError(f"document {doc.id}: the evaluation gave no checkpoint")
    first = outcome.checkpoints[0]
    record = {
        "doc": doc.id,
        "task": doc.domain,
        # in split-text mode these are the scored half's, the same at every checkpoint
        "bytes": int(first.bytes),
        "words": int(first.words),
        "tokens": int(first.tokens),
        "loglik": {str(cp.after): float(cp.loglik) for cp in outcome.checkpoints},
        "checkpoint_neighbors": {str(cp.after): int(cp.neighbors) for cp in outcome.checkpoints},
        "train_steps": int(outcome.train_steps),
        "train_tokens": int(outcome.train_tokens),
        # the paper's cost and loss curves: one scoring pass's seconds, loss per neighbor
        "score_passes": int(outcome.score_passes),
        "train_losses": [float(v) for v in outcome.train_losses],
        **fields,
    }
    if outcome.mixtures:  # interpolation: loglik at every mixing weight, per checkpoint
        record["mix_loglik"] = {k: [float(v) for v in m] for k, m in outcome.mixtures.items()}
    if outcome.fits_window is not None:  # in-context: whether the text got its context
        record["fits_window"] = bool(outcome.fits_window)
    return record


def parse_results(data: bytes, source: str) -> list[dict[str, Any]]:
    """The records of a results.jsonl, in file order; a torn last line (a crash) is dropped.

    A bad line anywhere else is corruption, not a crash, and raises naming the line.
    """
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: the write may have been cut
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
                raise ValueError("not a complete result record")
        except ValueError as exc:
            if last:
                log.warning("%s:%d: dropped a torn last line (%d bytes)", source, number, len(raw))
                continue
            raise ResultsError(f"{source}:{number}: corrupt result record: {exc}") from None
        records.append(record)
    return records


def checkpoint_score(record: dict[str, Any], n: int) -> DocScore:
    """A document's score after n neighbors.

    A document with fewer neighbors than n stopped training at its last one, so its score at
    n is the one at its largest recorded checkpoint <= n.
    """
    loglik = record["loglik"]
    reached = [int(c) for c in loglik if int(c) <= n]
    if not reached:
        raise ResultsError(f"document {record['doc']}: no checkpoint <= {n} in {sorted(loglik)}")
    return DocScore(
        loglik=float(loglik[str(max(reached))]),
        tokens=int(record["tokens"]),
        bytes=int(record["bytes"]),
        words=int(record["words"]),
    )


def merge_records(
    groups: Sequence[Sequence[dict[str, Any]]], spec_hash: str | None = None
) -> list[dict[str, Any]]:
    """Records deduplicated by document id (first wins), optionally of one spec only."""
    seen: dict[str, dict[str, Any]] = {}
    for records in groups:
        for record in records:
            if spec_hash is not None and record.get("spec_hash") != spec_hash:
                continue
            seen.setdefault(record["doc"], record)
    return list(seen.values())


def attempt_id() -> str:
    """A name for this attempt of a rank: host (the pod), process and a random part."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def rank_keys(store: Any, prefix: str) -> list[str]:
    """The keys holding a rank's records: its results file and every attempt's file."""
    attempts = f"{prefix}/{ATTEMPTS}/"
    return [
        k
        for k in store.list(f"{prefix}/")
        if k == f"{prefix}/{RESULTS}" or (k.startswith(attempts) and k.endswith(".jsonl"))
    ]


def rank_results(store: Any, prefix: str) -> list[dict[str, Any]]:
    """Every record the store holds for a rank (results and attempts), each document once."""
    return merge_records([parse_results(store.get_bytes(k), k) for k in rank_keys(store, prefix)])


def load_existing(store: Any, key: str, local: Path, spec_hash: str) -> list[dict[str, Any]]:
    """What earlier attempts of a rank finished: the store's copies and any local file, merged.

    `key` is the rank's results.jsonl; the attempts' files beside it count too. A local file
    survives a process restart in the same pod and may be ahead of the store. It is trusted
    only while the store holds some results for the rank (a worker uploads its attempt's file
    as it starts): without any, the results were deleted from the store, and the local copy
    belongs to an evaluation the user threw away.
    """
    groups = []
    keys = rank_keys(store, key.rsplit("/", 1)[0])
    in_store = bool(keys)
    if local.exists():
        records = parse_results(local.read_bytes(), str(local))
        if in_store:
            groups.append(records)
        elif records:
            log.warning(
                "%s: no results in the store (deleted?): discarding %d record(s) of the "
                "local copy %s and evaluating from scratch",
                key,
                len(records),
                local,
            )
    groups += [parse_results(store.get_bytes(k), k) for k in keys]
    records = merge_records(groups)
    stale = [r for r in records if r["spec_hash"] != spec_hash]
    if stale:
        log.warning("%s: ignoring %d record(s) of another spec", key, len(stale))
    return [r for r in records if r["spec_hash"] == spec_hash]


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace `path` with exactly these records (by rename: never half-written)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the file
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_rank(store: Any, prefix: str, local: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """Publish results.jsonl and the manifest, and check they match as read back.

    Two attempts finishing at once may interleave their results and manifests; each holds
    every document of the rank, so either pair is right, but a mixed pair is not: publish
    again until the store's pair matches (the report refuses a mismatch too). Then the
    attempts' files the results now cover are removed.
    """
    key = f"{prefix}/{RESULTS}"
    for _ in range(5):
        manifest = store.publish(prefix, {RESULTS: local}, facts)
        stored = store.read_manifest(prefix)
        try:
            data = store.get_bytes(key)
        except TTTError:
            continue
        recorded = ((stored or {}).get("files") or {}).get(RESULTS, {}).get("sha256")
        if recorded == hashlib.sha256(data).hexdigest():
            break
        log.warning("%s: another attempt published at the same time; publishing again", prefix)
    else:
        raise ResultsError(f"{prefix}: results and manifest kept disagreeing after 5 publishes")
    published = {r["doc"] for r in parse_results(data, key)}
    for other in rank_keys(store, prefix):
        if other == key:
            continue
        with contextlib.suppress(TTTError):  # gone meanwhile, or being rewritten
            if {r["doc"] for r in parse_results(store.get_bytes(other), other)} <= published:
                store.delete(other)
    return manifest


def task_totals(records: Sequence[dict[str, Any]], n: int) -> dict[str, TaskTotals]:
    """Per task, the sums over its documents at checkpoint n."""
    totals: dict[str, TaskTotals] = {}
    for r in records:
        totals.setdefault(r["task"], TaskTotals()).add(checkpoint_score(r, n))
    return totals


class RankRecords:
    """One attempt at a rank's records: resumed from earlier attempts, appended to a local
    file as documents finish, uploaded to this attempt's own key at most every
    `flush_seconds`, and published with the rank's manifest at the end.

    An attempt writes only its own file (see ATTEMPTS), so another attempt on the same rank
    (a replaced pod) can never overwrite it.
    """

    def __init__(self, store: Any, prefix: str, local: Path, spec_hash: str) -> None:
        self.store, self.prefix, self.local, self.spec_hash = store, prefix, local, spec_hash
        self.key = f"{prefix}/{RESULTS}"
        self.attempt = attempt_id()
        self.attempt_key = f"{prefix}/{ATTEMPTS}/{self.attempt}.jsonl"
        self.records: list[dict[str, Any]] = []
        # called with the records just before a due upload of them (a carried optimizer's
        # state is saved there); returns a mark, passed to after_upload once they are up
        self.before_upload: Callable[[list[dict[str, Any]]], Any] | None = None
        self.after_upload: Callable[[Any], None] | None = None

    def keep(self, docs: set[str]) -> None:
        """Only the records of `docs` (the others are evaluated again), here and uploaded."""
        self.records = [r for r in self.records if r["doc"] in docs]
        write_records(self.local, self.records)
        self.upload()

    def resume(self, wanted: set[str], allow_partial: bool) -> list[dict[str, Any]]:
        """The records of `wanted` documents that earlier attempts finished, kept.

        A partial record (a shard did not answer) is kept only where the spec allows partial
        retrieval; otherwise its document is evaluated again. The local file is rewritten
        clean (a torn last line must not precede new records) and uploaded at once: that
        marks the evaluation as the one the local copy belongs to (see load_existing), so a
        crash before the first flush loses nothing.
        """
        records = load_existing(self.store, self.key, self.local, self.spec_hash)
        records = [r for r in records if r["doc"] in wanted]
        if not allow_partial:
            partial = [r["doc"] for r in records if r.get("partial")]
            if partial:
                log.warning(
                    "%s: %d partial record(s) (a shard did not answer) evaluated again; "
                    "spec.retrieval.allowPartial is false",
                    self.prefix,
                    len(partial),
                )
                records = [r for r in records if not r.get("partial")]
        write_records(self.local, records)
        self.upload()
        self.records = records
        return records

    def upload(self) -> None:
        self.store.put_file(self.local, self.attempt_key)

    @contextlib.contextmanager
    def appending(self, flush_seconds: float) -> Iterator[Callable[[dict[str, Any]], None]]:
        """An `append(record)` that writes each record as it comes and uploads now and then;
        on leaving (an error or a drain too: SIGTERM -> KeyboardInterrupt) what was finished
        is uploaded."""
        last_flush = time.monotonic()
        try:
            with self.local.open("a", encoding="utf-8") as out:

                def append(record: dict[str, Any]) -> None:
                    nonlocal last_flush
                    out.write(json.dumps(record, sort_keys=True) + "\n")
                    out.flush()
                    self.records.append(record)
                    if time.monotonic() - last_flush >= flush_seconds:
                        mark = self.before_upload(self.records) if self.before_upload else None
                        self.upload()
                        if self.after_upload is not None:
                            self.after_upload(mark)
                        last_flush = time.monotonic()

                yield append
        finally:
            self.upload()

    def publish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """results.jsonl and the manifest (with `facts`, this attempt's name and the count)."""
        write_records(self.local, self.records)
        facts = {**facts, "count": len(self.records), "attempt": self.attempt}
        return publish_rank(self.store, self.prefix, self.local, facts)
