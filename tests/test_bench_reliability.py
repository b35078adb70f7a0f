"""The reliability benchmark's parts at small sizes: fuzzers, the API fuzzer, fault rows, page."""

from __future__ import annotations

import pytest

from ttt.bench import faults
from ttt.bench.fuzz import fuzz_corpus_reader, fuzz_shard_api, fuzz_spec_loader
from ttt.bench.load import synthetic_servers
from ttt.bench.reliability import render
from ttt.bench.world import TOKEN, make_world
from ttt.index.api import Limits
from ttt.store import open_store


def test_the_corpus_reader_survives_random_lines():
    found = fuzz_corpus_reader(60)
    assert found["cases"] == 60 and found["unexpected"] == []
    assert found["documents"] > 0 and found["strict_refusals"] > 0  # both paths exercised


def test_the_spec_loader_refuses_with_a_spec_error_or_accepts():
    found = fuzz_spec_loader(80)
    assert found["cases"] == 80 and found["unexpected"] == []
    assert found["valid"] > 0 and found["refused"] > 0


@pytest.mark.integration
def test_schemathesis_finds_no_server_error_and_no_oversized_answer():
    with synthetic_servers(1, 500, 8) as [(url, _)]:
        found = fuzz_shard_api(url, TOKEN, 25, Limits().max_response)
    assert found["cases"] >= 50 and found["server_errors"] == 0 and found["under_cap"]
    assert 200 in found["statuses"] and 422 in found["statuses"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    spec, run = make_world(root, train=90, test=2)
    return spec, run, open_store(run.spec.storage)


@pytest.mark.parametrize("row", [faults.shard_garbage, faults.shard_trickling])
def test_fault_rows_measure_what_they_say(world, row):
    got = row(*world)
    assert got.ok, got
    assert got.lost == 0 and got.double == 0


def test_the_page_shows_a_failed_row_and_every_figure():
    rows = [vars(faults.Row("shard on fire", "it burnt", 3, 1, False))]
    figures = {
        "preset": "quick", "machine": "m", "seconds": 1, "faults": rows,
        "fuzz_corpus": {"cases": 1, "documents": 0, "strict_refusals": 1, "unexpected": []},
        "fuzz_spec": {"cases": 2, "valid": 1, "refused": 1, "unexpected": ["KeyError: x"]},
        "api": {"cases": 3, "statuses": {422: 3}, "largest_response": 10, "under_cap": True,
                "server_errors": 0},
        "load": {"shards": 1, "vectors_per_shard": 1, "dim": 1, "concurrency": 1,
                 "requests": 9, "batch": 1, "k": 1, "errors": 0, "requests_per_second": 5.0,
                 "p50_ms": 1.0, "p99_ms": 2.0, "rss_mb_before": 1, "rss_mb_after": 1,
                 "rss_growth_mb": 0},
        "probes": {"large_searches": 1, "searches_ok": 1, "probes": 4, "probe_p50_ms": 1.0,
                   "probe_p99_ms": 120.0, "probe_max_ms": 130.0},
        "bandit": {"issues": 0, "HIGH": 0, "MEDIUM": 0, "LOW": 0, "lines_scanned": 10,
                   "found": []},
    }  # fmt: skip
    page = render(figures)
    assert "| shard on fire | it burnt | 3 | 1 | **NO** |" in page
    assert "| 2 | 1 valid, 1 refused" in page and "| 1 |" in page  # one unexpected exception
    assert "**p99 120.0 ms** (target < 100 ms)" in page
    assert "--preset quick" in page
