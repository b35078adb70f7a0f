"""The shard server over real HTTP: search, auth, limits, readiness, metrics and SIGTERM drain."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from index_shards import (
    AUTH,
    TOKEN,
    SimpleTexts,
    app_server,
    flat_index,
    free_port,
    make_run,
    serve_shard,
    start_server,
    stop,
    wait_ready,
)

from ttt.bench.load import SyntheticTexts
from ttt.index.server import Limits, create_app
from ttt.index.shard import ShardError, load_shard, ordinal_from_hostname, shard_of_ordinal


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), shards=3, n_docs=60, dim=8)


@pytest.fixture(scope="module")
def shard0(published):
    _, run, store, vectors, texts = published
    limits = Limits(max_k=30, max_batch=4, max_body=4096)
    with (
        serve_shard(run, store, 0, limits=limits) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        yield http, vectors[0], texts[0]


def test_search_returns_the_shards_exact_neighbors(shard0):
    http, vectors, texts = shard0
    queries = vectors[:3] + 0.01
    r = http.post("/v1/search", json={"vectors": queries.tolist(), "k": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shard"] == 0 and len(body["results"]) == 3
    for q, hits in zip(queries, body["results"], strict=True):
        exact = ((vectors - q) ** 2).sum(1)
        order = np.argsort(exact, kind="stable")[:5]
        assert hits["rows"] == order.tolist()
        np.testing.assert_allclose(hits["distances"], exact[order], rtol=1e-4, atol=1e-5)
        assert hits["ids"] == [texts.meta(r)[0] for r in order]
        assert hits["domains"] == [texts.meta(r)[1] for r in order]
        assert "texts" not in hits and "vectors" not in hits


def test_search_includes_texts_and_vectors_on_request(shard0):
    http, vectors, texts = shard0
    body = {"vectors": [vectors[7].tolist()], "k": 2, "include_text": True, "include_vectors": True}
    hits = http.post("/v1/search", json=body, headers=AUTH).json()["results"][0]
    assert hits["rows"][0] == 7 and hits["distances"][0] == pytest.approx(0, abs=1e-5)
    assert hits["texts"] == [texts.text(r) for r in hits["rows"]]
    np.testing.assert_allclose(hits["vectors"], vectors[hits["rows"]], rtol=1e-6)


def test_k_larger_than_the_shard_returns_every_row(shard0):
    http, vectors, _ = shard0
    hits = http.post("/v1/search", json={"vectors": [[0.0] * 8], "k": 30}, headers=AUTH).json()
    assert len(hits["results"][0]["rows"]) == len(vectors) < 30  # no -1 padding leaks out


def test_documents_returns_texts_of_rows(shard0):
    http, _, texts = shard0
    r = http.post("/v1/documents", json={"rows": [2, 0]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["texts"] == [texts.text(2), texts.text(0)]
    assert r.json()["ids"] == [texts.meta(2)[0], texts.meta(0)[0]]
    bad = http.post("/v1/documents", json={"rows": [len(texts)]}, headers=AUTH)
    assert bad.status_code == 422 and "out of range" in bad.json()["error"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing 'Authorization: Bearer"),
        ({"Authorization": "Bearer nope"}, "invalid"),
        ({"Authorization": TOKEN}, "invalid"),
    ],
)
def test_search_needs_the_bearer_token(shard0, headers, message):
    http, _, _ = shard0
    r = http.post("/v1/search", json={"vectors": [[0.0] * 8]}, headers=headers)
    assert r.status_code == 401
    assert message in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"vectors": [[0.0] * 8], "k": 31}, 422, "k: 31 is out of range; 1 <= k <= 30"),
        ({"vectors": [[0.0] * 8], "k": 0}, 422, "k: 0 is out of range"),
        ({"vectors": [[0.0] * 8] * 5}, 422, "5 queries in one request; at most 4"),
        (
            {"vectors": [[0.0] * 8, [0.0] * 7]},
            422,
            "vectors[1] has 7 numbers; this shard's index has dimension 8",
        ),
        ({"vectors": []}, 422, "at least one query vector"),
        ({"vectors": [[1e39] + [0.0] * 7]}, 422, "vectors[0] holds a number too large"),
        ({"vectors": [["a"] + [0.0] * 7]}, 422, "vectors[0][0]: Input should be a valid number"),
        ({"vectors": [[0.0] * 8], "k": "5"}, 422, "k: Input should be a valid integer"),
        ({"vectors": [[0.0] * 8], "top": 5}, 422, "top: unknown field"),
        ({"k": 5}, 422, "vectors: Field required"),
        ({"vectors": [[0.0] * 8] * 4, "pad": "x" * 5000}, 413, "at most 4096 bytes"),
    ],
)
def test_limits_and_bad_bodies_are_4xx_that_say_what_was_wrong(shard0, body, status, message):
    http, _, _ = shard0
    r = http.post("/v1/search", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b'{"vectors": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', 422, "finite number"),
        (b'{"vectors": [[0, 0, 0, 0, 0, 0, 0, 0]], ', 400, "malformed JSON"),
        (b"", 400, "empty request body"),
        (b"[1, 2]", 422, "body: Input should be an object"),
    ],
)
def test_malformed_json_is_refused(shard0, raw, status, message):
    http, _, _ = shard0
    r = http.post("/v1/search", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_body_limit_holds_without_content_length(shard0):
    http, _, _ = shard0

    def chunks():
        yield b'{"vectors": ['
        for _ in range(400):
            yield b"[0,0,0,0,0,0,0,0],"
        yield b"[0,0,0,0,0,0,0,0]]}"

    r = http.post("/v1/search", content=chunks(), headers=AUTH)  # chunked: no Content-Length
    assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]


def test_health_metrics_and_openapi(shard0):
    http, vectors, _ = shard0
    assert http.get("/healthz").json()["status"] == "alive"
    ready = http.get("/readyz").json()
    assert ready == {"status": "ready", "shard": 0, "vectors": len(vectors), "dimension": 8}
    http.post("/v1/search", json={"vectors": [[0.0] * 8], "k": 3}, headers=AUTH)
    metrics = http.get("/metrics").text
    assert 'ttt_index_requests_total{code="200",shard="0"}' in metrics
    assert 'ttt_index_requests_total{code="401",shard="0"}' in metrics
    assert 'ttt_index_request_duration_seconds_bucket{le="0.001",shard="0"}' in metrics
    assert f'ttt_index_shard_vectors{{shard="0"}} {float(len(vectors))}' in metrics
    assert 'ttt_index_shard_ready{shard="0"} 1.0' in metrics
    assert 'ttt_index_vectors_served_total{shard="0"}' in metrics
    # Nothing about the API without the token: no /docs, no /redoc, the schema behind it.
    assert http.get("/docs").status_code == 404 and http.get("/redoc").status_code == 404
    assert http.get("/openapi.json").status_code == 401
    spec = http.get("/openapi.json", headers=AUTH).json()
    assert "/openapi.json" not in spec["paths"]
    search = spec["paths"]["/v1/search"]["post"]
    schema = search["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"vectors", "k", "include_text", "include_vectors"}
    assert {"401", "413", "422"} <= set(search["responses"])


def test_readyz_is_503_until_the_index_is_loaded(published):
    _, run, store, _, _ = published
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return load_shard(run, store, 1)

    app = create_app(slow_loader, 1, token=TOKEN)
    with app_server(app, ready=False) as url, httpx.Client(base_url=url) as http:
        assert http.get("/healthz").status_code == 200  # alive while loading
        loading = http.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = http.post("/v1/search", json={"vectors": [[0.0] * 8]}, headers=AUTH)
        assert early.status_code == 503 and "still loading" in early.json()["error"]
        release.set()
        wait_ready(url)
        assert http.post("/v1/search", json={"vectors": [[0.0] * 8]}, headers=AUTH).is_success


def test_a_failed_load_stays_unready_and_says_why_only_behind_the_token(published):
    _, run, store, _, _ = published
    app = create_app(lambda: load_shard(run, store, 7), 7, token=TOKEN)
    with app_server(app, ready=False) as url:
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{url}/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # /readyz is open: it says "failed", never the error (it names keys and endpoints).
        assert r.status_code == 503 and r.json() == {"status": "failed", "shard": 7}
        searched = httpx.post(f"{url}/v1/search", json={"vectors": [[0.0] * 8]}, headers=AUTH)
        assert searched.status_code == 503
        assert "no index at runs/shards-test/index/shard-00007" in searched.json()["error"]


def test_no_token_refuses_to_start_unless_auth_is_disabled(published):
    _, run, store, _, _ = published
    with pytest.raises(ShardError, match="refusing to serve without an auth token"):
        create_app(lambda: load_shard(run, store, 0), 0, token=None)
    with serve_shard(run, store, 0, token=None, auth_disabled=True) as url:
        assert httpx.post(f"{url}/v1/search", json={"vectors": [[0.0] * 8]}).is_success


def test_cli_without_token_exits_with_a_message(published):
    spec = published[0]
    env = {k: v for k, v in os.environ.items() if k != "TTT_AUTH_TOKEN"}
    cmd = [sys.executable, "-m", "ttt", "serve", "--spec", str(spec), "--shard", "0", "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "refusing to serve without an auth token" in done.stderr


def test_statefulset_ordinal_maps_to_shard_and_replica():
    assert ordinal_from_hostname("ttt-index-12") == 12
    assert ordinal_from_hostname("ttt-index-3.ttt-index.default.svc") == 3
    assert shard_of_ordinal(4, 3) == (1, 1)
    with pytest.raises(ShardError, match="does not end in -N"):
        ordinal_from_hostname("laptop")


@pytest.mark.integration
def test_sigterm_drains_then_exits_cleanly(published):
    spec, run, store, vectors, _ = published
    port = free_port()
    proc = start_server(spec, 2, port, TOKEN, "--drain-seconds", "1.5")
    url = f"http://127.0.0.1:{port}"
    key = f"{run.prefix}/registry/shard-00002.json"
    try:
        wait_ready(url)
        assert store.get_json(key)["url"] == url  # a local run registers its server
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while httpx.get(f"{url}/readyz").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.get(f"{url}/readyz").json()["status"] == "draining"
        # Still answering while load balancers take it out of rotation.
        r = httpx.post(f"{url}/v1/search", json={"vectors": [vectors[2][0].tolist()]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["results"][0]["rows"][0] == 0
        assert proc.wait(15) == 0
        assert not store.exists(key)
    finally:
        output = stop(proc)
    assert "Traceback" not in output and "ERROR" not in output, output


def test_read_token_sources_in_order(tmp_path, monkeypatch):
    from ttt.index.shard import ShardError, read_token

    secret = tmp_path / "token"
    secret.write_text("from-file\n")  # a mounted Secret may end in a newline
    monkeypatch.setenv("TTT_AUTH_TOKEN", "from-env")
    monkeypatch.delenv("TTT_AUTH_TOKEN_FILE", raising=False)
    assert read_token() == "from-env"
    monkeypatch.setenv("TTT_AUTH_TOKEN_FILE", str(secret))
    assert read_token() == "from-file"
    assert read_token(token_file=str(secret)) == "from-file"
    assert read_token("given") == "given"
    secret.write_text("")
    with pytest.raises(ShardError, match="token file is empty"):
        read_token()


def _flat(n: int, dim: int, seed: int = 0):
    return flat_index(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))


def test_one_small_request_cannot_draw_a_huge_response():
    """k x queries, the vectors and the response bytes are bounded (a 10.8 KB request drew a
    314 MB response before)."""
    limits = Limits(max_results=1000, max_vector_values=2000, max_response=100_000)
    app = create_app(
        lambda: (_flat(2000, 8), SyntheticTexts(2000, 1000)), 0, token=TOKEN, limits=limits
    )
    with app_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        ask = {"vectors": [[0.0] * 8] * 11, "k": 100}
        r = http.post("/v1/search", json=ask)
        assert r.status_code == 422 and "k x queries = 100 x 11 = 1100" in r.json()["error"]
        ask = {"vectors": [[0.0] * 8] * 3, "k": 100, "include_vectors": True}
        r = http.post("/v1/search", json=ask)
        assert r.status_code == 422 and "2400 numbers; at most 2000" in r.json()["error"]
        ask = {"vectors": [[0.0] * 8] * 2, "k": 100, "include_text": True}  # 200 KB of texts
        r = http.post("/v1/search", json=ask)
        assert r.status_code == 413 and "exceed 100000 bytes" in r.json()["error"]
        r = http.post("/v1/documents", json={"rows": list(range(200))})  # 200 KB of texts
        assert r.status_code == 200 and len(r.content) <= 100_000  # a page, not a 413
        assert 0 < len(r.json()["texts"]) < 200 and "next_offset" not in r.json()
        ask = {"vectors": [[0.0] * 8] * 2, "k": 40, "include_text": True}  # 80 KB: allowed
        r = http.post("/v1/search", json=ask)
        assert r.status_code == 200 and len(r.content) <= 100_000
    default = Limits()
    big = 1024 * 256  # the old defaults allowed k=1024 x 256 queries in one request
    assert default.max_results < big and default.max_response <= 64 * 2**20


SYNTHETIC_SERVER = """
import sys, numpy as np, faiss, uvicorn
sys.path.insert(0, sys.argv[4])
from ttt.bench.load import SyntheticTexts
from ttt.index.server import HeaderTimeoutH11, bind_socket, create_app
n, dim, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def load():
    index = faiss.IndexFlatL2(dim)
    index.add(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
    return index, SyntheticTexts(n, 200)
app = create_app(load, 0, token="s3cret")
config = uvicorn.Config(app, log_level="warning", http=HeaderTimeoutH11, lifespan="on")
uvicorn.Server(config).run(sockets=[bind_socket("127.0.0.1", port)])
"""


@contextlib.contextmanager
def synthetic_server(n: int, dim: int):
    """A shard server process over n random vectors (a process of its own, as deployed)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", SYNTHETIC_SERVER, str(n), str(dim), str(port)]
    proc = subprocess.Popen([*args, str(Path(__file__).parent)], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
def test_probes_answer_while_16_large_searches_are_in_flight():
    dim = 128
    queries = np.random.default_rng(1).standard_normal((256, dim)).astype(np.float32)
    body = json.dumps({"vectors": queries.tolist(), "k": 100, "include_text": True}).encode()
    assert len(body) > 500_000  # a large request, and a ~6 MB response
    with synthetic_server(20_000, dim) as url:

        def search() -> int:
            r = httpx.post(f"{url}/v1/search", content=body, headers=AUTH, timeout=120)
            return r.status_code

        latencies: list[float] = []
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(search) for _ in range(16)]
            with httpx.Client(base_url=url, timeout=10) as probe:
                while not all(f.done() for f in futures) or len(latencies) < 20:
                    start = time.perf_counter()
                    assert probe.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.01)
            assert [f.result() for f in futures] == [200] * 16
    p99 = float(np.percentile(latencies, 99))
    # 100 ms is the target (docs/reliability.md measures it); the test allows 250 ms because
    # CI shares its 2 cores. Before the fix, one such load held /healthz 3.2 s at p99.
    assert p99 < 0.25, f"/healthz p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"


def test_searches_past_the_queue_are_told_busy(monkeypatch):
    from ttt.index import server

    release = threading.Event()
    real = server._search

    def slow(state, req, limits):
        release.wait(10)
        return real(state, req, limits)

    monkeypatch.setattr(server, "_search", slow)
    limits = Limits(max_concurrent=1, max_queued=1)
    app = create_app(
        lambda: (_flat(100, 8), SyntheticTexts(100, 10)), 0, token=TOKEN, limits=limits
    )
    ask = {"vectors": [[0.0] * 8], "k": 3}
    with app_server(app) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(httpx.post, f"{url}/v1/search", json=ask, headers=AUTH)]
        time.sleep(0.3)
        running.append(pool.submit(httpx.post, f"{url}/v1/search", json=ask, headers=AUTH))
        time.sleep(0.3)  # one running, one waiting: the third is refused at once
        third = httpx.post(f"{url}/v1/search", json=ask, headers=AUTH)
        assert third.status_code == 503 and "busy" in third.json()["error"]
        assert httpx.get(f"{url}/readyz").status_code == 200  # probes unaffected
        release.set()
        assert [f.result().status_code for f in running] == [200, 200]


def test_a_connection_that_sends_no_headers_is_closed(monkeypatch):
    import socket

    import uvicorn

    from ttt.index.server import HeaderTimeoutH11, bind_socket

    monkeypatch.setattr(HeaderTimeoutH11, "header_timeout", 0.3)
    app = create_app(lambda: (_flat(10, 8), SyntheticTexts(10, 10)), 0, token=TOKEN)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", http=HeaderTimeoutH11, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
            start = time.monotonic()
            assert idle.recv(100) == b""  # closed by the server
            assert time.monotonic() - start < 2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ok:  # a whole request
            ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_documents_are_paged_and_a_long_text_comes_in_pieces():
    limits = Limits(max_response=10_000)
    # row 1 is 25,000 characters (many of them multi-byte): longer than a whole answer
    texts = SimpleTexts(["short " * 10, 'é€x\n"' * 5000, "tail"])
    app = create_app(lambda: (_flat(3, 8), texts), 0, token=TOKEN, limits=limits)
    with app_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        first = http.post("/v1/documents", json={"rows": [0, 1, 2]}).json()
        assert first["texts"] == [texts.rows[0]] and "next_offset" not in first  # row 1: next
        got, offset = "", 0
        while True:
            r = http.post("/v1/documents", json={"rows": [1, 2], "offset": offset})
            assert r.status_code == 200 and len(r.content) <= 10_000, r.text
            page = r.json()
            got += page["texts"][0]
            if "next_offset" not in page:
                break
            assert page["texts"] and page["next_offset"] > offset
            offset = page["next_offset"]
        assert got == texts.rows[1] and offset > 0 and page["texts"][1:] == ["tail"]
        past = http.post("/v1/documents", json={"rows": [2], "offset": 5})
        assert past.status_code == 422 and "offset: 5 is past the end" in past.json()["error"]
