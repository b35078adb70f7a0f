"""Progress on long work: a bar on a terminal, periodic log lines elsewhere, both within a document."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)
PROGRESS_FILE_ENV = "TTT_PROGRESS_FILE"  # where an eval worker writes its counts, if set


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
        status_path: str | Path | None = None,
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
        self.eta_override: float | None = None  # set_done's ETA, from the workers' counts
        # A worker's counts for whoever supervises it (the local runner): a small JSON file
        # rewritten whole (a rename) at each neighbor and document.
        self.status_path = Path(status_path) if status_path else None
        self.neighbors, self.of, self.steps, self.trained = 0, 0, 0, 0
        self._write_status()

    def start_document(self, doc: str) -> None:
        self.doc, self.doc_started = doc, time.monotonic()
        self.neighbors, self.steps = 0, 0
        self._write_status()
        self._report(f"document {doc}: training", force=False)

    def neighbor(self, n: int, of: int, steps: int) -> None:
        """Called after each neighbor trained on (TTTNN.on_neighbor)."""
        elapsed = time.monotonic() - self.doc_started
        doc_eta = elapsed / n * (of - n) if n else None
        self.trained += max(0, n - self.neighbors)
        self.neighbors, self.of, self.steps = n, of, steps
        self._write_status()
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
        self.neighbors, self.steps = 0, 0
        self._write_status()
        self._report(f"document {self.doc} done", force=False)

    def set_done(self, done: int, detail: str = "", eta: float | None = None) -> None:
        """Documents done as counted elsewhere (the local runner polls the store), with the
        workers' counts (`detail`) and an ETA computed from them, when the caller has them."""
        done = min(self.total, done)
        if done != self.done:
            self.finished_here += done - self.done
            self.done = done
        self.eta_override = eta
        self.bar.n = done
        if detail:
            self.bar.set_postfix_str(detail, refresh=False)
        self.bar.refresh()
        self._report(detail or "published", force=False)

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        status = {
            "pid": os.getpid(),
            "done": self.done,
            "total": self.total,
            "doc": self.doc,
            "neighbors": self.neighbors,
            "of": self.of,
            "steps": self.steps,
            "trained": self.trained,
            "seconds": round(time.monotonic() - self.started, 3),
        }
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.status_path)
        except OSError as exc:  # progress is never worth a failed evaluation
            log.debug("progress status %s not written: %s", self.status_path, exc)

    def rank_eta(self) -> float | None:
        if self.eta_override is not None:
            return self.eta_override
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


def read_worker_status(path: Path) -> dict[str, Any] | None:
    """A worker's last written counts (WorkProgress's status file), None before its first."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def workers_line(statuses: dict[str, dict[str, Any] | None]) -> tuple[str, float | None]:
    """Every worker's document, neighbor and step counts in one line, and an ETA from them.

    A worker's ETA is its neighbors still to train (its documents to go times the neighbors
    per document, less those of the current one) over its rate so far; the run's is the
    slowest worker's. None until every unfinished worker has trained on a neighbor.
    """
    parts, etas = [], []
    for name, s in statuses.items():
        if not s:
            parts.append(f"{name} starting")
            continue
        part = f"{name} {s['done']}/{s['total']} docs"
        if s.get("doc"):
            part += f", {s['doc']} neighbors {s['neighbors']}/{s['of']} steps {s['steps']}"
        parts.append(part)
        left_docs = s["total"] - s["done"]
        if left_docs <= 0:
            continue
        rate = s["trained"] / s["seconds"] if s.get("trained") and s.get("seconds") else 0.0
        per_doc = s.get("of") or 0
        if rate <= 0 or per_doc <= 0:
            etas.append(None)
            continue
        etas.append((left_docs * per_doc - s["neighbors"]) / rate)
    eta = None if not etas or None in etas else max(etas)
    return "; ".join(parts), eta
