"""The index type for n vectors under a memory budget and a recall target (autofaiss's rule).

Families from most to least exact, with their resident bytes per vector:
flat 4d; HNSW32 4d + 256 (32 x 2 links of 4 B at level 0); IVF,SQ8 d + 8 (codes + id);
IVF,PQm m + 8 (one byte per sub-quantizer + id), re-ranked exactly against the float16
vectors on disk. The coarse quantizer has nlist = 4 sqrt(n) rounded to a power of two
(FAISS's guideline, as autofaiss), whose centroids (nlist x d x 4 B) are spread over n.
As autofaiss: the most exact family that fits the budget; where `ttt bench index` measured a
family's recall, the cheapest one that meets the target wins instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    bytes_per_vector: float
    recall: float | None  # measured recall@k after re-ranking; None = not measured
    reason: str


def nlist_for(n: float) -> int:
    return 2 ** max(4, round(math.log2(4 * math.sqrt(max(n, 1)))))


def families(n: float, dim: int) -> list[tuple[str, str, float]]:
    """(code, factory, bytes per vector) from the most to the least exact."""
    nlist = nlist_for(n)
    centroids = nlist * dim * 4 / max(n, 1)
    out = [("Flat", "flat", 4.0 * dim), ("HNSW32", "HNSW32", 4.0 * dim + 256)]
    out.append(("SQ8", f"IVF{nlist},SQ8", dim + 8 + centroids))
    for m in (128, 96, 64, 48, 32, 16, 8):
        if dim % m == 0:
            out.append((f"PQ{m}", f"IVF{nlist},PQ{m}", m + 8 + centroids))
    return out


def code_of(factory: str) -> str:
    """'IVF4096,PQ32' -> 'PQ32', 'IVF256,PQ32x8' -> 'PQ32', 'flat' -> 'Flat'."""
    last = factory.split(",")[-1]
    if factory.lower() == "flat":
        return "Flat"
    return last.split("x")[0] if last.startswith("PQ") else last


def bytes_per_vector(factory: str, n: float, dim: int) -> float | None:
    """Resident bytes per vector of a factory string's family (None: not one of ours)."""
    code = code_of(factory)
    ivf = re.match(r"(?:OPQ\d+(?:_\d+)?,)?IVF(\d+)", factory)
    centroids = (int(ivf.group(1)) if ivf else nlist_for(n)) * dim * 4 / max(n, 1)
    if code.startswith("PQ") and code[2:].isdigit():
        return int(code[2:]) + 8 + centroids
    if code == "SQ8":
        return dim + 8 + centroids
    return {"Flat": 4.0 * dim, "HNSW32": 4.0 * dim + 256}.get(
        "HNSW32" if code.startswith("HNSW") else code
    )


def choose_index(
    n: float,
    dim: int,
    budget: float,
    recall_target: float,
    measured: Sequence[dict[str, Any]] = (),
    k: int = 50,
) -> IndexChoice:
    """The index for `n` vectors of `dim` within `budget` bytes per vector (see module doc).

    `measured`: `ttt bench index --json` outputs; their approx_type's code (PQ32, SQ8) and
    approx_recall@k (after re-ranking) are matched to the families.
    """
    recall: dict[str, float] = {"Flat": 1.0}  # exact: recall against itself
    setting: dict[str, str] = {"Flat": ""}
    for m in measured:
        # recall@k at the run's k; else at the k the benchmark used (its default, 50)
        keys = [key for key in m if key.startswith("approx_recall@") and "_without" not in key]
        key = f"approx_recall@{k}" if f"approx_recall@{k}" in m else (keys[0] if keys else None)
        if key is not None and m[key] is not None:
            code = code_of(str(m["approx_type"]))
            if float(m[key]) > recall.get(code, -1.0):
                recall[code] = float(m[key])
                setting[code] = (
                    f" (measured: {m['approx_type']}, nprobe {m.get('approx_nprobe')}, "
                    f"rerank {m.get('approx_rerank')}, {m.get('vectors')} vectors)"
                )
    fitting = [f for f in families(n, dim) if f[2] <= budget]
    if not fitting:
        smallest = families(n, dim)[-1]
        raise ValueError(
            f"no index family fits {budget:.1f} bytes per vector (the smallest, "
            f"{smallest[1]}, needs {smallest[2]:.1f}); raise the memory or add shards"
        )
    meeting = [f for f in fitting if recall.get(f[0], -1.0) >= recall_target]
    if meeting:
        code, factory, bpv = min(meeting, key=lambda f: f[2])
        why = (
            f"the cheapest family within {budget:.1f} B/vector whose measured recall@{k} "
            f"{recall[code]:.3f} >= {recall_target}{setting[code]}"
        )
        return IndexChoice(factory, bpv, recall[code], why)
    code, factory, bpv = fitting[0]
    why = f"the most exact family within {budget:.1f} B/vector"
    if code in recall:
        why += f"; its measured recall@{k} {recall[code]:.3f} is below {recall_target}"
        why += setting[code]
    else:
        why += f"; recall not measured: run `ttt bench index --type {factory}`"
    return IndexChoice(factory, bpv, recall.get(code), why)
