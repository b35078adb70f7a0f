"""The committed demo corpus (examples/data) and the script that builds it."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from ttt.corpus import CorpusError, CorpusStats, iter_documents

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = EXAMPLES / "data"
SCRIPT = EXAMPLES / "build_demo_corpus.py"
OUTPUTS = ("train.jsonl.zst", "test.jsonl.zst", "bad-lines.jsonl", "PROVENANCE.md")


@pytest.fixture(scope="module")
def builder():
    """The build script as a module (it lives in examples/, outside the package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("build_demo_corpus")
    finally:
        sys.path.remove(str(EXAMPLES))


def read_split(path: Path) -> list[dict]:
    """Every line of a .jsonl.zst, parsed with nothing but json and zstandard."""
    with path.open("rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: read_split(DATA / f"{name}.jsonl.zst") for name in ("train", "test")}


def fingerprint_of(provenance: Path) -> str:
    match = re.search(r"Environment fingerprint: `([0-9a-f]{64})`", provenance.read_text())
    assert match, f"{provenance} has no environment fingerprint"
    return match.group(1)


def test_committed_splits_are_pile_format(splits, builder):
    for name, docs in splits.items():
        for i, doc in enumerate(docs, start=1):
            assert set(doc) == {"text", "meta"}, f"{name} line {i}"
            assert isinstance(doc["text"], str) and doc["text"].strip(), f"{name} line {i}"
            assert isinstance(doc["meta"]["pile_set_name"], str), f"{name} line {i}"
            nbytes = len(doc["text"].encode("utf-8"))
            assert builder.MIN_BYTES <= nbytes <= builder.MAX_BYTES, f"{name} line {i}: {nbytes}"


def test_domains_sizes_and_split(splits):
    train = Counter(d["meta"]["pile_set_name"] for d in splits["train"])
    test = Counter(d["meta"]["pile_set_name"] for d in splits["test"])
    shared = set(train) & set(test)
    assert len(shared) >= 4, (train, test)
    assert set(train) == set(test)
    assert all(30 <= n <= 60 for n in test.values()), test
    assert 2000 <= sum(train.values()) <= 6000
    assert all(train[d] >= 4 * test[d] for d in shared), (train, test)
    compressed = sum((DATA / f"{n}.jsonl.zst").stat().st_size for n in ("train", "test"))
    assert 1_000_000 <= compressed <= 4_000_000


def test_no_document_is_repeated(splits):
    texts = [d["text"] for docs in splits.values() for d in docs]
    assert len(texts) == len(set(texts))


def test_provenance_describes_the_committed_files(splits):
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    for name in ("train.jsonl.zst", "test.jsonl.zst", "bad-lines.jsonl"):
        row = re.search(
            rf"^\| {re.escape(name)} \| (\d+) \| (\d+) \| `([0-9a-f]+)` \|$", text, re.MULTILINE
        )
        assert row, f"PROVENANCE.md has no row for {name}"
        data = (DATA / name).read_bytes()
        assert int(row.group(2)) == len(data)
        assert row.group(3) == hashlib.sha256(data).hexdigest()
    domains = {d["meta"]["pile_set_name"] for d in splits["train"]}
    for domain in domains:
        section = text.split(f"## {domain}\n", 1)[1].split("\n## ", 1)[0]
        assert "- Source: " in section and "- Extraction: " in section
        assert re.search(r"^\| .+ \| \d+ \|$", section, re.MULTILINE), f"{domain}: no licence table"
    fingerprint_of(DATA / "PROVENANCE.md")


def test_bad_lines_hold_one_of_each_defect():
    path = DATA / "bad-lines.jsonl"
    stats = CorpusStats()
    docs = list(iter_documents([str(path)], stats=stats))
    assert [d.line for d in docs] == [1, 3, 5, 7, 9]
    assert len({d.domain for d in docs}) >= 4
    assert stats.bad_lines == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text": 1,
        "empty_text": 1,
    }
    with pytest.raises(CorpusError, match=r"bad-lines\.jsonl:2: malformed_json"):
        list(iter_documents([str(path)], strict=True))
    raw = path.read_bytes().split(b"\n")
    with pytest.raises(UnicodeDecodeError):
        raw[3].decode("utf-8")


def test_split_text_cuts_at_lines_within_bounds(builder):
    lines = [f"line {i}: " + "word " * (i % 30) for i in range(2000)]
    pieces = builder.split_text("\n".join(lines))
    sizes = [len(p.encode("utf-8")) for p in pieces]
    assert len(pieces) > 10
    assert all(builder.MIN_BYTES <= n <= builder.MAX_BYTES for n in sizes), sizes
    kept = [ln for p in pieces for ln in p.split("\n")]
    assert kept == lines  # cut only between lines: nothing lost, nothing reordered
    assert builder.split_text("short text") == []
    whole = "x" * builder.MIN_BYTES
    assert builder.split_text(whole) == [whole]
    huge_line = "é" * 20_000  # one line, 2 bytes a character
    pieces = builder.split_text(huge_line)
    assert "".join(pieces) == huge_line
    assert all(len(p.encode("utf-8")) <= builder.MAX_BYTES for p in pieces)


@pytest.mark.slow
def test_script_is_deterministic_and_reproduces_the_committed_files(tmp_path):
    """Rebuild; in the committed environment the bytes must match the committed files."""

    def build(out: Path) -> dict[str, bytes]:
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True)
        return {name: (out / name).read_bytes() for name in OUTPUTS}

    first = build(tmp_path / "a")
    if fingerprint_of(tmp_path / "a" / "PROVENANCE.md") == fingerprint_of(DATA / "PROVENANCE.md"):
        reference = {name: (DATA / name).read_bytes() for name in OUTPUTS}
    else:
        # Other package or Debian versions here: the committed files cannot be rebuilt
        # byte for byte, but a second build on this machine still must match the first.
        reference = build(tmp_path / "b")
    for name in OUTPUTS:
        assert first[name] == reference[name], f"{name} differs between builds"


@pytest.mark.slow
def test_missing_source_is_skipped_and_recorded(tmp_path, monkeypatch, builder):
    monkeypatch.setenv("PATH", str(tmp_path))  # no groff: the man pages cannot be rendered
    splits = builder.build(tmp_path / "out")
    assert splits["Man Pages"] == ([], [])
    text = (tmp_path / "out" / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "- SKIPPED: groff is not installed" in text
    domains = {d["meta"]["pile_set_name"] for d in read_split(tmp_path / "out" / "test.jsonl.zst")}
    assert "Man Pages" not in domains and len(domains) == 4
