"""Progress within a document: the bar's postfix on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging

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
