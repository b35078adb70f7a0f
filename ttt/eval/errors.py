"""EvalError: an evaluation that cannot proceed (the rank worker's and a document's retrieval)."""

from __future__ import annotations

from ttt.errors import TTTError


class EvalError(TTTError, RuntimeError):
    """An evaluation that cannot proceed; the message names the run, rank, file or variable."""
