"""The fan-out retriever: exact merge, threshold, leakage guard, dead shards, discovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np
import pytest
from index_shards import (
    TOKEN,
    SimpleTexts,
    app_server,
    flat_index,
    free_port,
    make_run,
    serve_shard,
    shard_processes,
    start_server,
    stop,
    wait_ready,
)

from ttt import telemetry
from ttt.index.client import (
    LocalRetriever,
    Neighbor,
    RetrievalError,
    ShardedRetriever,
    ShardsUnavailable,
    discover_endpoints,
    merge_topk,
)
from ttt.index.retrieval import Hits
from ttt.spec import loads_spec
from ttt.store import open_store

DIM = 16


class TableEncoder:
    """A deterministic stand-in encoder: a fixed vector per known text (no model needed)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), shards=3, n_docs=120, dim=DIM)


@pytest.fixture(scope="module")
def servers(published):
    _, run, store, _, _ = published
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve_shard(run, store, s)) for s in range(3)]


def single_index(vectors):
    """One flat index over every shard, and the (shard, row) of each of its labels."""
    where = [(s, r) for s, v in enumerate(vectors) for r in range(len(v))]
    return flat_index(np.concatenate(vectors)), where


def queries(n=12, seed=1):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_sharded_search_equals_one_flat_index_over_everything(published, servers):
    _, _, _, vectors, texts = published
    index, where = single_index(vectors)
    q = queries()
    distances, labels = index.search(q, 10)
    table = {f"query {i}": v for i, v in enumerate(q)}
    options = {"k": 10, "exclude_identical": False}
    sharded = ShardedRetriever(
        TableEncoder(table), servers, TOKEN, **options, batch_size=5, rows_per_request=7
    )  # several requests per shard and phase
    with sharded:
        remote = sharded.search(list(table), with_text=True)
    local = LocalRetriever(TableEncoder(table), [flat_index(v) for v in vectors], texts, **options)
    for retrieved in (remote, local.search(list(table))):
        for i, r in enumerate(retrieved):
            assert not r.partial and r.failed_shards == []
            assert [(n.shard, n.row) for n in r.neighbors] == [where[j] for j in labels[i]]
            np.testing.assert_allclose(
                [n.distance for n in r.neighbors], distances[i], rtol=1e-5, atol=1e-6
            )
            for n in r.neighbors:
                assert (n.id, n.domain) == texts[n.shard].meta(n.row)[:2]
                assert n.text == texts[n.shard].text(n.row)
    assert [n for r in remote for n in r.neighbors] == [
        n for r in local.search(list(table)) for n in r.neighbors
    ]


def test_merge_breaks_ties_by_shard_then_row():
    hits = {
        2: Hits([0.5, 1.0], [4, 1], ["c4", "c1"], ["x", "x"]),
        0: Hits([1.0, 1.0], [9, 3], ["a9", "a3"], ["x", "x"]),
        1: Hits([0.5], [0], ["b0"], ["x"]),
    }
    merged = merge_topk(hits, 4)
    assert [(n.shard, n.row) for n in merged] == [(1, 0), (2, 4), (0, 3), (0, 9)]
    assert merged[0] == Neighbor("b0", "x", 0.5, 1, 0)


def test_threshold_and_leakage_guard(published, servers):
    _, _, _, vectors, texts = published
    own = vectors[1][5]  # a stored document as its own query: distance 0
    table = {"own": own, "far": own + 100.0}
    with ShardedRetriever(
        TableEncoder(table), servers, TOKEN, k=5, distance_threshold=None
    ) as sharded:
        (guarded,) = sharded.search(["own"])
        assert guarded.excluded == 1 and len(guarded.neighbors) == 5
        assert (1, 5) not in [(n.shard, n.row) for n in guarded.neighbors]
        sharded.exclude_identical, sharded.exclude_margin = False, 0
        (unguarded,) = sharded.search(["own"])
        assert (unguarded.neighbors[0].shard, unguarded.neighbors[0].row) == (1, 5)
        assert unguarded.neighbors[1:] == guarded.neighbors[:4]
        # the threshold is Euclidean (used when < it); neighbors carry FAISS's squared L2
        cut = unguarded.neighbors[2].distance
        sharded.distance_threshold = cut**0.5 * (1 + 1e-6)
        (near,) = sharded.search(["own"])
        assert len(near.neighbors) == 3 and all(n.distance <= cut for n in near.neighbors)
        (none,) = sharded.search(["far"])
        assert none.neighbors == [] and not none.partial
    identical_text = texts[0].text(0)
    local = LocalRetriever(
        TableEncoder({identical_text: own + 0.5}), [flat_index(v) for v in vectors], texts, k=3
    )
    # The leakage guard also drops a neighbor whose text is the query's, at any distance.
    (r,) = local.search([identical_text])
    assert all(n.text != identical_text for n in r.neighbors)


def test_a_bad_token_or_dimension_is_an_error_not_a_partial_result(servers):
    table = {"q": np.zeros(DIM, np.float32), "short": np.zeros(DIM - 1, np.float32)}
    wrong = ShardedRetriever(TableEncoder(table), servers, "wrong", k=3)
    with wrong, pytest.raises(RetrievalError, match=r"HTTP 401\): invalid bearer token"):
        wrong.search(["q"])
    right = ShardedRetriever(TableEncoder(table), servers, TOKEN, k=3)
    with right, pytest.raises(RetrievalError, match="has 15 numbers; this shard's index has dim"):
        right.search(["short"])


def test_replicas_cover_a_dead_endpoint(published, servers):
    dead = f"http://127.0.0.1:{free_port()}"
    endpoints = [[dead, servers[0]], [servers[1]], [servers[2], dead]]
    table = {"q": queries(1)[0]}
    with ShardedRetriever(TableEncoder(table), endpoints, TOKEN, k=5, retries=0) as sharded:
        (r,) = sharded.search(["q"])
    with ShardedRetriever(TableEncoder(table), servers, TOKEN, k=5) as sharded:
        (full,) = sharded.search(["q"])
    assert not r.partial and r.neighbors == full.neighbors


def test_a_slow_shard_times_out_into_a_partial_result(servers):
    async def slow_app(scope, receive, send):  # a shard server that hangs past the timeout
        if scope["type"] == "http":
            await asyncio.sleep(2)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    table = {"q": queries(1)[0]}
    with app_server(slow_app, ready=False) as slow:
        endpoints = [servers[0], servers[1], slow]
        with ShardedRetriever(
            TableEncoder(table),
            endpoints,
            TOKEN,
            k=5,
            timeout=0.3,
            retries=1,
            backoff=0.01,
            down_seconds=30,
            allow_partial=True,
        ) as sharded:
            start = time.monotonic()
            (r,) = sharded.search(["q"])
            assert time.monotonic() - start < 1.5
            assert r.partial and r.failed_shards == [2]
            assert {n.shard for n in r.neighbors} <= {0, 1} and len(r.neighbors) == 5
            start = time.monotonic()
            (again,) = sharded.search(["q"])  # the shard is marked down: no second timeout
            assert time.monotonic() - start < 0.25 and again.failed_shards == [2]


def sample(metric, **labels) -> float:
    value = telemetry.DEFAULT_REGISTRY.get_sample_value(metric, labels)
    return value or 0.0


@pytest.mark.integration
def test_killing_a_shard_server_gives_flagged_partial_results_and_restart_restores(
    published,
):
    spec, run, store, _, _ = published
    ports = [free_port() for _ in range(3)]
    with shard_processes(spec, ports) as procs:
        for p in ports:
            wait_ready(f"http://127.0.0.1:{p}")
        endpoints = discover_endpoints(run, store)  # from the servers' registry files
        assert endpoints == [[f"http://127.0.0.1:{p}"] for p in ports]
        q = queries(4, seed=3)
        table = {f"q{i}": v for i, v in enumerate(q)}
        texts = list(table)
        with ShardedRetriever(
            TableEncoder(table),
            endpoints,
            TOKEN,
            k=8,
            timeout=2,
            retries=1,
            backoff=0.05,
            down_seconds=0.2,
            allow_partial=True,
        ) as sharded:
            full = sharded.search(texts)
            assert not any(r.partial for r in full)
            failures = sample("ttt_retrieval_shard_failures_total", shard="1")
            partials = sample("ttt_retrieval_partial_total", shard="1")
            stop(procs[1])  # dead mid-stream
            partial = sharded.search(texts)
            for before, after in zip(full, partial, strict=True):
                assert after.partial and after.failed_shards == [1]
                # Exactly the merge of the shards still standing.
                survivors = [n for n in before.neighbors if n.shard != 1]
                assert after.neighbors[: len(survivors)] == survivors
                assert all(n.shard != 1 for n in after.neighbors)
            assert sample("ttt_retrieval_shard_failures_total", shard="1") == failures + 1
            assert sample("ttt_retrieval_partial_total", shard="1") == partials + len(texts)
            procs[1] = start_server(spec, 1, ports[1], TOKEN)
            wait_ready(f"http://127.0.0.1:{ports[1]}")
            time.sleep(0.25)  # past down_seconds
            restored = sharded.search(texts)
            assert [r.neighbors for r in restored] == [r.neighbors for r in full]
            assert not any(r.partial for r in restored)


@pytest.mark.integration
def test_a_shard_server_restarted_on_another_port_is_found_again(published, servers):
    spec, run, store, _, _ = published
    registry = f"{run.prefix}/registry"
    for s in (0, 2):  # in-process servers: registered here, as `ttt serve` does
        store.put_json(f"{registry}/shard-{s:05d}.json", {"url": servers[s]})
    key = f"{registry}/shard-00001.json"

    def serve_shard_1() -> tuple[object, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(spec, 1, port, TOKEN)
        wait_ready(url)
        deadline = time.monotonic() + 10
        while store.get_json(key)["url"] != url:  # it registers itself once ready
            assert time.monotonic() < deadline, "the restarted server never registered"
            time.sleep(0.02)
        return proc, url

    proc, old_url = serve_shard_1()
    try:
        q = queries(4, seed=5)
        table = {f"q{i}": v for i, v in enumerate(q)}
        texts = list(table)
        with ShardedRetriever.from_run(
            run,
            TableEncoder(table),
            store,
            TOKEN,
            k=8,
            timeout=2,
            retries=1,
            backoff=0.05,
            down_seconds=0.3,
        ) as sharded:
            assert sharded.endpoints == [[servers[0]], [old_url], [servers[2]]]
            full = sharded.search(texts)
            assert not any(r.partial for r in full)
            stop(proc)  # SIGKILL: its registry file still names the old port
            with pytest.raises(ShardsUnavailable) as down:  # never a silently partial answer
                sharded.search(texts)
            assert down.value.failed == [1]
            proc, new_url = serve_shard_1()
            assert new_url != old_url
            time.sleep(0.35)  # past down_seconds: the shard is looked up again, then retried
            restored = sharded.search(texts)
            assert not any(r.partial for r in restored)
            assert [r.neighbors for r in restored] == [r.neighbors for r in full]
            assert sharded.endpoints[1] == [new_url]
    finally:
        stop(proc)


def test_rediscovery_once_per_down_period_and_its_errors_keep_the_old_urls(servers, caplog):
    calls = []

    def rediscover():
        calls.append(time.monotonic())
        raise RetrievalError("registry unreadable")

    dead = f"http://127.0.0.1:{free_port()}"
    table = {"q": queries(1)[0]}
    with ShardedRetriever(
        TableEncoder(table),
        [servers[0], dead],
        TOKEN,
        k=4,
        retries=0,
        down_seconds=0.2,
        rediscover=rediscover,
        allow_partial=True,
    ) as sharded:
        assert sharded.search(["q"])[0].failed_shards == [1]
        assert calls == []  # the first failure only marks the shard down
        sharded.search(["q"])
        assert calls == []  # still down: not even looked up
        time.sleep(0.25)
        with caplog.at_level("WARNING", logger="ttt.index.client"):
            assert sharded.search(["q"])[0].failed_shards == [1]
        assert len(calls) == 1 and "registry unreadable" in caplog.text
        assert sharded.endpoints[1] == [dead]  # the old URLs stay
        sharded.search(["q"])
        assert len(calls) == 1  # one look-up per down period


def test_discovery_from_a_static_list_a_headless_service_and_a_registry(tmp_path):
    base = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: disco}\nspec:\n"
    static = loads_spec(
        base + "  corpus: {shards: 2}\n  retrieval: {servers: [a:1, 'http://b:2/', c:3, d:4]}\n"
    )
    assert discover_endpoints(static) == [
        ["http://a:1", "http://c:3"],
        ["http://b:2", "http://d:4"],
    ]
    dns = loads_spec(
        base + "  corpus: {shards: 2}\n  index: {replicas: 2}\n"
        "  retrieval: {service: 'ttt-index.ttt-index.ns.svc:9000'}\n"
    )
    assert discover_endpoints(dns) == [
        ["http://ttt-index-0.ttt-index.ns.svc:9000", "http://ttt-index-2.ttt-index.ns.svc:9000"],
        ["http://ttt-index-1.ttt-index.ns.svc:9000", "http://ttt-index-3.ttt-index.ns.svc:9000"],
    ]
    odd = loads_spec(base + "  corpus: {shards: 2}\n  retrieval: {servers: [a:1, b:2, c:3]}\n")
    with pytest.raises(RetrievalError, match="3 URLs for 2 shards"):
        discover_endpoints(odd)
    local = loads_spec(
        base + f"  corpus: {{shards: 3}}\n  storage: {{root: '{tmp_path}'}}\n"
        "  retrieval: {registryHosts: [h]}\n"
    )
    with pytest.raises(RetrievalError, match=r"no server registered for shard\(s\) 0, 1, 2"):
        discover_endpoints(local)
    store = open_store(local.spec.storage)
    for name, url in [
        ("shard-00000", "127.0.0.1:1"),
        ("shard-00002", "h:2"),
        ("shard-00000.1", "h:3"),
    ]:
        store.put_json(f"runs/disco/registry/{name}.json", {"url": url})
    with pytest.raises(RetrievalError, match=r"shard\(s\) 1 under runs/disco/registry/"):
        discover_endpoints(local)
    assert discover_endpoints(local, missing_ok=True)[1] == []  # what a running client asks
    store.put_json("runs/disco/registry/shard-00001.json", {"url": "http://h:4"})
    assert discover_endpoints(local) == [
        ["http://127.0.0.1:1", "http://h:3"],
        ["http://h:4"],
        ["http://h:2"],
    ]


def test_a_registry_entry_cannot_send_the_client_and_its_token_elsewhere(tmp_path):
    base = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: disco}\nspec:\n"
    text = base + f"  corpus: {{shards: 1}}\n  storage: {{root: '{tmp_path}'}}\n"
    run = loads_spec(text)
    store = open_store(run.spec.storage)
    for url in ("http://127.0.0.1:8000", "localhost:8000", "http://[::1]:8000"):
        store.put_json("runs/disco/registry/shard-00000.json", {"url": url})
        assert discover_endpoints(run)[0][0].endswith(":8000")
    store.put_json("runs/disco/registry/shard-00000.json", {"url": "https://evil.example:443"})
    with pytest.raises(RetrievalError, match="not on loopback.*'evil.example'.*registryHosts"):
        discover_endpoints(run)
    allowed = loads_spec(text + "  retrieval: {registryHosts: [evil.example]}\n")
    assert discover_endpoints(allowed) == [["https://evil.example:443"]]


@pytest.mark.slow
def test_real_encoder_end_to_end_over_servers_and_the_query_cli(tmp_path, capsys, monkeypatch):
    from ttt.cli import main
    from ttt.embed import Encoder

    encoder = Encoder("all-minilm-l6-v2")
    spec, run, store, _, texts = make_run(
        tmp_path,
        shards=3,
        n_docs=45,
        embed=encoder.encode,
        extra="  embedding: {model: all-minilm-l6-v2}\n  retrieval: {distanceThreshold: null}\n",
    )
    target = texts[2].text(3)
    query = target + " word5"  # near the stored document, not identical to it
    with shard_processes(spec, [0, 0, 0]) as procs:
        deadline = time.monotonic() + 30
        while len(store.list(f"{run.prefix}/registry/")) < 3:  # servers register once ready
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        with ShardedRetriever.from_run(run, encoder=encoder, store=store, token=TOKEN) as r:
            assert r.k == 50 and r.distance_threshold is None and r.exclude_identical
            (remote,) = r.search([query], k=5)
            (own,) = r.search([target], k=5)
        monkeypatch.setenv("TTT_AUTH_TOKEN", TOKEN)
        assert main(["query", "--spec", str(spec), query, "--k", "3"]) == 0
        served = capsys.readouterr().out
    local = LocalRetriever.from_run(run, encoder=encoder, store=store, k=5)
    (in_process,) = local.search([query])
    assert remote.neighbors == in_process.neighbors
    assert (remote.neighbors[0].shard, remote.neighbors[0].row) == (2, 3)
    assert remote.neighbors[0].text == target
    assert own.excluded == 1 and target not in [n.text for n in own.neighbors]
    assert main(["query", "--spec", str(spec), query, "--k", "3", "--local"]) == 0
    assert capsys.readouterr().out == served
    lines = served.splitlines()
    assert lines[0].split()[:4] == ["#", "distance", "domain", "id"]
    assert len(lines) == 4 and texts[2].meta(3)[0] in lines[1] and "document" in lines[1]


def fixed_answer_app(body: bytes, *, status: int = 200, trickle: float = 0.0):
    """A shard server that answers every request with `body` (a byte every `trickle` s)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if trickle:
            for i in range(len(body)):
                await asyncio.sleep(trickle)
                await send(
                    {"type": "http.response.body", "body": body[i : i + 1], "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body", "body": body})

    return app


def hits(**overrides) -> dict:
    hit = {"ids": ["a:1"], "rows": [0], "domains": ["Github"], "distances": [0.5]}
    return {"shard": 2, "results": [{**hit, **overrides}]}


GARBAGE = {
    "not JSON": b"<html>oops</html>",
    "a missing key": json.dumps({"shard": 2}).encode(),
    "a short list": json.dumps(hits(ids=[])).encode(),
    "NaN distance": json.dumps(hits(distances=[float("nan")])).encode(),
    "negative distance": json.dumps(hits(distances=[-3.0])).encode(),
    "negative row": json.dumps(hits(rows=[-1])).encode(),
    "unsorted distances": json.dumps(
        hits(ids=["a", "b"], rows=[0, 1], domains=["x", "y"], distances=[2.0, 1.0])
    ).encode(),
    "the wrong shard": json.dumps({**hits(), "shard": 0}).encode(),
    "too many results": json.dumps({"shard": 2, "results": hits()["results"] * 2}).encode(),
}


@pytest.mark.parametrize("what", list(GARBAGE))
def test_a_garbage_answer_is_that_shards_failure(servers, what):
    table = {"q": queries(1)[0]}
    bad_before = sample("ttt_retrieval_bad_answers_total", shard="2")
    with app_server(fixed_answer_app(GARBAGE[what]), ready=False) as bad:
        options = {"k": 5, "retries": 1, "backoff": 0.01}
        with ShardedRetriever(TableEncoder(table), [*servers[:2], bad], TOKEN, **options) as r:
            with pytest.raises(ShardsUnavailable) as down:  # not an unrelated exception
                r.search(["q"])
            assert down.value.failed == [2]
        with ShardedRetriever(
            TableEncoder(table), [*servers[:2], bad], TOKEN, allow_partial=True, **options
        ) as r:
            (got,) = r.search(["q"])
    assert got.partial and got.failed_shards == [2]
    assert {n.shard for n in got.neighbors} <= {0, 1}
    assert all(np.isfinite(n.distance) and n.distance >= 0 for n in got.neighbors)
    assert sample("ttt_retrieval_bad_answers_total", shard="2") >= bad_before + 2


def test_a_garbage_answer_falls_over_to_the_next_replica(servers, caplog):
    table = {"q": queries(1)[0]}
    with app_server(fixed_answer_app(GARBAGE["NaN distance"]), ready=False) as bad:
        endpoints = [[servers[0]], [servers[1]], [bad, servers[2]]]
        with (
            caplog.at_level("WARNING", logger="ttt.index.client"),
            ShardedRetriever(TableEncoder(table), endpoints, TOKEN, k=5, retries=0) as r,
        ):
            (got,) = r.search(["q"])
    with ShardedRetriever(TableEncoder(table), servers, TOKEN, k=5) as r:
        (full,) = r.search(["q"])
    assert not got.partial and got.neighbors == full.neighbors
    assert "bad answer" in caplog.text and "finite number" in caplog.text


def test_every_shard_down_is_an_error_even_when_partial_is_allowed():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    table = {"q": queries(1)[0]}
    with (
        ShardedRetriever(
            TableEncoder(table), dead, TOKEN, k=5, retries=0, allow_partial=True
        ) as sharded,
        pytest.raises(ShardsUnavailable, match="0 of 2 shard"),
    ):
        sharded.search(["q"])


def test_min_shards_when_partial_is_allowed(servers):
    dead = f"http://127.0.0.1:{free_port()}"
    table = {"q": queries(1)[0]}
    options = {"k": 5, "retries": 0, "allow_partial": True}
    with (
        ShardedRetriever(
            TableEncoder(table), [servers[0], dead, dead], TOKEN, min_shards=2, **options
        ) as sharded,
        pytest.raises(ShardsUnavailable, match="1 of 3 shard.*need 2"),
    ):
        sharded.search(["q"])
    with ShardedRetriever(
        TableEncoder(table), [servers[0], servers[1], dead], TOKEN, min_shards=2, **options
    ) as sharded:
        assert sharded.search(["q"])[0].failed_shards == [2]


def test_a_trickling_shard_is_cut_at_the_search_deadline(servers):
    body = json.dumps(hits()).encode()  # ~90 bytes, one every 0.05 s: 4.5 s in all
    table = {"q": queries(1)[0]}
    with (
        app_server(fixed_answer_app(body, trickle=0.05), ready=False) as slow,
        ShardedRetriever(
            TableEncoder(table),
            [*servers[:2], slow],
            TOKEN,
            k=5,
            timeout=0.5,  # every single read is on time
            retries=5,
            deadline=1.0,
            allow_partial=True,
        ) as sharded,
    ):
        start = time.monotonic()
        (r,) = sharded.search(["q"])
        took = time.monotonic() - start
    assert r.failed_shards == [2]
    assert took < 1.0 + 0.2, took  # the deadline (2 s to receive, 4.5 s to trickle before)


def test_backoff_is_capped_and_retries_stop_at_the_deadline(servers):
    table = {"q": queries(1)[0]}
    with (
        app_server(fixed_answer_app(b'{"error": "x"}', status=500), ready=False) as failing,
        ShardedRetriever(
            TableEncoder(table),
            [*servers[:2], failing],
            TOKEN,
            k=5,
            retries=10,
            backoff=10.0,  # uncapped: 10 s, 20 s, 40 s ...
            max_backoff=0.05,
            deadline=5.0,
            allow_partial=True,
        ) as sharded,
    ):
        start = time.monotonic()
        (r,) = sharded.search(["q"])
        took = time.monotonic() - start
    assert r.failed_shards == [2] and took < 2.0, took  # 10 pauses of at most 0.05 s


def test_texts_larger_than_a_shard_answer_are_fetched_in_pages():
    """A query whose neighbors' texts exceed the server's response cap: paged, never fatal."""
    from ttt.index.server import Limits, create_app

    rows = ["a" * 3000, "b" * 3000, "ü" * 9000, "c" * 10]  # 9,000 two-byte characters: cut
    texts = SimpleTexts(rows)
    app = create_app(
        lambda: (flat_index(np.eye(4, dtype=np.float32)), texts), 0, token=TOKEN,
        limits=Limits(max_response=5000),
    )  # fmt: skip
    with app_server(app) as url:
        client = ShardedRetriever(None, [url], TOKEN, k=4, rows_per_request=3)
        try:
            got = client._texts_of(0, [0, 1, 2, 3], time.monotonic() + 30)
        finally:
            client.close()
    assert got == rows
