"""A tiny, complete published run for the reliability benchmark: corpus, indexes, LM, servers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

TOKEN = "bench-token"  # nosec B105 - loopback servers of a benchmark, started and ended here
DIM = 16
WORDS = [
    "model",
    "data",
    "graph",
    "proof",
    "theorem",
    "code",
    "list",
    "value",
    "train",
    "test",
    "shard",
    "index",
]


class HashEncoder:
    """A deterministic encoder (a text's blake2b seeds its vector): no model download needed."""

    dim = DIM

    def encode(self, texts: Any) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
            rows.append(np.random.default_rng(seed).standard_normal(DIM))
        return np.asarray(rows, dtype=np.float32)


def _text(rng: np.random.Generator, words: int = 40) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def make_world(root: Path, *, shards: int = 3, train: int = 300, test: int = 6) -> tuple:
    """Publish a run under `root`: returns (spec path, run). Index rows embed the text rows."""
    import faiss

    from ttt.corpus import TextStore
    from ttt.spec import load_spec
    from ttt.stages import publish_corpus, shard_prefix
    from ttt.store import open_store

    rng = np.random.default_rng(0)
    domains = ["Github", "ArXiv"]
    for split, n in (("train", train), ("test", test)):
        with (root / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                meta = {"pile_set_name": domains[i % 2]}
                f.write(json.dumps({"text": _text(rng), "meta": meta}) + "\n")
    lm = root / "lm"
    if not lm.exists():
        save_tiny_lm(lm)
    spec = root / "run.yaml"
    spec.write_text(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: bench}\nspec:\n"
        f"  corpus: {{train: ['{root}/train.jsonl'], test: ['{root}/test.jsonl'], "
        f"shards: {shards}}}\n"
        "  retrieval: {neighbors: 2, distanceThreshold: null, timeoutSeconds: 2, retries: 1,"
        " deadlineSeconds: 5}\n"
        f"  ttt: {{model: '{lm}', learningRate: 1.0e-3, maxLength: 64, evalAfter: [0, 2]}}\n"
        "  eval: {portion: 1.0}\n"
        f"  storage: {{root: '{root}/store'}}\n  metrics: {{enabled: false}}\n"
    )
    run = load_spec(spec, environ={})
    store = open_store(run.spec.storage)
    publish_corpus(run, store, progress=False)
    for s in range(shards):
        texts = TextStore(root / "store" / shard_prefix(run, "corpus", s))
        vectors = HashEncoder().encode([texts.text(r) for r in range(len(texts))])
        index = faiss.IndexFlatL2(DIM)
        index.add(vectors)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "index.faiss"
            faiss.write_index(index, str(path))
            manifest = {"stage": "index", "shard": s, "spec_hash": run.stage_hash("index"),
                        "created": datetime.now(UTC).isoformat(), "type": "flat"}  # fmt: skip
            store.publish(shard_prefix(run, "index", s), {"index.faiss": path}, manifest)
    return spec, run


def save_tiny_lm(out: Path) -> Path:
    """A 2-layer GPT-2 with GPT-2's tokenizer (an offline asset), randomly initialised."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from ttt.assets import resolve_model

    data = resolve_model("gpt2-tokenizer")
    tok = GPT2TokenizerFast(vocab_file=f"{data}/encoder.json", merges_file=f"{data}/vocab.bpe")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)).save_pretrained(
        out
    )
    tok.save_pretrained(out)
    return out


def local_retriever(run: Any, store: Any) -> Any:
    from ttt.index.retrieval import LocalRetriever

    return LocalRetriever.from_run(run, encoder=HashEncoder(), store=store)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout} s")


def serve_process(spec: Path, shard: int, port: int, *extra: str) -> subprocess.Popen:
    """`ttt serve` for one shard as a process of its own (to SIGKILL and SIGTERM)."""
    env = {**os.environ, "TTT_AUTH_TOKEN": TOKEN, "TTT_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "ttt", "serve", "--spec", str(spec), "--shard", str(shard),
           "--port", str(port), *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def app_thread(app: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn in a thread on a loopback port; yields its URL."""
    import uvicorn

    from ttt.index.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
