"""The local runner's eval workers: one that dies is reported at once and restarted, resuming."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ttt import runner
from ttt.runner import LocalCluster, RunError, _Child
from ttt.spec import loads_spec

# A worker in miniature, a real process: it does `total` documents of 0.2 s each and counts
# them in a file, so a restarted one resumes where its predecessor was killed; with
# "fail" it exits 3 at once, every time (a worker that cannot start).
WORKER = """
import sys, time
from pathlib import Path
path, total, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if mode == "fail":
    print("cannot start", flush=True)
    sys.exit(3)
done = int(path.read_text()) if path.exists() else 0
print(f"resuming at {done}", flush=True)
while done < total:
    time.sleep(0.2)
    done += 1
    path.write_text(str(done))
"""


class ScriptedCluster(LocalCluster):
    """The runner's supervision as is, with WORKER in place of `python -m ttt eval`."""

    modes: dict[int, str]
    total = 15

    def _start_worker(self, rank: int, world_size: int, threads: int, restart: int = 0) -> _Child:
        name = f"eval-{rank}" + (f".{restart}" if restart else "")
        log_path = self.workdir / f"{name}.log"
        count = self.workdir / f"rank-{rank}.count"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(count), str(self.total), self.modes[rank]],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        child = _Child(name, proc, log_path)
        self.children.append(child)
        return child


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ScriptedCluster:
    monkeypatch.setattr(runner, "PROGRESS_POLL_S", 0.2)
    run = loads_spec(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: w}\n", environ={}
    )
    c = ScriptedCluster(run, tmp_path / "spec.yaml", tmp_path)
    c.modes = {0: "work", 1: "work"}
    yield c
    c.stop()


def test_a_killed_worker_is_reported_at_once_and_restarted_resuming(cluster, caplog):
    count = cluster.workdir / "rank-1.count"
    errors: list[BaseException] = []

    def supervise() -> None:
        try:
            cluster.run_workers(2)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="ttt.runner"):
        thread = threading.Thread(target=supervise)
        thread.start()
        deadline = time.monotonic() + 30
        while not (count.exists() and count.read_text() == "3"):
            assert time.monotonic() < deadline, "the worker never got going"
            time.sleep(0.02)
        os.kill(cluster.workers[1].proc.pid, signal.SIGKILL)  # as the OOM killer does
        killed = time.monotonic()
        while not any("eval-1 exited" in r.getMessage() for r in caplog.records):
            assert time.monotonic() - killed < 5, "the dead worker was not reported"
            time.sleep(0.02)
        # at once: worker 0 is still at work (it has seconds of documents left)
        assert cluster.workers[0].proc.poll() is None
        thread.join(60)
    assert not thread.is_alive() and errors == []
    message = next(r.getMessage() for r in caplog.records if "eval-1 exited" in r.getMessage())
    assert "code -9 (killed: out of memory?)" in message and "restart 1 of at most 3" in message
    assert "eval-1.log" in message
    # the replacement resumed where the killed one stopped, and finished the rank
    assert cluster.workers[1].name == "eval-1.1"
    resumed = (cluster.workdir / "eval-1.1.log").read_text()
    assert resumed.startswith("resuming at ") and resumed != "resuming at 0\n"
    assert count.read_text() == "15" and (cluster.workdir / "rank-0.count").read_text() == "15"


def test_a_worker_that_keeps_failing_is_restarted_three_times_then_the_run_fails(cluster, caplog):
    cluster.modes[1] = "fail"
    cluster.total = 3
    with caplog.at_level(logging.WARNING, logger="ttt.runner"), pytest.raises(RunError) as err:
        cluster.run_workers(2)
    assert "1 evaluation worker(s) failed; eval-1.3 exited with code 3" in str(err.value)
    assert "cannot start" in str(err.value)  # the log's tail
    restarts = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(";")[0] for m in restarts] == [
        "eval-1 exited with code 3",
        "eval-1.1 exited with code 3",
        "eval-1.2 exited with code 3",
    ]
    assert any("not starting it again" in r.getMessage() for r in caplog.records)
    assert (cluster.workdir / "rank-0.count").read_text() == "3"  # the healthy rank finished
