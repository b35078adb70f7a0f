"""The evaluation path: which test documents (sample), each rank's worker (rank), one
document's way (retrieve, document), its result records (records) and figures (figures)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Names importable from `ttt.eval`, each from its module. They load on first use: the report
# reads result records without importing the engine (torch) that the rank worker needs.
_EXPORTS = {
    "EvalError": "errors",
    "select_test_documents": "sample",
    "partition": "sample",
    "resolve_rank": "sample",
    "rank_prefix": "rank",
    "evaluate_rank": "rank",
    "prepare_worker_process": "rank",
    "evaluate_documents": "document",
    "guard_neighbors": "retrieve",
    "needs_neighbors": "retrieve",
    "DocumentFacts": "retrieve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttt.eval' has no attribute {name!r}")
    return getattr(import_module(f"ttt.eval.{_EXPORTS[name]}"), name)
