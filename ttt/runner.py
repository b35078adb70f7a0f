"""The whole pipeline on one machine: corpus, embed, index, serve, evaluate, report."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ttt.errors import TTTError
from ttt.progress import PROGRESS_FILE_ENV, WorkProgress, read_worker_status, workers_line
from ttt.spec import TTTRun
from ttt.stages import is_done, publish_corpus, shard_prefix
from ttt.store import open_store
from ttt.telemetry import start_metrics_server
from ttt.tracking import tracked_run

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
PROGRESS_POLL_S = 2.0
MAX_RESTARTS = 5  # per shard server: a server that keeps dying is left dead (workers then fail)
MAX_WORKER_RESTARTS = 3  # per eval rank, as the chart's eval.backoffLimitPerIndex


class RunError(TTTError, RuntimeError):
    """A stage of the local run failed; the message names the stage and its log."""


def _die_with_parent() -> None:
    # A child that outlives `ttt run` (killed with SIGKILL, say) would hold a port and a
    # model in memory; PR_SET_PDEATHSIG makes the kernel send it SIGTERM instead.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _documents_published(run: TTTRun, store: Any, spec_hash: str) -> int:
    """Test documents whose results some worker has uploaded (each counted once)."""
    from ttt.eval.records import merge_records, parse_results

    groups = []
    for key in store.list(f"{run.prefix}/eval/"):
        if key.endswith(".jsonl"):  # results.jsonl and the attempts' files
            try:
                groups.append(parse_results(store.get_bytes(key), key))
            except TTTError:  # a worker is rewriting it: count it at the next poll
                continue
    return len(merge_records(groups, spec_hash))


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    url: str = ""


@dataclass
class LocalCluster:
    """The processes a local run starts: one shard server per shard, one worker per rank."""

    run: TTTRun
    spec_path: Path
    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    children: list[_Child] = field(default_factory=list)
    servers: list[_Child] = field(default_factory=list)
    restarts: dict[int, int] = field(default_factory=dict)
    workers: list[_Child] = field(default_factory=list)
    worker_restarts: dict[int, int] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # failed workers already logged

    def _env(self, threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra or {})
        env["TTT_AUTH_TOKEN"] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Every child's torch/FAISS would otherwise start one OpenMP thread per core: N
        # workers and S servers on the same cores oversubscribe them (a 2-core tiny run took
        # 468 s instead of 68 s). A user's own OMP_NUM_THREADS wins.
        env.setdefault("OMP_NUM_THREADS", str(threads))
        # A worker keeps a local copy of its results under the temp dir; inside this run's
        # workdir it cannot outlive the run's store (a re-run after deleting the store redoes
        # everything instead of trusting a stale copy in /tmp).
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
        return env

    def _start(
        self, name: str, args: list[str], threads: int, env: dict[str, str] | None = None
    ) -> _Child:
        log_path = self.workdir / f"{name}.log"
        out = open(log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        cmd = [sys.executable, "-m", "ttt", *args]
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self._env(threads, env),
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, no locks
        )
        out.close()
        child = _Child(name, proc, log_path)
        self.children.append(child)
        log.info("started %s (pid %d): %s; log %s", name, proc.pid, " ".join(args), log_path)
        return child

    def start_servers(self) -> list[_Child]:
        """One authenticated shard server per shard on loopback ports; each registers itself."""
        self.servers = [self._start_server(s) for s in range(self.run.spec.corpus.shards)]
        self._wait_ready(self.servers)
        return self.servers

    def revive_servers(self) -> None:
        """Start a shard server that died again, on a new port (as Kubernetes restarts a
        pod): it registers itself, the workers find it and go on, having waited for it."""
        for shard, child in enumerate(self.servers):
            if child.proc.poll() is None or self.restarts.get(shard, 0) >= MAX_RESTARTS:
                continue
            self.restarts[shard] = self.restarts.get(shard, 0) + 1
            log.warning(
                "%s exited with code %s; starting it again (restart %d of at most %d)",
                child.name,
                child.proc.returncode,
                self.restarts[shard],
                MAX_RESTARTS,
            )
            self.servers[shard] = self._start_server(shard, self.restarts[shard])

    def _start_server(self, shard: int, restart: int = 0) -> _Child:
        port = _free_port()
        child = self._start(
            f"server-{shard}" + (f".{restart}" if restart else ""),
            [
                "serve",
                "--spec",
                str(self.spec_path),
                "--shard",
                str(shard),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--threads",
                "1",
                # the server writes its registry entry itself, whatever the store
                "--register",
            ],
            threads=1,  # a k-NN query over a shard is small; the cores are the workers'
        )
        child.url = f"http://127.0.0.1:{port}"
        return child

    def _wait_ready(self, servers: list[_Child]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(servers)
        with httpx.Client(timeout=2.0) as http:
            while pending:
                for child in list(pending):
                    if child.proc.poll() is not None:
                        raise RunError(
                            f"{child.name} exited with code {child.proc.returncode} before it was "
                            f"ready; log {child.log_path}:\n{_tail(child.log_path)}"
                        )
                    try:
                        if http.get(f"{child.url}/readyz").status_code == 200:
                            pending.remove(child)
                            log.info("%s ready at %s", child.name, child.url)
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    raise RunError(f"{pending[0].name} not ready after {READY_TIMEOUT_S:.0f} s")
                if pending:
                    time.sleep(0.5)

    def run_workers(self, world_size: int, store: Any = None, progress: bool = True) -> None:
        """N evaluation workers by rank; each resumes from its own results in the store.

        A worker that exits with an error (an OOM kill) is reported at once and started
        again, resuming, up to MAX_WORKER_RESTARTS times per rank (as the eval Job's
        backoffLimitPerIndex). With `store`, a progress line follows the documents the
        workers have published and every worker's neighbor and step counts, with an ETA.
        """
        threads = max(1, (os.cpu_count() or 1) // world_size)  # a fair share of the cores
        for rank in range(world_size):  # a previous run's counts are not this one's
            self._status_path(rank).unlink(missing_ok=True)
        self.workers = [self._start_worker(r, world_size, threads) for r in range(world_size)]
        bar = None
        if store is not None:
            from ttt.eval import select_test_documents

            total = len(select_test_documents(self.run, store))
            # a bar on a terminal; in a log file, a line every 30 s instead of carriage returns
            bar = WorkProgress("eval", total, enabled=progress, every=30.0)
        try:
            while True:
                self.revive_servers()
                self.revive_workers(world_size, threads)
                if bar is not None:
                    self._show(bar, store)
                if all(w.proc.poll() is not None for w in self.workers):
                    break
                time.sleep(PROGRESS_POLL_S)
        finally:
            if bar is not None:
                bar.close()
        failed = [w for w in self.workers if w.proc.returncode != 0]
        if failed:
            child = failed[0]
            raise RunError(
                f"{len(failed)} evaluation worker(s) failed; {child.name} exited with code "
                f"{child.proc.returncode}; log {child.log_path}:\n{_tail(child.log_path)}"
            )

    def _status_path(self, rank: int) -> Path:
        return self.workdir / f"eval-{rank}.progress.json"

    def _start_worker(self, rank: int, world_size: int, threads: int, restart: int = 0) -> _Child:
        return self._start(
            f"eval-{rank}" + (f".{restart}" if restart else ""),
            ["eval", "--spec", str(self.spec_path), "--rank", str(rank)]
            + ["--world-size", str(world_size)],
            threads=threads,
            env={PROGRESS_FILE_ENV: str(self._status_path(rank))},
        )

    def revive_workers(self, world_size: int, threads: int) -> None:
        """Report a worker that exited with an error at once, and start it again (resuming
        from its results in the store) unless its rank has used up its restarts."""
        for rank, child in enumerate(self.workers):
            code = child.proc.poll()
            if code in (None, 0) or child.name in self.reported:
                continue
            self.reported.add(child.name)
            used = self.worker_restarts.get(rank, 0)
            last = _tail(child.log_path, 3)
            if used >= MAX_WORKER_RESTARTS:
                log.error(
                    "%s exited with code %s; rank %d has had %d restarts, not starting it "
                    "again; log %s:\n%s",
                    child.name, code, rank, used, child.log_path, last,
                )  # fmt: skip
                continue
            self.worker_restarts[rank] = used + 1
            log.warning(
                "%s exited with code %s%s; starting it again, resuming (restart %d of at most "
                "%d); log %s:\n%s",
                child.name, code, " (killed: out of memory?)" if code == -signal.SIGKILL else "",
                used + 1, MAX_WORKER_RESTARTS, child.log_path, last,
            )  # fmt: skip
            self.workers[rank] = self._start_worker(rank, world_size, threads, used + 1)

    def _show(self, bar: WorkProgress, store: Any) -> None:
        statuses = {}
        for rank, child in enumerate(self.workers):
            status = read_worker_status(self._status_path(rank))
            # a restarted worker's file is its predecessor's until it writes its own
            statuses[f"eval-{rank}"] = (
                status if status and status.get("pid") == child.proc.pid else None
            )
        detail, eta = workers_line(statuses)
        spec_hash = self.run.stage_hash("eval")
        bar.set_done(_documents_published(self.run, store, spec_hash), detail, eta)

    def stop(self) -> None:
        """SIGTERM every child (servers drain), then SIGKILL what is left after a grace period."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 15
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        self.children.clear()


@contextmanager
def _terminate_raises() -> Iterator[None]:
    # SIGTERM (a pod's eviction, `kill`) must unwind like Ctrl-C so that `finally` stops the
    # servers and workers this run started.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage(name: str) -> None:
    log.info("=== %s ===", name)


def run_local(run: TTTRun, *, workdir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every stage of `run` on this machine, skipping the stages already published.

    Returns the report's summary. A re-run after a crash or Ctrl-C resumes: finished shards
    and ranks are skipped, and unfinished workers skip the documents they have done.
    """
    from ttt.engine.select import refuse_early

    refuse_early(run.spec.ttt)  # what its eval workers would refuse, before any stage
    store = open_store(run.spec.storage)
    if run.spec.metrics.enabled:
        start_metrics_server(run.spec.metrics.port, run=run.name)
    work = Path(workdir or tempfile.mkdtemp(prefix=f"ttt-run-{run.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    # Children read the resolved spec, so every process sees exactly what this one saw.
    spec_path = work / "spec.yaml"
    spec_path.write_text(run.to_yaml())
    # MLflow: the parent run exists before the workers nest theirs under it (ttt.tracking)
    with tracked_run(run):
        return _run_stages(run, store, work, spec_path, progress, time.monotonic())


def _run_stages(
    run: TTTRun, store: Any, work: Path, spec_path: Path, progress: bool, started: float
) -> dict:
    from ttt.embed import embed_shard
    from ttt.eval import rank_prefix
    from ttt.index.build import build_shard_index
    from ttt.report import build_report

    shards, world = run.spec.corpus.shards, run.spec.eval.workers
    _stage(f"corpus: {shards} shard(s) into {store.describe()}")
    publish_corpus(run, store, progress=progress)
    for stage, build in (("embed", embed_shard), ("index", build_shard_index)):
        for shard in range(shards):
            _stage(f"{stage}: shard {shard + 1}/{shards}")
            build(run, store, shard)

    eval_done = all(is_done(run, store, rank_prefix(run, r), "eval") for r in range(world))
    if eval_done:
        log.info("eval: all %d rank(s) already finished, skipping", world)
    else:
        cluster = LocalCluster(run, spec_path, work)
        try:
            with _terminate_raises():
                _stage(f"serve: {shards} shard server(s)")
                cluster.start_servers()
                _stage(f"eval: {world} worker(s)")
                cluster.run_workers(world, store, progress)
        finally:
            cluster.stop()
            store.delete(f"{run.prefix}/registry/")

    _stage("report")
    summary = build_report(run, store)
    summary.setdefault("wall_seconds", round(time.monotonic() - started, 1))
    log.info("run %s finished in %.0f s; logs in %s", run.name, time.monotonic() - started, work)
    return summary


def describe_result(run: TTTRun, summary: dict, store_description: str) -> str:
    """The end of a run as a user sees it: the per-domain table and where the report is."""
    table = summary.get("table_markdown") or json.dumps(summary.get("tasks", {}), indent=2)
    return f"{table}\n\nreport: {store_description} {run.prefix}/report/\n"


__all__ = ["LocalCluster", "RunError", "describe_result", "run_local", "shard_prefix"]
