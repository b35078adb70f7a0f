"""A server started before its index is published waits alive and unready, then serves."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from index_shards import (
    free_port,
    publish_index,
    start_server,
    stop,
    wait_ready,
    write_corpus,
    write_spec,
)

from ttt.index.published import wait_published
from ttt.spec import load_spec
from ttt.stages import publish_corpus
from ttt.store import open_store

TOKEN = "s3cret"


@pytest.fixture
def unpublished(tmp_path):
    """A run whose corpus is published and whose shard 0 has no index yet."""
    corpus = tmp_path / "train.jsonl"
    write_corpus(corpus, 12)
    spec = write_spec(tmp_path, corpus, 1)
    run = load_spec(spec)
    store = open_store(run.spec.storage)
    publish_corpus(run, store, progress=False)
    return spec, run, store


def test_wait_published_polls_until_this_runs_index_is_there(unpublished):
    spec, run, store = unpublished
    stale = load_spec(spec, environ={"TTT_INDEX__TYPE": "HNSW32"})
    assert stale.name == run.name and stale.stage_hash("index") != run.stage_hash("index")
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 2:  # an index from another spec (a previous run's): still waiting
            publish_index(stale, store, 0, np.zeros((12, 4), dtype=np.float32))
        if len(polls) == 4:
            publish_index(run, store, 0, np.zeros((12, 4), dtype=np.float32))

    manifest = wait_published(run, store, 0, poll_s=7.0, sleep=sleep)
    assert polls == [7.0] * 4
    assert manifest["spec_hash"] == run.stage_hash("index")


@pytest.mark.integration
def test_a_server_waits_unready_then_serves_once_the_index_is_published(unpublished):
    spec, run, store = unpublished
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(spec, 0, port, TOKEN, "--wait-for-index", "0.2")
    try:
        deadline = time.monotonic() + 20
        while True:  # up: alive for the kubelet's liveness probe
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(10):  # 2 s: unready, not exited (a crash loop exits here)
            r = httpx.get(f"{url}/readyz", timeout=1)
            assert (r.status_code, r.json()["status"]) == (503, "loading")
            assert proc.poll() is None
            time.sleep(0.2)
        publish_index(run, store, 0, np.random.default_rng(0).standard_normal((12, 4)))
        wait_ready(url)
        assert httpx.get(f"{url}/readyz").json()["vectors"] == 12
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output


@pytest.mark.integration
def test_without_the_flag_a_server_with_no_index_exits(unpublished):
    spec, _, _ = unpublished
    proc = start_server(spec, 0, free_port(), TOKEN)
    try:
        assert proc.wait(60) == 1
    finally:
        output = stop(proc)
    assert "no index at" in output, output


def test_the_awaiting_gauge_is_up_only_while_waiting(unpublished):
    from ttt import telemetry

    _, run, store = unpublished
    gauge = telemetry.SHARD_AWAITING_INDEX.labels("0")
    seen = []

    def sleep(_):
        seen.append(gauge._value.get())
        publish_index(run, store, 0, np.zeros((12, 4), dtype=np.float32))

    wait_published(run, store, 0, poll_s=0, sleep=sleep)
    assert seen == [1.0] and gauge._value.get() == 0.0
