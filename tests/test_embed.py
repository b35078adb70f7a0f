"""The encoder (real all-MiniLM-L6-v2, offline) and the resumable embedding stage."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from ttt.embed import EMBEDDINGS, IDS, EmbedError, Encoder, embed_shard, plan_batches
from ttt.spec import TTTRun, parse_spec
from ttt.stages import shard_prefix
from ttt.store import open_store

TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The mitochondria is the powerhouse of the cell.",
    "short",
    "In 1905 Einstein published four papers that changed physics: " * 6,
    "Test-time training on nearest neighbors fine-tunes a language model on retrieved text.",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "a b c d e f g h i j k l m n o p",
    "Ein kurzer deutscher Satz über das Wetter.",
]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    # max_tokens 64 and a small budget keep the CPU forward passes to milliseconds.
    return Encoder("all-minilm-l6-v2", max_tokens=64, batch_tokens=256, device="cpu")


@pytest.fixture
def knobs(encoder: Encoder) -> Iterator[Encoder]:
    """The shared encoder, with batch_tokens/normalize/max_tokens restored after the test."""
    saved = encoder.batch_tokens, encoder.normalize, encoder.max_tokens
    yield encoder
    encoder.batch_tokens, encoder.normalize, encoder.max_tokens = saved


def test_plan_batches_sorted_within_budget_and_complete() -> None:
    lengths = [5, 40, 12, 40, 3, 100, 7, 7, 20]
    batches = plan_batches(lengths, 80)
    assert sorted(r for b in batches for r in b) == list(range(len(lengths)))
    flat = [lengths[r] for b in batches for r in b]
    assert flat == sorted(flat, reverse=True)  # longest first
    for b in batches:
        width = max(lengths[r] for r in b)
        assert width * len(b) <= 80 or len(b) == 1  # one over-long document rides alone
    assert batches[0] == [5]  # 100 tokens > budget: alone


def test_batch_order_and_budget_do_not_change_vectors(knobs: Encoder) -> None:
    reference = knobs.encode(TEXTS)
    assert reference.shape == (len(TEXTS), 384) and reference.dtype == np.float32
    order = list(range(len(TEXTS)))
    random.Random(3).shuffle(order)
    knobs.batch_tokens = 4096  # everything in one batch, padded to the longest
    shuffled = knobs.encode([TEXTS[i] for i in order])
    assert np.allclose(shuffled, reference[order], atol=2e-5)
    knobs.batch_tokens = 64  # many tiny batches
    assert np.allclose(knobs.encode(TEXTS), reference, atol=2e-5)


def test_mean_pooling_over_real_tokens_only(knobs: Encoder) -> None:
    short, long = "a short query", "a much longer neighbour document " * 5
    knobs.batch_tokens = 4096
    alone = knobs.encode([short])[0]
    padded = knobs.encode([short, long])[0]  # same batch: short is padded to long's width
    assert np.allclose(alone, padded, atol=2e-5)
    # The paper's definition, by hand: mean of the last hidden states over the tokens.
    ids = knobs.tokenizer(short, return_tensors="pt")
    with torch.no_grad():
        hidden = knobs.model(**ids).last_hidden_state[0]
    assert np.allclose(alone, hidden.mean(0).numpy(), atol=1e-5)
    # And padding would change the mean, so the test can tell the two apart.
    assert not np.allclose(alone, knobs.encode([short + " " + "[PAD]" * 20])[0], atol=1e-3)


def test_normalize_gives_unit_vectors_in_the_same_direction(knobs: Encoder) -> None:
    raw = knobs.encode(TEXTS[:3])
    knobs.normalize = True
    unit = knobs.encode(TEXTS[:3])
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)


def test_truncation_and_token_counts(knobs: Encoder) -> None:
    knobs.max_tokens = 16
    long = "word " * 400  # 2000 characters: cut before tokenizing, same tokens as uncut
    ids = knobs.tokenize([long, "two words"])
    expected = knobs.tokenizer(long, truncation=True, max_length=16)["input_ids"]
    assert ids[0] == expected and len(ids[0]) == 16
    assert ids[1] == knobs.tokenizer("two words")["input_ids"]
    assert knobs.count_tokens([long, "two words"]) == 16 + len(ids[1])
    # A cut that leaves fewer than max_tokens tokens falls back to the whole text.
    spaced = " " * 600 + "finally some words here"
    assert knobs.tokenize([spaced])[0] == knobs.tokenizer(spaced)["input_ids"][:16]


def test_bad_pooling_is_rejected() -> None:
    with pytest.raises(ValueError, match="pooling 'max'"):
        Encoder("all-minilm-l6-v2", pooling="max")


# --- the stage --------------------------------------------------------------------------------


def make_run(tmp_path: Path, n_docs: int = 11, name: str = "embed-test") -> TTTRun:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "train.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for i in range(n_docs):
            text = f"{TEXTS[i % len(TEXTS)]} (copy {i})"
            fh.write(json.dumps({"text": text, "meta": {"pile_set_name": "Github"}}) + "\n")
    raw = {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTRun",
        "metadata": {"name": name},
        "spec": {
            "corpus": {"train": [str(corpus)], "shards": 1},
            "embedding": {"model": "all-minilm-l6-v2", "maxTokens": 64, "batchTokens": 256},
            "storage": {"root": str(tmp_path / "store")},
        },
    }
    return parse_spec(raw, environ={})


def documents_embedded() -> float:
    return REGISTRY.get_sample_value("ttt_embed_documents_total", {"shard": "0"}) or 0.0


def load_published(store, run: TTTRun) -> tuple[np.ndarray, list[str], dict]:
    prefix = shard_prefix(run, "embed", 0)
    manifest = store.read_manifest(prefix)
    vectors = np.load(store.fetch(f"{prefix}/{EMBEDDINGS}"))
    ids = json.loads(store.fetch(f"{prefix}/{IDS}").read_text())
    return vectors, ids, manifest


def test_embed_shard_float16_storage_is_an_option(tmp_path: Path, encoder: Encoder) -> None:
    from ttt.spec import parse_spec

    raw = make_run(tmp_path, n_docs=3).model_dump(mode="json", by_alias=True)
    raw["spec"]["embedding"]["storage"] = "float16"
    run = parse_spec(raw, environ={})
    store = open_store(run.spec.storage)
    embed_shard(run, store, 0, encoder=encoder, progress=False)
    vectors, _, manifest = load_published(store, run)
    assert vectors.dtype == np.float16 and manifest["dtype"] == "float16"


def test_embed_shard_publishes_float32_rows_in_text_store_order(
    tmp_path: Path, encoder: Encoder
) -> None:
    from ttt.embed import open_text_store

    run = make_run(tmp_path)
    store = open_store(run.spec.storage)
    before = documents_embedded()
    result = embed_shard(run, store, 0, encoder=encoder, part_size=4, progress=False)
    vectors, ids, manifest = load_published(store, run)
    assert result == manifest
    # float32, as the paper's index (float16 storage is our option, below)
    assert vectors.dtype == np.float32 and vectors.shape == (11, 384)
    assert manifest["dtype"] == "float32"
    texts = open_text_store(run, store, 0)
    assert ids == texts.ids
    expected = encoder.encode([texts.text(i) for i in range(len(texts))])
    assert np.allclose(vectors, expected, atol=1e-6)
    assert manifest["spec_hash"] == run.stage_hash("embed")
    assert manifest["dim"] == 384 and manifest["count"] == 11 and manifest["parts"] == 3
    assert manifest["encoder"] == "all-minilm-l6-v2" and manifest["resumed_parts"] == 0
    assert manifest["tokens"] == encoder.count_tokens([texts.text(i) for i in range(11)])
    assert manifest["tokens_per_second"] > 0 and set(manifest["files"]) == {EMBEDDINGS, IDS}
    assert documents_embedded() - before == 11
    tokens = REGISTRY.get_sample_value("ttt_embed_tokens_total", {"shard": "0"})
    assert tokens and tokens >= manifest["tokens"]
    assert store.list(f"{shard_prefix(run, 'embed', 0)}/parts/") == []  # parts cleaned up
    # Published and unchanged: a second call does no work.
    assert embed_shard(run, store, 0, encoder=encoder, progress=False) == manifest
    assert documents_embedded() - before == 11


def test_crash_resumes_part_by_part_with_identical_vectors(
    tmp_path: Path, encoder: Encoder
) -> None:
    run = make_run(tmp_path / "a")
    store = open_store(run.spec.storage)

    def crash_after_second_part(part: int) -> None:
        if part == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_shard(
            run,
            store,
            0,
            encoder=encoder,
            part_size=4,
            on_part=crash_after_second_part,
            progress=False,
        )
    assert store.read_manifest(shard_prefix(run, "embed", 0)) is None  # not published
    before = documents_embedded()
    seen: list[int] = []
    embed_shard(run, store, 0, encoder=encoder, part_size=4, on_part=seen.append, progress=False)
    assert seen == [0, 1, 2]
    assert documents_embedded() - before == 3  # only the last part (rows 8..10) was encoded
    resumed, ids, manifest = load_published(store, run)
    assert manifest["resumed_parts"] == 2

    fresh_run = make_run(tmp_path / "b")
    fresh_store = open_store(fresh_run.spec.storage)
    embed_shard(fresh_run, fresh_store, 0, encoder=encoder, part_size=4, progress=False)
    fresh, fresh_ids, _ = load_published(fresh_store, fresh_run)
    assert ids == fresh_ids and np.array_equal(resumed, fresh)


def test_shard_out_of_range_is_clear(tmp_path: Path, encoder: Encoder) -> None:
    run = make_run(tmp_path)
    with pytest.raises(EmbedError, match="shard 3: the spec has 1 shard"):
        embed_shard(run, open_store(run.spec.storage), 3, encoder=encoder, progress=False)


def test_paper_reference_path_gives_the_same_vectors(knobs: Encoder) -> None:
    from ttt.bench.embed import reference_encode

    knobs.batch_tokens = 128
    assert np.allclose(reference_encode(knobs, TEXTS, batch=3), knobs.encode(TEXTS), atol=2e-5)


@pytest.mark.slow
def test_bench_embed_reports_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from ttt.bench.embed import bench_embed

    figures = bench_embed(documents=12, max_tokens=32, batch_tokens=256)
    assert figures["documents"] == 12 and figures["tokens"] > 12
    assert figures["ours_tokens_per_second"] > 0 and figures["reference_tokens_per_second"] > 0
    assert figures["min_cosine_vs_reference"] > 0.999  # same encoder, same dtype on the CPU
    command = "ttt bench embed --preset cpu --documents 12 --batch-tokens 256 --max-tokens 32"
    assert f"reproduce: {command}\n" in capsys.readouterr().out


def test_resume_with_another_part_size_redoes_mismatched_parts(
    tmp_path: Path, encoder: Encoder
) -> None:
    run = make_run(tmp_path, n_docs=6)
    store = open_store(run.spec.storage)

    def crash(part: int) -> None:
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        embed_shard(run, store, 0, encoder=encoder, part_size=4, on_part=crash, progress=False)
    before = documents_embedded()
    embed_shard(run, store, 0, encoder=encoder, part_size=3, progress=False)
    vectors, _, manifest = load_published(store, run)
    assert manifest["resumed_parts"] == 0 and documents_embedded() - before == 6
    texts = [json.loads(line)["text"] for line in (tmp_path / "train.jsonl").open()]
    assert np.allclose(vectors.astype(np.float32), encoder.encode(texts), atol=2e-3)
