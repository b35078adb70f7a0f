"""Documents, bad input lines and the per-domain counts of a corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ttt.errors import TTTError

UNKNOWN_DOMAIN = "unknown"
# Bad-line reasons, in the order a line is checked.
REASONS = (
    "invalid_utf8",
    "blank_line",
    "malformed_json",
    "not_an_object",
    "missing_text",
    "text_not_string",
    "empty_text",
)


class CorpusError(TTTError, ValueError):
    """A corpus input that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Document:
    """One corpus document; `id` is `<file stem>:<line>` and stable across runs."""

    id: str
    domain: str
    text: str
    nbytes: int
    source: str
    line: int


@dataclass(frozen=True)
class BadLine:
    """A skipped input line: where it is and why it was skipped."""

    source: str
    line: int
    reason: str
    detail: str
    # a JSON object with a task whose text the reference would still read (empty, or with
    # a lone surrogate): the id and task it would have, so a sample can keep its place
    doc_id: str | None = None
    domain: str | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason} ({self.detail})"


@dataclass
class CorpusStats:
    """Documents and bytes per domain, bad lines per reason with the first examples of each."""

    documents: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[BadLine]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    max_examples: int = 5

    def add_document(self, doc: Document) -> None:
        self.documents[doc.domain] = self.documents.get(doc.domain, 0) + 1
        self.bytes[doc.domain] = self.bytes.get(doc.domain, 0) + doc.nbytes

    def add_bad_line(self, bad: BadLine) -> bool:
        """Count a bad line; True while it is among the first examples of its reason."""
        self.bad_lines[bad.reason] = self.bad_lines.get(bad.reason, 0) + 1
        kept = self.examples.setdefault(bad.reason, [])
        if len(kept) < self.max_examples:
            kept.append(bad)
            return True
        return False

    @property
    def total_documents(self) -> int:
        return sum(self.documents.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_bad_lines(self) -> int:
        return sum(self.bad_lines.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "documents": self.total_documents,
            "bytes": self.total_bytes,
            "domains": {
                d: {"documents": self.documents[d], "bytes": self.bytes[d]}
                for d in sorted(self.documents)
            },
            "bad_lines": dict(sorted(self.bad_lines.items())),
            "bad_line_examples": {
                r: [{"source": b.source, "line": b.line, "detail": b.detail} for b in ex]
                for r, ex in sorted(self.examples.items())
            },
            "files": list(self.files),
        }
        if self.shards:
            out["shards"] = self.shards
        return out

    def summary(self) -> str:
        """A human-readable table: per-domain counts, then bad lines with example locations."""
        width = max([len("domain"), len("total")] + [len(d) for d in self.documents])
        rows = [f"{'domain':<{width}}  {'documents':>12}  {'bytes':>16}"]
        for d in sorted(self.documents):
            rows.append(f"{d:<{width}}  {self.documents[d]:>12,}  {self.bytes[d]:>16,}")
        rows.append(f"{'total':<{width}}  {self.total_documents:>12,}  {self.total_bytes:>16,}")
        rows.append(f"files: {len(self.files)}")
        if not self.bad_lines:
            rows.append("bad lines: 0")
            return "\n".join(rows)
        rows.append(f"bad lines: {self.total_bad_lines:,} (skipped)")
        for reason in sorted(self.bad_lines):
            where = ", ".join(f"{b.source}:{b.line}" for b in self.examples.get(reason, []))
            rows.append(f"  {reason:<16} {self.bad_lines[reason]:>10,}  e.g. {where}")
        return "\n".join(rows)
