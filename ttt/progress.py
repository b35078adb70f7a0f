"""Progress on long work: a bar on a terminal, periodic log lines elsewhere, both within a document."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class WorkProgress:
    """Documents done of a rank, and within the current document its neighbors and steps.

    A document can take minutes (15 on an A100 at paper scale): the bar's postfix moves with
    every neighbor trained on, with an ETA for the document and for the rank. When the
    stream is not a terminal (a pod's log), no carriage-return bar is drawn; a log line is
    written at most every `every` seconds instead.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        done: int = 0,
        *,
        enabled: bool = True,
        every: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        stream = stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.desc, self.total, self.done, self.every = desc, total, done, every
        self.to_log = enabled and not tty
        self.bar = tqdm(
            total=total, initial=done, desc=desc, unit="doc", file=stream,
            disable=not (enabled and tty),
        )  # fmt: skip
        self.started = time.monotonic()
        self.finished_here = 0
        self.doc_started = self.started
        self.doc: str | None = None
        self.last_line = float("-inf")  # the first line goes out at once

    def start_document(self, doc: str) -> None:
        self.doc, self.doc_started = doc, time.monotonic()
        self._report(f"document {doc}: training", force=False)

    def neighbor(self, n: int, of: int, steps: int) -> None:
        """Called after each neighbor trained on (TTTNN.on_neighbor)."""
        elapsed = time.monotonic() - self.doc_started
        doc_eta = elapsed / n * (of - n) if n else None
        self.bar.set_postfix_str(
            f"doc {self.doc}: neighbors {n}/{of}, steps {steps}, doc ETA {_eta(doc_eta)}",
            refresh=True,
        )
        self._report(
            f"document {self.doc}: neighbors {n}/{of}, steps {steps}, document ETA {_eta(doc_eta)}",
            force=False,
        )

    def finish_document(self) -> None:
        self.done += 1
        self.finished_here += 1
        self.bar.update(1)
        self.bar.set_postfix_str("")
        self._report(f"document {self.doc} done", force=False)

    def set_done(self, done: int) -> None:
        """Documents done as counted elsewhere (the local runner polls the store)."""
        done = min(self.total, done)
        if done != self.done:
            self.finished_here += done - self.done
            self.done = done
        self.bar.n = done
        self.bar.refresh()
        self._report("published", force=False)

    def rank_eta(self) -> float | None:
        if not self.finished_here:
            return None
        per_doc = (time.monotonic() - self.started) / self.finished_here
        return per_doc * (self.total - self.done)

    def _report(self, what: str, *, force: bool) -> None:
        now = time.monotonic()
        if not self.to_log or (not force and now - self.last_line < self.every):
            return
        self.last_line = now
        log.info(
            "%s: %d/%d documents, %s; ETA %s",
            self.desc,
            self.done,
            self.total,
            what,
            _eta(self.rank_eta()),
        )

    def close(self) -> None:
        self._report("stopped" if self.done < self.total else "finished", force=True)
        self.bar.close()
