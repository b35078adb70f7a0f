"""Waiting for the index: every shard needs one server answering /readyz (real `ttt serve`)."""

from __future__ import annotations

import pytest
from index_shards import free_port, make_run, start_server, stop, wait_ready

from ttt.index.wait import IndexNotReady, main, shards_down, wait_for_shards
from ttt.spec import load_spec


def test_shards_down_needs_one_ready_server_per_shard():
    up = {"http://a0", "http://b1"}
    endpoints = [["http://a0", "http://x0"], ["http://x1"], ["http://y2", "http://b1"]]
    assert shards_down(endpoints, lambda url: url in up) == [1]


@pytest.mark.integration
def test_waits_for_real_servers_and_names_the_missing_shard(tmp_path):
    ports = [free_port(), free_port()]
    servers = "[" + ", ".join(f"'http://127.0.0.1:{p}'" for p in ports) + "]"
    spec, *_ = make_run(tmp_path, shards=2, extra=f"  retrieval: {{servers: {servers}}}\n")
    run = load_spec(spec)
    first = start_server(spec, 0, ports[0])
    second = None
    try:
        wait_ready(f"http://127.0.0.1:{ports[0]}")
        with pytest.raises(IndexNotReady, match=r"shard\(s\) \[1\] have no ready server"):
            wait_for_shards(run, timeout_s=0.5, poll_s=0.1)
        assert main(["--spec", str(spec), "--timeout", "0.2", "--poll", "0.1"]) == 1
        second = start_server(spec, 1, ports[1])
        wait_for_shards(run, timeout_s=30, poll_s=0.1)
        assert main(["--spec", str(spec), "--timeout", "5"]) == 0
    finally:
        for proc in (first, second):
            if proc is not None:
                stop(proc)
