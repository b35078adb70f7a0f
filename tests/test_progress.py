"""Progress within a document: the bar's postfix on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from ttt.progress import WorkProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_that_moves_within_a_document(caplog):
    out = Terminal()
    with caplog.at_level("INFO", logger="ttt.progress"):
        bar = WorkProgress("eval rank 0", total=3, done=1, stream=out, every=0)
        bar.start_document("test:7")
        bar.neighbor(1, 4, steps=3)
        bar.neighbor(2, 4, steps=6)
        assert "neighbors 2/4, steps 6, doc ETA" in out.getvalue()
        bar.finish_document()
        bar.close()
    assert "2/3" in out.getvalue()
    assert caplog.records == []  # a bar, not log lines


def test_without_a_terminal_log_lines_replace_the_bar(caplog):
    out = io.StringIO()  # a pod's log: no carriage returns
    with caplog.at_level(logging.INFO, logger="ttt.progress"):
        bar = WorkProgress("eval rank 1", total=2, stream=out, every=0)
        bar.start_document("test:1")
        bar.neighbor(1, 2, steps=5)
        bar.finish_document()
        bar.start_document("test:2")
        bar.neighbor(1, 2, steps=5)
        bar.close()
    assert out.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert "eval rank 1: 0/2 documents, document test:1: neighbors 1/2, steps 5" in lines[1]
    assert "1/2 documents, document test:1 done; ETA" in lines[2]
    assert lines[-1].startswith("eval rank 1: 1/2 documents, stopped; ETA")


def test_log_lines_are_periodic_not_per_step(caplog):
    with caplog.at_level(logging.INFO, logger="ttt.progress"):
        bar = WorkProgress("eval rank 2", total=1, stream=io.StringIO(), every=3600)
        bar.start_document("test:1")
        for n in range(1, 50):
            bar.neighbor(n, 50, steps=n)
        bar.close()
    assert len(caplog.records) == 2  # the first line, and the closing one


def test_a_worker_writes_its_counts_for_the_runner(tmp_path):
    from ttt.progress import read_worker_status

    path = tmp_path / "eval-0.progress.json"
    bar = WorkProgress("eval rank 0", total=3, done=1, stream=io.StringIO(), status_path=path)
    assert read_worker_status(path)["done"] == 1
    bar.start_document("test:7")
    bar.neighbor(1, 4, steps=3)
    bar.neighbor(2, 4, steps=6)
    status = read_worker_status(path)
    assert (status["doc"], status["neighbors"], status["of"], status["steps"]) == (
        "test:7",
        2,
        4,
        6,
    )
    assert status["trained"] == 2 and status["pid"] > 0
    bar.finish_document()
    bar.start_document("test:8")
    bar.neighbor(1, 4, steps=3)
    status = read_worker_status(path)
    assert (status["done"], status["neighbors"], status["trained"]) == (2, 1, 3)
    bar.close()
    assert read_worker_status(tmp_path / "absent.json") is None


def test_the_runners_line_carries_every_workers_counts_and_an_eta():
    from ttt.progress import workers_line

    line, eta = workers_line(
        {
            # 8 neighbors in 80 s: 10 s each; 2 documents of 4 to go, 1 neighbor of this one done
            "eval-0": {"done": 1, "total": 3, "doc": "a:1", "neighbors": 1, "of": 4,
                       "steps": 3, "trained": 8, "seconds": 80.0},
            # 2 s per neighbor, 1 document to go and 3 of its 4 neighbors done
            "eval-1": {"done": 2, "total": 3, "doc": "b:2", "neighbors": 3, "of": 4,
                       "steps": 9, "trained": 5, "seconds": 10.0},
        }
    )  # fmt: skip
    assert line == (
        "eval-0 1/3 docs, a:1 neighbors 1/4 steps 3; eval-1 2/3 docs, b:2 neighbors 3/4 steps 9"
    )
    assert eta == pytest.approx(70.0)  # the slowest worker's: (2 * 4 - 1) neighbors x 10 s
    line, eta = workers_line(
        {
            "eval-0": None,
            "eval-1": {
                "done": 0,
                "total": 2,
                "doc": "c:1",
                "neighbors": 0,
                "of": 4,
                "steps": 0,
                "trained": 0,
                "seconds": 1,
            },
        }
    )
    assert line.startswith("eval-0 starting; eval-1 0/2 docs") and eta is None


def test_the_runners_log_line_shows_the_workers_and_their_eta(caplog):
    with caplog.at_level(logging.INFO, logger="ttt.progress"):
        bar = WorkProgress("eval", total=4, stream=io.StringIO(), every=0)
        bar.set_done(1, "eval-0 1/2 docs, a:1 neighbors 2/4 steps 6", eta=65.0)
        bar.close()
    assert "eval: 1/4 documents, eval-0 1/2 docs, a:1 neighbors 2/4 steps 6; ETA 1:05" in (
        caplog.records[0].getMessage()
    )
