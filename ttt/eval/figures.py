"""A rank's Prometheus figures (bits per byte, documents, exclusions), kept as running sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttt import telemetry
from ttt.bpb import TaskTotals
from ttt.eval.records import checkpoint_score, task_totals


class RankFigures:
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
