"""What report.html shows, as JSON: every test document's curve, neighbors, exclusions, waits."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)
TITLE_CHARS = 120


def first_line(text: str | None) -> str:
    """A document's title as the page shows it: its first non-blank line, cut short."""
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
    return ""


def _bpb(loglik: float, nbytes: int) -> float | None:
    value = -loglik / nbytes / math.log(2) if nbytes else float("nan")
    return value if math.isfinite(value) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def document_view(record: dict[str, Any], titles: dict[str, str]) -> dict[str, Any]:
    """One document's drill-down: its curve, and its neighbors in training order with their
    distance, title, training loss and the bits per byte after training on each."""
    nbytes = int(record["bytes"])
    trained_at = record.get("checkpoint_neighbors") or {}
    curve = sorted(
        [int(trained_at.get(k, k)), _bpb(float(v), nbytes)] for k, v in record["loglik"].items()
    )
    after_n = {n: b for n, b in curve}
    ids = record.get("neighbor_ids") or []
    distances = record.get("distances") or []
    losses = record.get("train_losses") or []
    neighbors = [
        {
            "id": nid,
            "title": titles.get(nid, ""),
            "distance": _number(distances[i]) if i < len(distances) else None,
            "loss": _number(losses[i]) if i < len(losses) else None,
            "bpb_after": after_n.get(i + 1),
        }
        for i, nid in enumerate(ids)
    ]
    before, after = curve[0][1], curve[-1][1]
    seconds = record.get("seconds") or {}
    return {
        "id": record["doc"],
        "title": titles.get(record["doc"], ""),
        "bytes": nbytes,
        "curve": curve,
        "before": before,
        "after": after,
        "gain": (after - before) if before is not None and after is not None else None,
        "neighbors": neighbors,
        "excluded": [
            {"id": e, "title": titles.get(e, "")} for e in record.get("excluded_ids") or []
        ],
        # excluded by the retriever's guard too (a copy of the test document), counted only
        "excluded_count": int(record.get("excluded", 0)),
        "partial": bool(record.get("partial")),
        "failed_shards": list(record.get("failed_shards") or []),
        "retrieve_seconds": _number(seconds.get("retrieve")),
        "train_seconds": _number(seconds.get("train")),
        "selection": record.get("selection", "nearest"),
    }


def task_documents(
    records: Sequence[dict[str, Any]],
    titles: dict[str, str],
    others: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
) -> dict[str, list[dict[str, Any]]]:
    """Per task, its documents' views; with `others` (run name, records), each document also
    carries the other runs' picks of the same test document (NN vs SIFT side by side)."""
    theirs = [(name, {r["doc"]: r for r in rows}) for name, rows in others]
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        view = document_view(record, titles)
        compared = {}
        for name, by_doc in theirs:
            if record["doc"] in by_doc:
                other = document_view(by_doc[record["doc"]], titles)
                compared[name] = {k: other[k] for k in ("neighbors", "after", "gain", "selection")}
        if compared:
            view["compare"] = compared
        out.setdefault(record["task"], []).append(view)
    for views in out.values():
        views.sort(key=lambda v: v["id"])
    return out


def all_ids(records: Iterable[dict[str, Any]]) -> set[str]:
    """Every training document a page names: neighbors and excluded ones."""
    ids: set[str] = set()
    for r in records:
        ids.update(r.get("neighbor_ids") or [])
        ids.update(r.get("excluded_ids") or [])
    return ids


def titles_for(run: Any, store: Any, ids: set[str]) -> dict[str, str]:
    """First lines of the training documents `ids` (from the corpus stage's text stores) and
    of the run's test documents; what cannot be read is left out (the page shows the id)."""
    from ttt.corpus import shard_of
    from ttt.stages import open_text_store

    titles: dict[str, str] = {}
    shards = run.spec.corpus.shards
    wanted: dict[int, list[str]] = {}
    for i in ids:
        wanted.setdefault(shard_of(i, shards), []).append(i)
    for shard, names in wanted.items():
        try:
            texts = open_text_store(run, store, shard)
        except Exception as exc:  # noqa: BLE001 - titles are a convenience, never a failure
            log.warning("report page: no titles from shard %d: %s", shard, exc)
            continue
        with texts:
            for name in names:
                try:
                    titles[name] = first_line(texts.text(texts.row_of(name)))
                except (KeyError, IndexError, ValueError):
                    continue
    try:
        from ttt.eval import select_test_documents

        for doc in select_test_documents(run, store):
            titles[doc.id] = first_line(doc.text)
    except Exception as exc:  # noqa: BLE001
        log.warning("report page: no titles for the test documents: %s", exc)
    return titles
