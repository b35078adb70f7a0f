"""MLflow experiment tracking: a run's resolved spec, bits per byte and report files, never failing a stage."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ttt.eval.records import RESULTS, parse_results, task_totals

log = logging.getLogger(__name__)

# A KFP run's id reaches the library as an argument (the components pass the pipeline's
# PIPELINE_JOB_ID placeholder), else from this variable (any other orchestrator may set it).
KFP_RUN_ID_ENV = "KFP_RUN_ID"
KEY_TAG = "ttt.key"  # what finds a run again: <name>/<eval hash>/<KFP run id or "local">[/rank-N]
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a rank's run under it
PARAM_MAX = 6000  # MLflow's longest param value; the whole spec is also the spec.yaml artifact
BATCH = {"params": 100, "metrics": 1000}  # MLflow's limits per log_batch call
BACKOFF_FACTOR = 1  # seconds of urllib3 backoff: MLflow's default of 2 with 7 retries waits minutes


def kfp_run_id(given: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The KFP run this process belongs to (given, else $KFP_RUN_ID), cleaned for tags."""
    env = os.environ if environ is None else environ
    value = (given or env.get(KFP_RUN_ID_ENV, "")).strip()
    # a placeholder KFP did not resolve (a component run by hand) is no run id
    value = "" if value.startswith("{{") else value
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:64] or None


def spec_params(run: Any) -> dict[str, str]:
    """The resolved spec as flat params (`spec.ttt.learningRate` -> "2e-05"); lists as JSON.

    The tracking section stays out: its URI may carry credentials, and it is no setting of
    the run."""
    doc = run.model_dump(mode="json", by_alias=True)
    doc.get("spec", {}).pop("tracking", None)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:PARAM_MAX]

    walk("", doc)
    return out


def rank_metrics(records: Sequence[dict[str, Any]], checkpoints: Sequence[int]) -> list[tuple]:
    """(key, value, step) of a rank's records: bits per byte per task at each checkpoint
    (step = neighbors trained on, the evalAfter entry), plain sums over the rank's documents."""
    # ttt.report's package imports the report stage, which imports this module
    from ttt.report.headline import metric_name

    out: list[tuple] = [("documents", float(len(records)), 0)]
    for n in checkpoints:
        for task, totals in task_totals(records, n).items():
            out.append((f"bpb.{metric_name(task)}", totals.bits_per_byte, n))
    return out


def report_metrics(summary: dict[str, Any]) -> list[tuple]:
    """(key, value, step) of a report: the headline figures (step 0) and the curves per task,
    for the Pile-weighted mean and for the reference's aggregation (step = neighbors)."""
    from ttt.report.headline import headline_figures, metric_name

    out: list[tuple] = [(k, v, 0) for k, v in headline_figures(summary).items()]
    for n in summary["checkpoints"]:
        for task, v in summary["tasks"].items():
            out.append((f"bpb.{metric_name(task)}", v["checkpoints"][str(n)]["bits_per_byte"], n))
        out.append(("bpb.pile_mean", summary["mean"]["bits_per_byte"][str(n)], n))
        reference = summary.get("reference_aggregation", {}).get("mean", {})
        if str(n) in reference.get("bits_per_byte", {}):
            out.append(("bpb_reference.pile_mean", reference["bits_per_byte"][str(n)], n))
    return out


class Tracker:
    """One process's MLflow logging for one TTT run: a parent run, one nested run per rank.

    Every call is guarded: a tracking server that is down or refuses, or mlflow not installed,
    is one logged warning and turns tracking off in this process, so a stage never fails for
    its tracker and waits at most one request's timeout and retries for it.
    """

    def __init__(self, run: Any, kfp_id: str | None = None, environ: dict | None = None) -> None:
        self.run = run
        self.config = run.spec.tracking.mlflow
        self.enabled = self.config is not None
        self.kfp_id = kfp_run_id(kfp_id, environ)
        self.key = f"{run.name}/{run.stage_hash('eval')}/{self.kfp_id or 'local'}"
        default = f"{run.name}-{run.stage_hash('eval')[:8]}"
        if self.kfp_id:
            default += f"-kfp-{self.kfp_id[:8]}"
        self.name = (self.config.run_name if self.config else None) or default
        self._client: Any = None
        self._experiment: str | None = None
        self._parent: str | None = None

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _limits(self) -> Iterator[None]:
        """The spec's timeout and retries for MLflow's HTTP calls (a variable the user set
        wins), and no run URLs printed to stdout (`--json` outputs stay JSON)."""
        wanted = {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.config.timeout_seconds),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.config.retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(BACKOFF_FACTOR),
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        }
        added = {k: v for k, v in wanted.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None with one warning (and tracking off here) when MLflow fails."""
        if not self.enabled:
            return None
        try:
            with self._limits():
                return fn()
        except Exception as exc:  # noqa: BLE001 - any tracker failure is only a warning
            self.enabled = False
            hint = " (pip install 'ttt-nn[mlflow]')" if isinstance(exc, ImportError) else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "MLflow tracking off for this process: %s at %s failed: %s%s; the run goes on",
                what, self.config.tracking_uri, first[:300], hint,
            )  # fmt: skip
            return None

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.config.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment is None:
            client, name = self.client(), self.config.experiment
            found = client.get_experiment_by_name(name)
            if found is None:
                try:
                    self._experiment = client.create_experiment(name)
                except Exception:  # another pod created it meanwhile
                    found = client.get_experiment_by_name(name)
                    if found is None:
                        raise
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise RuntimeError(
                        f"experiment {name!r} is deleted: restore it or name another"
                    )
                self._experiment = found.experiment_id
        return self._experiment

    def _find(self, key: str) -> list[Any]:
        from mlflow.entities import ViewType

        return self.client().search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{KEY_TAG}` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=100,
        )

    def _tags(self, role: str, key: str) -> dict[str, str]:
        tags = {
            **self.config.tags,
            KEY_TAG: key,
            "ttt.role": role,
            "ttt.run": self.run.name,
            "ttt.spec_hash": self.run.stage_hash("eval"),
            "mlflow.source.name": "ttt",
        }
        if self.kfp_id:
            tags["kfp.run_id"] = self.kfp_id
        if os.environ.get("HOSTNAME"):
            tags["ttt.host"] = os.environ["HOSTNAME"]  # a pod's name
        return tags

    def _log_params(self, run_id: str) -> None:
        """The spec's params the run lacks; a changed operational field keeps its first value
        (MLflow params are immutable) and the resumed run says so in a tag."""
        from mlflow.entities import Param

        client = self.client()
        have = client.get_run(run_id).data.params
        params = spec_params(self.run)
        new = [Param(k, v) for k, v in params.items() if k not in have]
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        for i in range(0, len(new), BATCH["params"]):
            client.log_batch(run_id, params=new[i : i + BATCH["params"]])
        if changed:
            client.set_tag(run_id, "ttt.params_changed_on_resume", ",".join(changed)[:PARAM_MAX])

    def _log_metrics(self, run_id: str, rows: list[tuple]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(step))
            for k, v, step in rows
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        for i in range(0, len(metrics), BATCH["metrics"]):
            self.client().log_batch(run_id, metrics=metrics[i : i + BATCH["metrics"]])

    # -- the parent run ------------------------------------------------------------------

    def parent_id(self) -> str:
        """The parent run of this TTT run (and KFP run), created by whoever needs it first.

        Ranks of a KFP run start at once and may each create one: every process settles on
        the lowest run id among them and deletes the others (empty but for the spec), so
        all meet under one parent; a rank re-settles when it finishes."""
        if self._parent is None:
            client = self.client()
            runs, created = self._find(self.key), False
            if not runs:
                made = client.create_run(
                    self.experiment_id(), run_name=self.name, tags=self._tags("run", self.key)
                )
                runs, created = self._find(self.key) or [made], True
            winner = min(runs, key=lambda r: r.info.run_id)
            for other in runs:
                if other.info.run_id != winner.info.run_id:
                    try:  # another rank may have deleted it already
                        client.delete_run(other.info.run_id)
                    except Exception as exc:  # noqa: BLE001 - its deletion is not ours to need
                        log.debug("MLflow: run %s not deleted: %s", other.info.run_id, exc)
            self._parent = winner.info.run_id
            if created:  # logged to the winner only: nobody deletes the lowest id
                client.log_text(self._parent, self.run.to_yaml(), "spec.yaml")
            self._log_params(self._parent)
            log.info("MLflow: run %s (%s) in experiment %r at %s", self.name, self._parent,
                     self.config.experiment, self.config.tracking_uri)  # fmt: skip
        return self._parent

    def start(self) -> None:
        """`ttt run`: the parent exists, RUNNING, before any worker starts (no race)."""
        self.guard(
            "starting the run", lambda: self.client().update_run(self.parent_id(), "RUNNING")
        )

    def end(self, status: str) -> None:
        """The parent's end: FINISHED (the report has logged) or FAILED."""
        self.guard(f"ending the run ({status})",
                   lambda: self.client().set_terminated(self.parent_id(), status))  # fmt: skip

    # -- a rank's run ----------------------------------------------------------------------

    def start_rank(self, rank: int, world_size: int) -> str | None:
        """Rank `rank`'s run nested under the parent, RUNNING (a resumed rank reuses its run)."""

        def start() -> str:
            client, parent = self.client(), self.parent_id()
            key = f"{self.key}/rank-{rank:05d}"
            runs = self._find(key)
            if runs:
                run_id = min(runs, key=lambda r: r.info.run_id).info.run_id
                client.update_run(run_id, "RUNNING")
                client.set_tag(run_id, PARENT_TAG, parent)
            else:
                tags = {**self._tags("rank", key), PARENT_TAG: parent, "ttt.rank": str(rank),
                        "ttt.world_size": str(world_size)}  # fmt: skip
                name = f"{self.name}-rank-{rank:05d}"
                run_id = client.create_run(self.experiment_id(), run_name=name, tags=tags)
                run_id = run_id.info.run_id
            self._log_params(run_id)
            return run_id

        return self.guard(f"starting rank {rank}'s run", start)

    def finish_rank(self, run_id: str | None, store: Any, prefix: str, manifest: dict) -> None:
        """The rank's published records as metrics; the rank's run FINISHED under the parent
        every rank settled on."""
        if run_id is None:
            return

        def finish() -> None:
            key = f"{prefix}/{RESULTS}"
            records = parse_results(store.get_bytes(key), key)
            rows = rank_metrics(records, sorted(self.run.spec.ttt.eval_after) or [0])
            rows += [(k, manifest[k], 0) for k in ("neighbors_excluded", "partial_retrievals")
                     if isinstance(manifest.get(k), (int, float))]  # fmt: skip
            self._log_metrics(run_id, rows)
            self._parent = None  # settle again: a racing rank may have made another parent
            self.client().set_tag(run_id, PARENT_TAG, self.parent_id())
            self.client().set_terminated(run_id, "FINISHED")

        self.guard("logging the rank's figures", finish)

    def fail_rank(self, run_id: str | None) -> None:
        if run_id is not None:
            self.guard("marking the rank failed",
                       lambda: self.client().set_terminated(run_id, "FAILED"))  # fmt: skip

    # -- the report ------------------------------------------------------------------------

    def log_report(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        """The report's figures as the parent's metrics and its files as artifacts under
        report/; a complete report ends the parent FINISHED."""

        def report() -> None:
            client, parent = self.client(), self.parent_id()
            self._log_metrics(parent, report_metrics(summary))
            for path in files.values():
                client.log_artifact(parent, str(path), "report")
            complete = bool(summary.get("complete", True))
            client.set_tag(parent, "ttt.report_complete", str(complete).lower())
            if complete:
                client.set_terminated(parent, "FINISHED")

        self.guard("logging the report", report)


def tracker(run: Any, kfp_id: str | None = None) -> Tracker | None:
    """A Tracker when the spec configures MLflow, else None (mlflow is never imported)."""
    return Tracker(run, kfp_id) if run.spec.tracking.mlflow is not None else None


@contextmanager
def tracked_rank(
    run: Any, store: Any, rank: int, world_size: int, prefix: str, kfp_id: str | None = None
) -> Iterator[dict]:
    """Around one rank's evaluation: its MLflow run started, then FINISHED with its figures
    (the caller puts the manifest in the yielded dict) or FAILED."""
    outcome: dict[str, Any] = {}
    t = tracker(run, kfp_id)
    run_id = t.start_rank(rank, world_size) if t else None
    try:
        yield outcome
    except BaseException:
        if t:
            t.fail_rank(run_id)
        raise
    if t and "manifest" in outcome:
        t.finish_rank(run_id, store, prefix, outcome["manifest"])


@contextmanager
def tracked_run(run: Any, kfp_id: str | None = None) -> Iterator[None]:
    """Around `ttt run`: the parent run started RUNNING before any worker (so none races to
    make it); FAILED if the run fails. The report ends it FINISHED."""
    t = tracker(run, kfp_id)
    if t:
        t.start()
    try:
        yield
    except BaseException:
        if t:
            t.end("FAILED")
        raise
