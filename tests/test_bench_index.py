"""`ttt bench index`: query latency and the extrapolation to the Pile, checked by hand."""

from __future__ import annotations

import pytest

from ttt.bench.index import PRESETS, extrapolate
from ttt.index.choice import bytes_per_vector


def test_extrapolation_by_hand():
    f = {
        "vectors": 1_000_000,
        "approx_bytes_per_vector": 44.0,
        "approx_build_seconds": 360.0,
        "approx_query_p50_ms": 2.0,
        "approx_disk_bytes_per_vector": 2048,
    }
    at = extrapolate(f, 210_000_000)
    assert at["at_memory_gb"] == pytest.approx(44 * 210e6 / 1e9, abs=0.01)  # 9.24 GB
    assert at["at_build_hours"] == pytest.approx(360 * 210 / 3600, abs=0.01)  # 21 h
    assert at["at_query_p50_ms"] == pytest.approx(2.0 * 210**0.5, abs=0.01)  # 28.98 ms
    assert at["at_rerank_disk_gb"] == pytest.approx(2048 * 210e6 / 1e9, abs=0.1)  # 430 GB
    assert "sqrt(N/1000000)" in at["at_formula"] and "N = 210000000" in at["at_formula"]


def test_the_1m_preset_targets_the_pile_budget():
    p = PRESETS["cpu-1m"]
    assert p["vectors"] >= 1_000_000 and p["dim"] == 1024  # RoBERTa-large's dimension
    # PQ32 codes + 8 B id + 1024 centroids x 1024 x 4 B over 1M rows: 44.2 B <= 64
    assert bytes_per_vector(p["type"], p["vectors"], p["dim"]) == pytest.approx(
        32 + 8 + 1024 * 1024 * 4 / 1e6
    )
