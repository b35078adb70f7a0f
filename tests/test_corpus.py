"""Tests for ttt.corpus: reading every format, bad lines, shards and the text store."""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard

from ttt.corpus import (
    CorpusError,
    CorpusStats,
    TextStore,
    collect_stats,
    iter_documents,
    shard_of,
    text_store_files,
    write_text_shards,
)

DOMAINS = ["Github", "Wikipedia (en)", "ArXiv", "PubMed Central"]


def record(i: int, domain: str | None = None) -> dict:
    """A Pile-format record whose text has multi-byte characters (bytes != characters)."""
    meta = {"pile_set_name": domain or DOMAINS[i % len(DOMAINS)]}
    return {"text": f"document {i}: naïve café ∑ {'x' * (i % 7)}", "meta": meta}


def lines_of(records: list[dict]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]


def write(path: Path, lines: list[bytes], frames: int = 1) -> Path:
    """Write lines as .jsonl, or as .jsonl.zst split over `frames` zstd frames."""
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".zst"):
        cut = [len(data) * k // frames for k in range(frames + 1)]
        c = zstandard.ZstdCompressor()
        data = b"".join(c.compress(data[a:b]) for a, b in itertools.pairwise(cut))
    path.write_bytes(data)
    return path


def corpus_files(tmp_path: Path, n_files: int = 3, per_file: int = 40) -> list[Path]:
    files = []
    for f in range(n_files):
        recs = [record(f * per_file + i) for i in range(per_file)]
        suffix = ".jsonl.zst" if f % 2 else ".jsonl"
        files.append(write(tmp_path / f"part-{f:02d}{suffix}", lines_of(recs), frames=3))
    return files


# ---------------------------------------------------------------- reading


def test_jsonl_and_zst_give_the_same_documents(tmp_path: Path) -> None:
    recs = [record(i) for i in range(25)]
    plain = list(iter_documents([str(write(tmp_path / "a.jsonl", lines_of(recs)))]))
    # Several frames: Pile files are often concatenations; the reader must cross frames.
    zst = list(iter_documents([str(write(tmp_path / "b.jsonl.zst", lines_of(recs), 4))]))
    assert [d.text for d in plain] == [r["text"] for r in recs]
    assert [(d.text, d.domain, d.nbytes, d.line) for d in plain] == [
        (d.text, d.domain, d.nbytes, d.line) for d in zst
    ]
    assert [d.id for d in plain] == [f"a:{i}" for i in range(1, 26)]
    assert [d.id for d in zst] == [f"b:{i}" for i in range(1, 26)]
    assert zst[0].source == str(tmp_path / "b.jsonl.zst")


def test_document_fields(tmp_path: Path) -> None:
    lines = lines_of([{"text": "héllo", "meta": {"pile_set_name": "Enron Emails"}}])
    lines += [b'{"text": "no meta"}', b'{"text": "meta not a dict", "meta": 3}']
    lines += [b'{"text": "crlf line"}\r']
    docs = list(iter_documents([str(write(tmp_path / "x.jsonl", lines))]))
    assert docs[0].domain == "Enron Emails"
    assert docs[0].nbytes == len("héllo".encode()) == 6
    assert [d.domain for d in docs[1:3]] == ["unknown", "unknown"]
    assert docs[3].text == "crlf line"


def test_glob_is_sorted_and_directory_expands(tmp_path: Path) -> None:
    files = corpus_files(tmp_path, n_files=4, per_file=5)
    (tmp_path / "README.md").write_text("not a corpus file")
    stats = CorpusStats()
    docs = list(iter_documents([str(tmp_path / "part-*")], stats=stats))
    assert stats.files == [str(f) for f in files]
    assert [d.id.split(":")[0] for d in docs[::5]] == ["part-00", "part-01", "part-02", "part-03"]
    assert stats.total_documents == 20
    by_dir = list(iter_documents([str(tmp_path)]))
    assert [d.id for d in by_dir] == [d.id for d in docs]
    # A file named twice (explicitly and by a glob) is read once.
    twice = list(iter_documents([str(files[0]), str(tmp_path / "part-0[01]*")]))
    assert len(twice) == 10


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: [str(p / "nothing-*.jsonl")], "no files match"),
        (lambda p: [str(p / "missing.jsonl")], "no such file"),
        (lambda p: [str(write(p / "data.json", []))], "not a Pile-format file"),
        (
            lambda p: [str(write(p / "a.jsonl", [])), str(write(p / "a.jsonl.zst", []))],
            "share the stem 'a'",
        ),
        (lambda p: ["s3://bucket/train.jsonl"], "needs a store"),
    ],
)
def test_unreadable_inputs_are_named(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        list(iter_documents(setup(tmp_path)))


def test_corrupt_zstd_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl.zst", lines_of([record(i) for i in range(50)]))
    path.write_bytes(path.read_bytes()[:-20] + b"\x00" * 20)
    with pytest.raises(CorpusError, match=r"c\.jsonl\.zst: corrupt zstd stream"):
        list(iter_documents([str(path)]))


class DirBucket:
    """The two Store methods the reader uses, over a directory named as a bucket."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root, self.bucket = root, bucket
        self.fetched: list[str] = []

    def list(self, prefix: str) -> list[str]:
        keys = (p.relative_to(self.root).as_posix() for p in self.root.glob("train/*"))
        return [k for k in keys if k.startswith(prefix)]

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        # A cache may name its copy anything: the reader must go by the key, not this name.
        copy = self.root / ".cache" / f"{len(self.fetched)}.bin"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes((self.root / key).read_bytes())
        self.fetched.append(key)
        return copy


def test_s3_uris_resolve_through_the_store(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    files = corpus_files(tmp_path / "train", n_files=3, per_file=10)
    store = DirBucket(tmp_path, "pile")
    local = list(iter_documents([str(f) for f in files]))
    stats = CorpusStats()
    remote = list(iter_documents(["s3://pile/train/part-*"], store=store, stats=stats))
    assert [(d.id, d.text, d.domain) for d in remote] == [(d.id, d.text, d.domain) for d in local]
    assert stats.files == [f"s3://pile/train/{f.name}" for f in files]
    assert remote[0].source == "s3://pile/train/part-00.jsonl"
    one = list(iter_documents(["s3://pile/train/part-01.jsonl.zst"], store=store))
    assert [d.id for d in one] == [f"part-01:{i}" for i in range(1, 11)]
    with pytest.raises(CorpusError, match="bucket 'other' is not the store's bucket"):
        list(iter_documents(["s3://other/train/part-00.jsonl"], store=store))
    with pytest.raises(CorpusError, match="no objects match in bucket 'pile'"):
        list(iter_documents(["s3://pile/test/*.jsonl"], store=store))


def test_s3_corpus_on_a_real_s3_server(tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    from ttt.store import LocalStore, open_store

    store = open_store(endpoint=s3_server, bucket=s3_bucket, cache_dir=str(tmp_path / "cache"))
    files = corpus_files(tmp_path, n_files=3, per_file=20)
    for f in files:
        store.put_file(f, f"pile/train/{f.name}")
    store.put_bytes("pile/train/notes.txt", b"not matched by the glob")
    local = list(iter_documents([str(f) for f in files]))
    stats = CorpusStats()
    uri = f"s3://{s3_bucket}/pile/train/*.jsonl*"
    remote = list(iter_documents([uri], store=store, stats=stats))
    assert [(d.id, d.text, d.nbytes) for d in remote] == [(d.id, d.text, d.nbytes) for d in local]
    assert stats.files == [f"s3://{s3_bucket}/pile/train/{f.name}" for f in files]
    # Shards written from S3 equal those written from the local copies.
    write_text_shards([uri], 2, tmp_path / "from-s3", store=store, progress=False)
    write_text_shards([str(f) for f in files], 2, tmp_path / "from-disk", progress=False)
    assert shard_bytes(tmp_path / "from-s3") == shard_bytes(tmp_path / "from-disk")
    with pytest.raises(CorpusError, match="is not the store's bucket"):
        list(
            iter_documents(
                [f"s3://{s3_bucket}/pile/train/part-00.jsonl"], store=LocalStore(tmp_path)
            )
        )


# ---------------------------------------------------------------- bad lines

BAD_LINES = [
    (b'{"text": "caf\xe9"}', "invalid_utf8"),  # Latin-1 byte, not UTF-8
    (b'{"text": "\\ud800 lone surrogate"}', "invalid_utf8"),
    (b"", "blank_line"),
    (b'{"text": "unterminated', "malformed_json"),
    (b'["text", "a list"]', "not_an_object"),
    (b'{"meta": {"pile_set_name": "Github"}}', "missing_text"),
    (b'{"text": 42}', "text_not_string"),
    (b'{"text": null}', "text_not_string"),
    (b'{"text": ""}', "empty_text"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_every_bad_line_is_skipped_counted_and_located(
    tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = lines_of([record(i) for i in range(len(BAD_LINES) + 1)])
    lines: list[bytes] = []
    expected: dict[str, list[int]] = {}
    for k, (bad, reason) in enumerate(BAD_LINES):
        lines.append(good[k])
        lines.append(bad)
        expected.setdefault(reason, []).append(len(lines))  # 1-based line of the bad one
    lines.append(good[-1])
    path = write(tmp_path / f"mixed{suffix}", lines, frames=2)

    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="ttt.corpus"):
        docs = list(iter_documents([str(path)], stats=stats))
    assert len(docs) == len(good)
    # Ids count every physical line, so a good line keeps its id when a bad one is fixed.
    assert [d.line for d in docs] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert stats.bad_lines == {r: len(v) for r, v in expected.items()}
    for reason, line_numbers in expected.items():
        assert [(b.source, b.line) for b in stats.examples[reason]] == [
            (str(path), n) for n in line_numbers
        ]
        for n in line_numbers:
            assert f"{path}:{n}: {reason}" in caplog.text
    summary = stats.summary()
    assert re.search(rf"malformed_json +1  e\.g\. {re.escape(str(path))}:8\n", summary)
    assert "'text' is a JSON null" in caplog.text


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_strict_fails_on_the_first_bad_line(tmp_path: Path, bad: bytes, reason: str) -> None:
    path = write(tmp_path / "s.jsonl.zst", [*lines_of([record(0), record(1)]), bad, bad])
    with pytest.raises(CorpusError, match=rf"s\.jsonl\.zst:3: {reason} \("):
        list(iter_documents([str(path)], strict=True))


def test_examples_are_capped_but_counts_are_complete(tmp_path: Path) -> None:
    path = write(tmp_path / "many.jsonl", [b"{bad"] * 50 + lines_of([record(0)]))
    stats = CorpusStats(max_examples=3)
    assert len(list(iter_documents([str(path)], stats=stats))) == 1
    assert stats.bad_lines == {"malformed_json": 50}
    assert [b.line for b in stats.examples["malformed_json"]] == [1, 2, 3]
    report = stats.to_dict()
    assert report["bad_lines"] == {"malformed_json": 50}
    assert report["bad_line_examples"]["malformed_json"][0]["line"] == 1


def test_stats_count_documents_and_bytes_per_domain(tmp_path: Path) -> None:
    files = corpus_files(tmp_path, n_files=2, per_file=30)
    recs = [record(i) for i in range(60)]
    stats = collect_stats([str(f) for f in files], progress=False)
    for domain in DOMAINS:
        mine = [r for r in recs if r["meta"]["pile_set_name"] == domain]
        assert stats.documents[domain] == len(mine)
        assert stats.bytes[domain] == sum(len(r["text"].encode("utf-8")) for r in mine)
    assert stats.total_documents == 60


# ---------------------------------------------------------------- shards


def test_shard_of_is_stable_and_spread() -> None:
    # Pinned values: a change of hash would silently reshuffle every published corpus.
    assert [shard_of(f"00:{i}", 30) for i in range(1, 6)] == [0, 8, 20, 26, 5]
    counts = np.bincount([shard_of(f"f:{i}", 8) for i in range(8000)], minlength=8)
    assert counts.min() > 850 and counts.max() < 1150
    assert all(shard_of(f"x:{i}", 1) == 0 for i in range(10))
    with pytest.raises(ValueError, match="n_shards"):
        shard_of("a:1", 0)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_shards_are_deterministic_and_independent_of_input_order(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    files = corpus_files(tmp_path / "in", n_files=4, per_file=60)
    names = [str(f) for f in files]
    a = write_text_shards(names, 3, tmp_path / "a", progress=False)
    write_text_shards(names, 3, tmp_path / "b", progress=False)
    write_text_shards(names[::-1], 3, tmp_path / "c", progress=False)
    write_text_shards([str(tmp_path / "in" / "*")], 3, tmp_path / "d", progress=False)
    ref = shard_bytes(tmp_path / "a")
    assert sorted(ref) == sorted(
        f"shard-0000{s}/{n}" for s in range(3) for n in ("texts.zst", "offsets.npy", "docs.jsonl")
    )
    for other in "bcd":
        assert shard_bytes(tmp_path / other) == ref

    docs = {d.id: d for d in iter_documents(names)}
    seen: set[str] = set()
    for s in range(3):
        store = TextStore(tmp_path / "a" / f"shard-{s:05d}")
        assert all(shard_of(i, 3) == s for i in store.ids)
        assert a.shards[s]["documents"] == len(store)
        assert a.shards[s]["bytes"] == sum(docs[i].nbytes for i in store.ids)
        for row in range(len(store)):
            assert store.document(row).text == docs[store.ids[row]].text
        seen.update(store.ids)
    assert seen == set(docs)
    assert sum(s["documents"] for s in a.shards) == a.total_documents == 240


def test_more_shards_than_documents_gives_empty_stores(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny.jsonl", lines_of([record(0), record(1)]))
    stats = write_text_shards([str(path)], 16, tmp_path / "out", progress=False)
    sizes = [len(TextStore(tmp_path / "out" / f"shard-{s:05d}")) for s in range(16)]
    assert sum(sizes) == 2 and sizes.count(0) >= 14
    assert [s["documents"] for s in stats.shards] == sizes


def test_failed_strict_shard_leaves_no_store(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", [*lines_of([record(0)]), b"{oops"])
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        write_text_shards([str(path)], 2, tmp_path / "out", strict=True, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- text store


def random_texts(n: int, mean_chars: int, seed: int = 0) -> list[str]:
    """Incompressible-ish texts with multi-byte characters, so the store is really large."""
    rng = np.random.default_rng(seed)
    alphabet = list('abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,\n"\\é∑😀')
    # Slices of one random pool: each zstd frame is compressed alone, so this stays large.
    pool = "".join(rng.choice(alphabet, size=4 * mean_chars * 16))
    lengths = rng.integers(1, 2 * mean_chars, size=n)
    starts = rng.integers(0, len(pool) - 2 * mean_chars, size=n)
    return [pool[a : a + k] for a, k in zip(starts, lengths, strict=True)]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """About 20 MB of text in 4000 documents over two files, sharded into two text stores."""
    root = tmp_path_factory.mktemp("big")
    texts = random_texts(4000, 5000)
    recs = [{"text": t, "meta": {"pile_set_name": DOMAINS[i % 4]}} for i, t in enumerate(texts)]
    write(root / "big-0.jsonl.zst", lines_of(recs[:2000]), frames=2)
    write(root / "big-1.jsonl", lines_of(recs[2000:]))
    write_text_shards([str(root / "big-*")], 2, root / "shards", progress=False)
    return root / "shards", texts


def test_text_store_random_access_is_exact(big_corpus: tuple[Path, list[str]]) -> None:
    shards, texts = big_corpus
    corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert corpus_bytes > 20_000_000
    by_id = {f"big-{i // 2000}:{i % 2000 + 1}": t for i, t in enumerate(texts)}
    rng = np.random.default_rng(1)
    total = 0
    for s in range(2):
        with TextStore(shards / f"shard-{s:05d}") as store:
            total += len(store)
            assert (shards / f"shard-{s:05d}" / "texts.zst").stat().st_size > 5_000_000
            for row in rng.integers(0, len(store), size=300):
                doc_id, domain, nbytes = store.meta(row)
                assert store.ids[row] == doc_id and store.row_of(doc_id) == row
                assert store.text(row) == by_id[doc_id]
                assert nbytes == len(by_id[doc_id].encode("utf-8"))
                i = int(doc_id.split(":")[0][-1]) * 2000 + int(doc_id.split(":")[1]) - 1
                assert domain == DOMAINS[i % 4]
            last = store.document(len(store) - 1)
            assert last.text == by_id[last.id] and last.source == last.id.split(":")[0]
    assert total == 4000


def test_text_store_does_not_hold_texts(big_corpus: tuple[Path, list[str]]) -> None:
    shards, _ = big_corpus
    shard_bytes_on_disk = (shards / "shard-00000" / "texts.zst").stat().st_size
    tracemalloc.start()
    try:
        store = TextStore(shards / "shard-00000")
        for row in range(0, len(store), 7):
            store.text(row)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Ids, domain codes and sizes: a few hundred kB; one text at a time on top of that.
    assert peak < 1_500_000 < shard_bytes_on_disk // 5
    held = sum(len(v) for v in vars(store).values() if isinstance(v, str | bytes))
    assert held < 1000
    assert isinstance(store._offsets, np.memmap)
    store.close()


def test_text_store_serves_many_threads(big_corpus: tuple[Path, list[str]]) -> None:
    shards, texts = big_corpus
    by_id = {f"big-{i // 2000}:{i % 2000 + 1}": t for i, t in enumerate(texts)}
    store = TextStore(shards / "shard-00001")
    errors: list[str] = []

    def read(start: int) -> None:
        for row in range(start, len(store), 8):
            if store.text(row) != by_id[store.ids[row]]:
                errors.append(store.ids[row])

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.close()


def test_text_store_errors_are_clear(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", lines_of([record(i) for i in range(5)]))
    write_text_shards([str(path)], 1, tmp_path / "out", progress=False)
    shard = tmp_path / "out" / "shard-00000"
    assert set(text_store_files(shard)) == {"texts.zst", "offsets.npy", "docs.jsonl"}
    store = TextStore(shard)
    with pytest.raises(IndexError, match="row 5 out of range"):
        store.text(5)
    with pytest.raises(KeyError, match="t:99"):
        store.row_of("t:99")
    store.close()
    with open(shard / "docs.jsonl", "a") as fh:
        fh.write('{"id": "t:6", "domain": "x", "nbytes": 1}\n')
    with pytest.raises(CorpusError, match="docs.jsonl has 6 rows, offsets.npy 5"):
        TextStore(shard)
    (shard / "texts.zst").unlink()
    with pytest.raises(CorpusError, match="texts.zst: missing"):
        TextStore(shard)


# ---------------------------------------------------------------- CLI


def test_cli_stats_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ttt.cli import main

    path = write(tmp_path / "c.jsonl.zst", [*lines_of([record(i) for i in range(8)]), b"{x"])
    assert main(["corpus", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Github +2 +\d+", out) and re.search(r"total +8 ", out)
    assert re.search(rf"malformed_json +1  e\.g\. {re.escape(str(path))}:9", out)

    assert main(["corpus", "stats", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 8 and report["bad_lines"] == {"malformed_json": 1}
    assert report["domains"]["ArXiv"]["documents"] == 2
    assert report["bad_line_examples"]["malformed_json"][0]["line"] == 9

    assert main(["corpus", "stats", "--strict", str(path)]) == 1
    assert "c.jsonl.zst:9: malformed_json" in capsys.readouterr().err


def test_cli_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ttt.cli import main

    path = write(tmp_path / "d.jsonl", lines_of([record(i) for i in range(20)]))
    assert main(["corpus", "shard", str(path), "--shards", "3", "--out", str(tmp_path / "o")]) == 0
    assert "shard     2:" in capsys.readouterr().out
    assert sum(len(TextStore(tmp_path / "o" / f"shard-{s:05d}")) for s in range(3)) == 20


def test_cli_stats_reads_s3_through_the_spec_store(
    tmp_path: Path, s3_server: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ttt.cli import main
    from ttt.store import open_store

    path = write(tmp_path / "e.jsonl.zst", lines_of([record(i) for i in range(6)]))
    open_store(endpoint=s3_server, bucket=s3_bucket).put_file(path, "corpus/e.jsonl.zst")
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: t}\n"
        f"spec:\n  storage: {{endpoint: '{s3_server}', bucket: {s3_bucket}, "
        f"cacheDir: '{tmp_path / 'cache'}'}}\n"
    )
    uri = f"s3://{s3_bucket}/corpus/*.zst"
    assert main(["corpus", "stats", "--json", "--spec", str(spec), uri]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 6 and report["files"] == [f"s3://{s3_bucket}/corpus/e.jsonl.zst"]
    assert main(["corpus", "stats", uri]) == 1
    assert "needs a store" in capsys.readouterr().err
