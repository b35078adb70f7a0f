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
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from tiny_run import save_tiny_lm

from ttt.eval import (
    EvalError,
    evaluate_rank,
    partition,
    resolve_rank,
    select_test_documents,
)
from ttt.eval.records import ResultsError, merge_records, parse_results, rank_results
from ttt.eval.retrieve import guard_neighbors
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


def worker_run(tmp: Path, model, retrieval: dict | None = None, **ttt):
    """The run the worker evaluates: TINY_TTT on `model` (`ttt` on top), TINY_RETRIEVAL
    (`retrieval` on top), half of the test documents of tiny_corpus(tmp)."""
    return make_run(
        tmp,
        ttt={**TINY_TTT, "model": str(model), **ttt},
        retrieval={**TINY_RETRIEVAL, **(retrieval or {})},
        eval={"portion": 0.5},
    )


def tiny_worker(tmp: Path, model, per_task: int, retrieval: dict | None = None, **ttt):
    """tiny_corpus(tmp), the worker's run on it (see worker_run), its store and a local
    retriever over its training documents."""
    from ttt.store import open_store

    tiny_corpus(tmp, per_task=per_task)
    run = worker_run(tmp, model, retrieval, **ttt)
    return run, open_store(run.spec.storage), local_retriever(run, tmp / "shards")


# the paper's carried optimizer, in the sequential loop (the reference the kills compare to;
# `auto` would take the ensemble on a CPU too, which reads further ahead)
CARRIED = {
    "optimizer": "adamw",
    "weightDecay": 0.01,
    "resetOptimizer": False,
    "engine": "sequential",
}


def worker_main(argv: list[str]) -> int:
    """`worker TMP MODEL WORK [KILL_AFTER] [carried] [ensemble]`: evaluate rank 0 of the tiny
    run in TMP (`carried`: with the paper's optimizer, carried across a task's documents;
    `ensemble`: the ensemble engine of two members)."""
    tmp, model, work = Path(argv[0]), argv[1], Path(argv[2])
    rest = [a for a in argv[3:] if a not in ("carried", "ensemble")]
    kill_after = int(rest[0]) if rest else None
    from ttt.store import open_store

    ttt = {**(CARRIED if "carried" in argv[3:] else {})}
    if "ensemble" in argv[3:]:  # the fast engine on a CPU too, two members
        ttt |= {"engine": "ensemble", "ensembleSize": 2}
    run = worker_run(tmp, model, **ttt)
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
        state_seconds=0.0,  # every record boundary, for the killed-rank test
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


def test_the_default_selection_is_the_reference_codes(tmp_path):
    """Per task in file order, random.Random() seeded 1216, shuffled, the first int(0.2 n)."""
    import random

    from ttt.corpus import iter_documents

    # tasks interleaved in the file, ids that do not sort in file order
    docs = [(("Github", "ArXiv")[i % 3 == 0], f"text {i}") for i in range(61)]
    write_jsonl(tmp_path / "test.jsonl", docs)
    run = make_run(tmp_path)
    assert run.spec.eval.selection == "reference"
    expected = []
    for task in ("ArXiv", "Github"):
        pool = [d.id for d in iter_documents([str(tmp_path / "test.jsonl")]) if d.domain == task]
        rnd = random.Random()
        rnd.seed(1216)
        rnd.shuffle(pool)
        expected += pool[: int(0.2 * len(pool))]  # ArXiv: 21 -> 4, Github: 40 -> 8
    assert [d.id for d in select_test_documents(run)] == expected and len(expected) == 12


def test_eval_list_prints_the_selection_without_any_stage(tmp_path, capsys):
    from ttt.cli import main

    _selection_corpus(tmp_path)
    run = make_run(tmp_path, eval={"workers": 3})
    spec = tmp_path / "run.yaml"
    spec.write_text(run.to_yaml())
    assert main(["eval", "--spec", str(spec), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    selected = select_test_documents(run)
    assert lines == [f"{d.id}\t{d.domain}" for d in selected]
    assert len(lines) == 3  # Github 10 -> 2, ArXiv 5 -> 1, Enron 1 -> int(0.2) = 0
    assert not (tmp_path / "store" / "runs").exists()  # nothing evaluated, nothing written


def test_selection_is_deterministic_and_takes_the_portion(tmp_path):
    _selection_corpus(tmp_path)
    run = make_run(tmp_path, eval={"selection": "sorted-ids"})
    first = select_test_documents(run)
    assert [d.id for d in first] == [d.id for d in select_test_documents(run)]
    per_task = {}
    for d in first:
        per_task.setdefault(d.domain, []).append(d)
    # 20% rounded, at least one per task; tasks sorted by name
    assert {t: len(v) for t, v in per_task.items()} == {"ArXiv": 1, "Enron Emails": 1, "Github": 2}
    assert [d.domain for d in first] == sorted(d.domain for d in first)
    ours = {"selection": "sorted-ids"}
    half = select_test_documents(make_run(tmp_path, eval={"portion": 0.5, **ours}))
    assert sum(d.domain == "Github" for d in half) == 5
    # a different seed shuffles differently; a task's selection ignores the other tasks
    other_seed = make_run(tmp_path, eval={"portion": 0.5, "seed": 7, **ours})
    assert [d.id for d in select_test_documents(other_seed)] != [d.id for d in half]
    only = select_test_documents(
        make_run(tmp_path, eval={"portion": 0.5, "tasks": ["Github"], **ours})
    )
    assert [d.id for d in only] == [d.id for d in half if d.domain == "Github"]
    capped = select_test_documents(
        make_run(tmp_path, eval={"portion": 1.0, "maxDocumentsPerTask": 3, **ours})
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


def test_the_strided_split_is_the_references_per_task(tmp_path):
    docs = [(["Github", "ArXiv"][i % 2], "x" * (1 + i)) for i in range(23)]
    write_jsonl(tmp_path / "test.jsonl", docs)
    selected = select_test_documents(make_run(tmp_path, eval={"portion": 1.0}))
    by_task: dict[str, list] = {}
    for d in selected:
        by_task.setdefault(d.domain, []).append(d.id)
    for world in (1, 2, 3, 32):
        parts = [partition(selected, r, world, "strided") for r in range(world)]
        for r, part in enumerate(parts):
            # tttlm: per task, np.arange(rank, len(task_docs), world_size)
            want = [i for task in by_task.values() for i in task[r::world]]
            assert [d.id for d in part] == want
        ids = sorted(d.id for p in parts for d in p)
        assert ids == sorted(d.id for d in selected)
    # greedy by bytes would put the longest documents elsewhere: not the same split
    assert partition(selected, 0, 3, "strided") != partition(selected, 0, 3)
    with pytest.raises(EvalError, match="split 'x' is not one of"):
        partition(selected, 0, 2, "x")


def test_a_carried_optimizer_splits_strided_and_records_the_world_size(tmp_path, model_dir):
    from ttt.store import open_store

    tiny_corpus(tmp_path, per_task=4)
    run = make_run(
        tmp_path,
        ttt={**TINY_TTT, "model": str(model_dir), "evalAfter": [0, 1],
             "optimizer": "adamw", "weightDecay": 0.01, "resetOptimizer": False},
        retrieval=TINY_RETRIEVAL,
        eval={"portion": 1.0, "tasks": ["Github"]},
    )  # fmt: skip
    store = open_store(run.spec.storage)
    retriever = local_retriever(run, tmp_path / "shards")
    selected = [d.id for d in select_test_documents(run, store)]
    for rank in (0, 1):
        manifest = evaluate_rank(
            run, store, rank, 2, retriever=retriever, work_dir=tmp_path / "w", progress=False
        )
        assert manifest["split"] == "strided" and manifest["world_size"] == 2
        records = parse_results(
            store.get_bytes(f"{run.prefix}/eval/rank-{rank:05d}/results.jsonl"), "r"
        )
        assert [r["doc"] for r in records] == selected[rank::2]
        assert {(r["world_size"], r["split"]) for r in records} == {(2, "strided")}


def test_lines_the_reader_skips_keep_their_place_in_the_sample(tmp_path):
    """tttlm reads every line: an empty text or a lone surrogate is a document of its task in
    the shuffle; ours are skipped after the sample is drawn, so the rest is the reference's."""
    import random

    lines, ids = [], {"Github": [], "ArXiv": []}
    for i in range(40):
        task = ["Github", "ArXiv"][i % 3 == 0]
        text = f"document {i} " * 3
        if i in (4, 11, 25):
            text = ""  # empty: skipped by our reader
        raw = json.dumps({"text": text, "meta": {"pile_set_name": task}})
        if i == 17:
            raw = raw.replace(f"document {i}", "broken \\ud800 text")  # a lone surrogate
        lines.append(raw)
        ids[task].append(f"test:{i + 1}")
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    bad = {"test:5", "test:12", "test:26", "test:18"}
    run = make_run(tmp_path, eval={"portion": 0.5})
    # the reference: every line of a task in file order, Random(1216).shuffle, first int(0.5 n)
    want = []
    for task in sorted(ids):
        pool = list(ids[task])
        random.Random(1216).shuffle(pool)
        want += pool[: int(0.5 * len(pool))]
    got = [d.id for d in select_test_documents(run)]
    assert got == [i for i in want if i not in bad]
    assert bad & set(want)  # the case is real: some skipped lines were drawn
    # with `skipped`, placeholders keep the reference's positions for the ranks' split
    skipped: set[str] = set()
    placed = select_test_documents(run, skipped=skipped)
    assert [d.id for d in placed] == want and skipped == bad & set(want)
    assert all(d.text == "" and d.nbytes == 0 for d in placed if d.id in skipped)


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
        Neighbor("d", "Github", 16.0, 0, 3, "far away"),  # Euclidean 4.0: not < 4.0
        Neighbor("e", "Github", 9.0, 0, 4, "within"),  # squared 9 = Euclidean 3 < 4.0: used
    ]
    kept, excluded = guard_neighbors(doc, neighbors, run.spec.retrieval)
    assert [n.id for n in kept] == ["a", "e"]
    assert [n.id for n in excluded] == ["c", "b"]  # nearest first
    off = make_run(tmp_path, retrieval={"excludeIdentical": False}).spec.retrieval
    kept, excluded = guard_neighbors(doc, neighbors, off)
    assert [n.id for n in kept] == ["c", "b", "a", "e"] and excluded == []


class _Texts:
    """A shard's text store of hand-written rows (id, domain, text)."""

    def __init__(self, rows):
        self.rows = rows

    def meta(self, r):
        return self.rows[r][:2]

    def text(self, r):
        return self.rows[r][2]

    def __len__(self):
        return len(self.rows)


def test_the_threshold_is_euclidean_on_hand_placed_vectors(tmp_path):
    """Vectors at Euclidean 1, 3, 3.9, 4 and 5 from the query: 4.0 keeps the first three.

    FAISS returns squared L2 (1, 9, 15.21, 16, 25): comparing 4.0 against those would keep one.
    """
    import faiss

    from ttt.index.retrieval import LocalRetriever
    from ttt.train import select_neighbors

    at = [1.0, 3.0, 3.9, 4.0, 5.0]
    vectors = np.zeros((len(at), 4), dtype=np.float32)
    vectors[:, 0] = at
    index = faiss.IndexFlatL2(4)
    index.add(vectors)
    texts = _Texts([(f"n{i}", "Github", f"neighbor {i}") for i in range(len(at))])
    query = np.zeros((1, 4), dtype=np.float32)
    retriever = LocalRetriever(None, [index], [texts], k=5, distance_threshold=4.0)
    (result,) = retriever.search_vectors(query)
    assert [n.id for n in result.neighbors] == ["n0", "n1", "n2"]
    assert [n.distance for n in result.neighbors] == pytest.approx([1.0, 9.0, 15.21], rel=1e-5)
    # the eval guard, on every candidate: the same cut
    (everything,) = LocalRetriever(None, [index], [texts], k=5).search_vectors(query)
    run = make_run(tmp_path)  # spec default distanceThreshold: 4.0
    kept, _ = guard_neighbors("the test document", everything.neighbors, run.spec.retrieval)
    assert [n.id for n in kept] == ["n0", "n1", "n2"]
    # train's rule takes Euclidean distances and keeps those < 4.0
    chosen = select_neighbors("doc", ["a", "b", "c", "d", "e"], at, distance_threshold=4.0)
    assert chosen.texts == ["a", "b", "c"] and chosen.dropped_distance == 2


# --- the worker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # A 2-layer GPT-2 of width 32 and 64 positions with GPT-2's real tokenizer.
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), n_positions=64, n_embd=32, n_inner=64)


def _results(store, run) -> list[dict]:
    return parse_results(store.get_bytes(f"{run.prefix}/eval/rank-00000/results.jsonl"), "r")


def test_evaluate_rank_records_every_document_once(tmp_path, model_dir):
    from ttt.store import open_store

    leaked_id = tiny_corpus(tmp_path, per_task=4)
    run = worker_run(tmp_path, model_dir)
    store = open_store(run.spec.storage)
    retriever = local_retriever(run, tmp_path / "shards")
    selected = select_test_documents(run)
    from prometheus_client import REGISTRY

    def scored_bytes(rank: str) -> float:
        labels = {"rank": rank, "task": "Github", "phase": "after"}
        return REGISTRY.get_sample_value("ttt_eval_scored_bytes_total", labels) or 0.0

    bytes_before = [scored_bytes("0"), scored_bytes("1")]
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
        assert rec["distance_unit"] == "euclidean"
        assert rec["distances"] == sorted(rec["distances"])
        assert rec["bytes"] == len(next(d for d in selected if d.id == rec["doc"]).text)
        assert set(rec["seconds"]) == {"retrieve", "train", "score"}
        assert rec["partial"] is False and rec["failed_shards"] == []
    # the test document copied into the training corpus was retrieved and excluded
    excluded = {r["doc"]: r["excluded"] for r in records}
    assert excluded.pop(leaked_id) == 1 and set(excluded.values()) == {0}
    # the worker's metrics: nothing pending, bits per byte before and after per task

    assert REGISTRY.get_sample_value("ttt_eval_documents_pending", {"rank": "1"}) == 0
    for phase in ("before", "after"):
        labels = {"rank": "0", "task": "Github", "phase": phase}
        nats = REGISTRY.get_sample_value("ttt_eval_loss_nats_total", labels)
        scored = REGISTRY.get_sample_value("ttt_eval_scored_bytes_total", labels)
        assert scored > 0 and nats > 0
    # Counters of bytes per rank, so a dashboard weighs ranks by their bytes.
    for r in range(2):
        mine = [d.nbytes for d in partition(selected, r, 2) if d.domain == "Github"]
        assert scored_bytes(str(r)) - bytes_before[r] == sum(mine)
    # a finished rank is not redone
    again = evaluate_rank(run, store, 0, 2, retriever=Refuse(), progress=False)
    assert again["count"] == manifests[0]["count"]


def test_carried_optimizer_state_starts_afresh_with_each_task(tmp_path, model_dir):
    """resetOptimizer false: Adam's state crosses documents within a task, never tasks."""
    from ttt.store import open_store

    tiny_corpus(tmp_path, per_task=4)

    def github_scores(tasks, root, reset):
        run = make_run(
            tmp_path,
            ttt={
                **TINY_TTT,
                "model": str(model_dir),
                "evalAfter": [0, 2],
                "optimizer": "adamw",
                "weightDecay": 0.01,
                "resetOptimizer": reset,
            },
            retrieval=TINY_RETRIEVAL,
            eval={"portion": 0.5, "tasks": tasks},
            storage={"root": str(tmp_path / root)},
        )
        store = open_store(run.spec.storage)
        retriever = local_retriever(run, tmp_path / f"shards-{root}")
        evaluate_rank(
            run, store, 0, 1, retriever=retriever, work_dir=tmp_path / root, progress=False
        )
        return [r["loglik"]["2"] for r in _results(store, run) if r["task"] == "Github"]

    both = github_scores(["ArXiv", "Github"], "both", reset=False)  # ArXiv's documents first
    alone = github_scores(["Github"], "alone", reset=False)
    assert len(both) == 2 and both == alone  # Github starts with a fresh optimizer either way
    fresh = github_scores(["Github"], "fresh", reset=True)
    # resetOptimizer true runs the ensemble engine (equal to the loop up to float rounding)
    assert fresh[0] == pytest.approx(alone[0], rel=1e-6)  # the task's first: nothing carried
    assert fresh[1] != pytest.approx(alone[1], rel=1e-6)  # the second: the first one's moments


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
    run, store, inner = tiny_worker(tmp_path, model_dir, 4, evalAfter=[0])
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
    from ttt.eval.records import load_existing, write_records
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


class Killed(Exception):
    """The test's stand-in for a pod killed in the middle of a document."""


class Stepper:
    """A retriever the test drives a document at a time; `entered` says a search began
    (so every earlier document is written and uploaded, flush_seconds=0)."""

    def __init__(self, inner) -> None:
        self.inner, self.kill = inner, False
        self.go, self.entered = threading.Semaphore(0), threading.Semaphore(0)

    def search(self, texts, k=None, with_text=True):
        self.entered.release()
        assert self.go.acquire(timeout=60)
        if self.kill:
            raise Killed
        return self.inner.search(texts, k=k, with_text=with_text)

    def step(self) -> None:
        self.go.release()
        assert self.entered.acquire(timeout=60)


@pytest.mark.slow
def test_two_writers_on_one_rank_lose_nothing_and_count_nothing_twice(tmp_path, model_dir):
    from ttt.report import build_report

    # the sequential loop: the steps below follow its one search ahead (the ensemble's feed
    # searches on its own thread, as far ahead as its members need)
    run, store, inner = tiny_worker(tmp_path, model_dir, 4, evalAfter=[0], engine="sequential")
    mine = partition(select_test_documents(run), 0, 1)
    prefix = f"{run.prefix}/eval/rank-00000"
    pods = {name: Stepper(inner) for name in ("old", "new")}
    errors: dict[str, BaseException] = {}

    def pod(name: str) -> None:
        try:
            evaluate_rank(
                run, store, 0, 1, retriever=pods[name], work_dir=tmp_path / name,
                flush_seconds=0.0, progress=False,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors[name] = exc

    threads = {name: threading.Thread(target=pod, args=(name,)) for name in pods}
    threads["old"].start()
    assert pods["old"].entered.acquire(timeout=60)  # the old pod is at its first document
    threads["new"].start()  # the replacement starts while the old one still runs
    assert pods["new"].entered.acquire(timeout=60)
    # The engine retrieves one document ahead of the one it trains: a document is written
    # when the search after next begins.
    for _ in range(3):
        pods["old"].step()  # the old pod finished two documents
    for _ in range(2):
        pods["new"].step()  # the new one, one (the old pod's first, which it had not seen)
    for name in ("old", "new"):  # the old pod dies first, the new one's upload comes last
        pods[name].kill = True
        pods[name].go.release()
        threads[name].join(60)
        assert isinstance(errors[name], Killed)
    # Each attempt wrote its own file: the old pod's second document survived the new
    # pod's upload (with one shared file, the last upload held one document).
    assert len(store.list(f"{prefix}/attempts/")) == 2
    assert {r["doc"] for r in rank_results(store, prefix)} == {d.id for d in mine[:2]}
    third = Counting(inner)
    evaluate_rank(run, store, 0, 1, retriever=third, work_dir=tmp_path / "c", progress=False)
    assert len(third.texts) == len(mine) - 2  # nothing done twice
    records = _results_of(store, prefix)
    assert sorted(r["doc"] for r in records) == sorted(d.id for d in mine)
    assert store.list(f"{prefix}/attempts/") == []
    assert build_report(run, store, out_dir=tmp_path / "r")["documents"] == len(mine)


class FlakyShards:
    """A retriever whose shards are down for the first `down` searches."""

    def __init__(self, inner, down: int) -> None:
        self.inner, self.down, self.calls = inner, down, 0

    def search(self, texts, k=None, with_text=True):
        from ttt.index.retrieval import ShardsUnavailable

        self.calls += 1
        if self.calls <= self.down:
            raise ShardsUnavailable("1 of 2 shard(s) answered (failed: [1])", [1])
        return self.inner.search(texts, k=k, with_text=with_text)


def test_a_missing_shard_makes_the_worker_wait_not_record(tmp_path, model_dir, caplog):
    from prometheus_client import REGISTRY

    run, store, inner = tiny_worker(tmp_path, model_dir, 2, {"waitSeconds": 30}, evalAfter=[0, 2])
    waits = REGISTRY.get_sample_value("ttt_eval_retrieval_waits_total", {"rank": "0"}) or 0
    flaky = FlakyShards(inner, down=2)
    with caplog.at_level("WARNING", logger="ttt.eval"):
        evaluate_rank(run, store, 0, 1, retriever=flaky, work_dir=tmp_path / "w", progress=False)
    records = _results_of(store, f"{run.prefix}/eval/rank-00000")
    assert records and all(r["neighbors"] == 2 and not r["partial"] for r in records)
    assert REGISTRY.get_sample_value("ttt_eval_retrieval_waits_total", {"rank": "0"}) == waits + 2
    assert REGISTRY.get_sample_value("ttt_eval_waiting_for_shards", {"rank": "0"}) == 0
    assert "waiting 1.0 s for shard(s) [1]" in caplog.text


def test_shards_that_never_come_back_fail_the_worker_after_wait_seconds(tmp_path, model_dir):
    from ttt.store import open_store

    tiny_corpus(tmp_path, per_task=2)
    run = worker_run(tmp_path, model_dir, {"waitSeconds": 0.3}, evalAfter=[0])
    store = open_store(run.spec.storage)
    never = FlakyShards(None, down=10**9)
    with pytest.raises(EvalError, match=r"shards \[1\] did not answer .*waitSeconds"):
        evaluate_rank(run, store, 0, 1, retriever=never, work_dir=tmp_path / "w", progress=False)
    assert store.read_manifest(f"{run.prefix}/eval/rank-00000") is None  # nothing recorded


def test_a_finished_rank_survives_a_change_of_operational_retrieval_knobs(tmp_path, model_dir):
    run, store, retriever = tiny_worker(tmp_path, model_dir, 2, evalAfter=[0])
    done = evaluate_rank(run, store, 0, 1, retriever=retriever, work_dir=tmp_path / "w")
    knobs = {"timeoutSeconds": 99, "retries": 7, "deadlineSeconds": 5, "waitSeconds": 1}
    tuned = worker_run(tmp_path, model_dir, knobs, evalAfter=[0])
    again = evaluate_rank(tuned, store, 0, 1, retriever=Refuse(), work_dir=tmp_path / "w2")
    assert again["count"] == done["count"] and again["files"] == done["files"]


def test_partial_records_are_evaluated_again_unless_partial_is_allowed(tmp_path, model_dir):
    run, store, inner = tiny_worker(tmp_path, model_dir, 2, evalAfter=[0])
    prefix = f"{run.prefix}/eval/rank-00000"
    evaluate_rank(run, store, 0, 1, retriever=inner, work_dir=tmp_path / "w", progress=False)
    records = _results_of(store, prefix)
    # an older worker that allowed partial results recorded the first document partial
    records[0] = {**records[0], "partial": True, "failed_shards": [1]}
    store.put_bytes(f"{prefix}/attempts/old.jsonl", b"".join(
        json.dumps(r).encode() + b"\n" for r in records
    ))  # fmt: skip
    store.delete(f"{prefix}/results.jsonl")
    store.delete(f"{prefix}/manifest.json")
    again = Counting(inner)
    evaluate_rank(run, store, 0, 1, retriever=again, work_dir=tmp_path / "w2", progress=False)
    assert len(again.texts) == 1  # only the partial one
    assert not any(r["partial"] for r in _results_of(store, prefix))


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
    run = worker_run(crashed, model_dir)
    store = open_store(run.spec.storage)
    prefix = f"{run.prefix}/eval/rank-00000"
    # the kill comes at the fourth search; the engine retrieves one document ahead of the
    # one it trains (ensemble of one on a CPU), so two documents had finished
    assert len(rank_results(store, prefix)) == 2
    assert store.read_manifest(prefix) is None
    # a crash in the middle of an upload on a store without atomic writes: a torn tail
    (key,) = store.list(f"{prefix}/attempts/")  # the killed attempt's own file
    store.put_bytes(key, store.get_bytes(key) + b'{"doc": "test:9", "task": "Git')

    second = start(crashed, "pod-2")  # a fresh pod: nothing local survives
    out = second.communicate(timeout=120)[0].decode()
    assert second.returncode == 0, out

    records = _results(store, run)
    assert len(records) == len({r["doc"] for r in records}) == 8
    assert store.list(f"{prefix}/attempts/") == []  # covered by the results: removed
    clean_run = worker_run(clean, model_dir)
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


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_rank_resumes_its_carried_optimizer_and_equals_an_uninterrupted_run(
    tmp_path, model_dir
):
    """resetOptimizer false: the optimizer state saved with the record boundary (checksummed)
    carries the resumed task on, so the results equal an uninterrupted run's exactly."""
    import torch

    from ttt.eval.carried import CarriedState
    from ttt.store import open_store

    def start(tmp: Path, work: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "worker", str(tmp), str(model_dir), str(tmp / work)]
        return subprocess.Popen(
            [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    for tmp in (crashed, clean):
        tmp.mkdir()
        tiny_corpus(tmp)
    # killed at the 5th document's search: the engine reads one document ahead, so the
    # 4th had not started training and 3 had finished
    first = start(crashed, "pod-1", "4", "carried")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker_main([str(clean), str(model_dir), str(clean / "pod"), "carried"])
    finally:
        torch.set_num_threads(threads)
    out = first.communicate(timeout=120)[0].decode()
    assert first.returncode == -signal.SIGKILL, out
    run = worker_run(crashed, model_dir, **CARRIED)
    store = open_store(run.spec.storage)
    prefix = f"{run.prefix}/eval/rank-00000"
    done = rank_results(store, prefix)
    assert len(done) == 3 and len({r["task"] for r in done}) == 1  # mid-task: 3 of its 4
    (state,) = CarriedState(store, prefix, run.stage_hash("eval")).saved()
    assert state["records"] == 3 and state["doc"] == done[-1]["doc"]

    second = start(crashed, "pod-2", "carried")  # a fresh pod: nothing local survives
    out = second.communicate(timeout=120)[0].decode()
    assert second.returncode == 0, out
    clean_run = worker_run(clean, model_dir, **CARRIED)
    got = {r["doc"]: r for r in _results(store, run)}
    want = {r["doc"]: r for r in _results(open_store(clean_run.spec.storage), clean_run)}
    assert sorted(got) == sorted(want) and len(got) == 8
    for doc, r in want.items():
        assert got[doc]["loglik"] == pytest.approx(r["loglik"], rel=1e-9, abs=0), doc
        assert got[doc]["train_losses"] == pytest.approx(r["train_losses"], rel=1e-9), doc
    # the three finished documents were kept, not evaluated again (their timings are the
    # killed pod's), so the fourth resumed from the saved state, not from the task's start
    for r in done:
        assert got[r["doc"]]["seconds"] == r["seconds"]
    assert CarriedState(store, prefix, run.stage_hash("eval")).saved()[0]["records"] == 8


def test_the_carried_ensemble_killed_and_resumed_equals_the_loop(tmp_path, model_dir):
    """resetOptimizer false on the ensemble: two members, each a task; records come in the
    order documents finish, a kill leaves them interleaved, and the resumed rank still gives
    every document the sequential loop's result (float32, 1e-4 relative)."""
    from ttt.store import open_store

    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    for tmp in (crashed, clean):
        tmp.mkdir()
        tiny_corpus(tmp)
    first = _start_worker(crashed, model_dir, "pod-1", "5", "carried", "ensemble")
    worker_main([str(clean), str(model_dir), str(clean / "pod"), "carried"])  # the loop
    out = first.communicate(timeout=180)[0].decode()
    assert first.returncode == -signal.SIGKILL, out
    run = worker_run(crashed, model_dir, **(CARRIED | {"engine": "ensemble", "ensembleSize": 2}))
    store = open_store(run.spec.storage)
    done = rank_results(store, f"{run.prefix}/eval/rank-00000")
    assert len({r["task"] for r in done}) == 2  # both tasks had trained at once
    second = _start_worker(crashed, model_dir, "pod-2", "carried", "ensemble")
    out = second.communicate(timeout=180)[0].decode()
    assert second.returncode == 0, out
    clean_run = worker_run(clean, model_dir, **CARRIED)
    got = {r["doc"]: r for r in _results(store, run)}
    want = {r["doc"]: r for r in _results(open_store(clean_run.spec.storage), clean_run)}
    assert sorted(got) == sorted(want) and len(got) == 8
    for doc, r in want.items():
        assert got[doc]["loglik"] == pytest.approx(r["loglik"], rel=1e-4), doc
        assert got[doc]["train_losses"] == pytest.approx(r["train_losses"], rel=1e-4), doc


def _start_worker(tmp: Path, model_dir, work: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "worker", str(tmp), str(model_dir), str(tmp / work)]
    return subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} worker TMP MODEL WORK [KILL_AFTER]")
