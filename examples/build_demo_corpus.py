"""Build the multi-domain demo corpus (examples/data) from text found offline on this machine.

Usage: python examples/build_demo_corpus.py [--out DIR]

Writes train.jsonl.zst and test.jsonl.zst in the Pile's format, bad-lines.jsonl (good lines
around one line of each defect the corpus reader must survive) and PROVENANCE.md. The same
machine gives byte-identical files on every run: inputs are sorted, every random choice is
seeded, zstd runs single-threaded at a fixed level and nothing records a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_math
import demo_sources as sources

SEED = "ttt-nn-demo-1216"
ZSTD_LEVEL = 19
TARGET_BYTES, MAX_BYTES, MIN_BYTES = 3500, 6000, 400  # document length, at line boundaries
TEST_PER_DOMAIN = 50
# Documents (train + test) per domain and the most any one package/module family may give,
# so that no single group dominates a domain and every group has related documents.
BUDGET = {
    "Github": (1300, 90),
    "Python Docs": (700, 150),
    "Licenses": (600, 600),
    "Man Pages": (800, 120),
    "Generated Math": (500, 50),
}
MAN_PAGES_RENDERED = 320
MATH_UNITS_PER_MODULE = 50


@dataclass
class Doc:
    """One corpus document and where it came from."""

    domain: str
    origin: str
    group: str
    licence: str
    text: str


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def split_text(text: str) -> list[str]:
    """Cut a text into pieces of about TARGET_BYTES at line boundaries, none over MAX_BYTES."""
    text = text.strip("\n")
    total = _nbytes(text)
    if total <= MAX_BYTES:
        return [text] if total >= MIN_BYTES else []
    goal = total / math.ceil(total / TARGET_BYTES)
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        n = _nbytes(line) + 1
        while n > MAX_BYTES:  # a single huge line (minified data): cut it by characters
            if current:
                pieces.append("\n".join(current))
                current, size = [], 0
            pieces.append(line[: MAX_BYTES // 4])  # a character is at most 4 bytes
            line = line[MAX_BYTES // 4 :]
            n = _nbytes(line) + 1
        # Prefer a cut before a blank line once the piece is long enough: paragraphs,
        # functions and man-page sections then stay whole.
        if size + n > MAX_BYTES or (size >= goal and not line.strip()) or size >= 1.3 * goal:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        if pieces and size < MIN_BYTES and _nbytes(pieces[-1]) + size <= MAX_BYTES:
            pieces[-1] += "\n" + "\n".join(current)
        else:
            pieces.append("\n".join(current))
    return [p.strip("\n") for p in pieces if _nbytes(p.strip("\n")) >= MIN_BYTES]


def select_documents(src: sources.Source, budget: int, per_group: int, seen: set[str]) -> list[Doc]:
    """Whole units in seeded random order until the domain's budget of documents is reached.

    A piece whose exact text was already taken (a vendored copy, a boilerplate file) is
    dropped, so that no test document has its own copy in train.
    """
    units = list(src.units)
    random.Random(f"{SEED}/select/{src.domain}").shuffle(units)
    docs: list[Doc] = []
    taken: Counter[str] = Counter()
    for unit in units:
        if len(docs) >= budget:
            break
        if taken[unit.group] >= per_group:
            continue
        pieces = [p for p in split_text(unit.text) if p not in seen]
        pieces = pieces[: per_group - taken[unit.group]]
        seen.update(pieces)
        taken[unit.group] += len(pieces)
        docs += [Doc(src.domain, unit.origin, unit.group, unit.licence, p) for p in pieces]
    return docs[:budget]


def split_train_test(docs: list[Doc], domain: str) -> tuple[list[Doc], list[Doc]]:
    """A seeded random split per domain: pieces of one file land on both sides."""
    order = list(range(len(docs)))
    random.Random(f"{SEED}/split/{domain}").shuffle(order)
    n_test = min(TEST_PER_DOMAIN, len(docs) // 5)
    test = {i for i in order[:n_test]}
    return [d for i, d in enumerate(docs) if i not in test], [docs[i] for i in sorted(test)]


def jsonl_line(doc: Doc) -> str:
    return json.dumps({"text": doc.text, "meta": {"pile_set_name": doc.domain}}, ensure_ascii=False)


def write_zst(path: Path, docs: list[Doc]) -> bytes:
    """Shuffled like the Pile (domains interleaved), compressed single-threaded at a fixed level."""
    order = list(docs)
    random.Random(f"{SEED}/shuffle/{path.name}").shuffle(order)
    raw = "".join(jsonl_line(d) + "\n" for d in order).encode("utf-8")
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compress(raw)
    path.write_bytes(data)
    return data


def bad_lines(test: list[Doc]) -> tuple[bytes, list[tuple[int, str]]]:
    """Real good lines with one line of each defect between them; returns (bytes, defects)."""
    if not test:
        raise SystemExit("no test documents at all: every source is missing")
    by_domain: dict[str, list[Doc]] = {}
    for doc in sorted(test, key=lambda d: (_nbytes(d.text), d.text)):
        by_domain.setdefault(doc.domain, []).append(doc)
    # The shortest documents, one domain after another, keep the file small and varied.
    short = [docs[i] for i in range(6) for docs in by_domain.values() if i < len(docs)][:6]
    short = (short * 6)[:6]
    good = [jsonl_line(d).encode("utf-8") for d in short[:5]]
    broken_json = jsonl_line(short[5])[:120].encode("utf-8")
    invalid_utf8 = (
        b'{"text": "caf\xc3 au lait \xff\xfe costs 3\x80", "meta": {"pile_set_name": "Github"}}'
    )
    missing = b'{"meta": {"pile_set_name": "Github"}, "title": "no text field"}'
    empty = b'{"text": "", "meta": {"pile_set_name": "Licenses"}}'
    lines = [good[0], broken_json, good[1], invalid_utf8, good[2], missing, good[3], empty, good[4]]
    defects = [(2, "malformed JSON (a line cut short)"), (4, "invalid UTF-8 bytes"),
               (6, "no `text` field"), (8, "empty `text`")]  # fmt: skip
    return b"".join(line + b"\n" for line in lines), defects


def environment() -> dict[str, object]:
    """Versions of everything the outputs depend on besides this script."""
    groff = shutil.which("groff")
    groff_version = ""
    if groff:
        done = subprocess.run([groff, "--version"], capture_output=True, text=True, check=False)
        groff_version = done.stdout.splitlines()[0] if done.stdout else ""
    pypi = {}
    for name in sources.GITHUB_PACKAGES:
        try:
            pypi[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pypi[name] = "not installed"
    debian = {pkg: version for pkg, (_, version) in sources.debian_packages().items()}
    return {"python": platform.python_version(), "zstandard": zstandard.__version__,
            "groff": groff_version, "pypi": pypi, "debian": debian}  # fmt: skip


def fingerprint(env: dict[str, object]) -> str:
    """Same fingerprint and same script: a rebuild must give byte-identical files."""
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()


def provenance(srcs, splits, files, defects, env) -> str:
    """PROVENANCE.md: per domain its source, extraction, counts and the licences of its texts."""
    out = ["# Demo corpus provenance", "",
           "Generated by `python examples/build_demo_corpus.py`; do not edit by hand. Every text",
           "below came from files present offline on a Debian machine with ttt's Python",
           "dependencies installed (Generated Math is generated by the script itself).", "",
           f"- zstd level {ZSTD_LEVEL} (single-threaded), seed `{SEED}`",
           (f"- Documents: pieces of {MIN_BYTES}-{MAX_BYTES} bytes (about {TARGET_BYTES}), cut at "
           "line boundaries (preferably before a blank line); whole files when shorter."),
           (f"- Split: per domain a seeded random {TEST_PER_DOMAIN} documents (at most a fifth) go "
           "to test, the rest to train; pieces of one file and files of one package fall on"),
           "  both sides, so that a test document has related training documents to retrieve.",
           f"- Environment fingerprint: `{fingerprint(env)}` (below; a rebuild by this script",
           "  in an environment with the same fingerprint gives byte-identical files)", "",
           "## Files", "",
           "| file | documents | bytes | sha256 |", "|---|---:|---:|---|"]  # fmt: skip
    for name, (count, data) in files.items():
        out.append(f"| {name} | {count} | {len(data)} | `{hashlib.sha256(data).hexdigest()}` |")
    out += ["", "| domain | train docs | test docs | train bytes | test bytes | source units |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for src in srcs:
        train, test = splits[src.domain]
        units = len({d.origin for d in train + test})
        out.append(f"| {src.domain} | {len(train)} | {len(test)} | "
                   f"{sum(_nbytes(d.text) for d in train)} | {sum(_nbytes(d.text) for d in test)} "
                   f"| {units} |")  # fmt: skip
    for src in srcs:
        train, test = splits[src.domain]
        docs = train + test
        out += ["", f"## {src.domain}", "", f"- Source: {src.source}",
                f"- Extraction: {src.extraction}",
                (f"- Units available: {len(src.units)}; documents kept: {len(docs)} from "
                f"{len({d.origin for d in docs})} units in {len({d.group for d in docs})} groups")]  # fmt: skip
        for note in src.missing:
            out.append(f"- SKIPPED: {note}")
        out += ["", "| licence | documents |", "|---|---:|"]
        for licence, n in sorted(Counter(d.licence for d in docs).items()):
            out.append(f"| {licence} | {n} |")
    out += [
        "",
        "## Environment",
        "",
        (
            f"- Python {env['python']}, zstandard {env['zstandard']}, "
            f"{env['groff'] or 'groff: not installed'}"
        ),
        "- PyPI: " + ", ".join(f"{k} {v}" for k, v in env["pypi"].items()),
        "- Debian: " + (", ".join(f"{k} {v}" for k, v in env["debian"].items()) or "none"),
    ]
    out += [
        "",
        "## bad-lines.jsonl",
        "",
        "Good lines taken from the test split, with one defective line between each pair:",
        "",
    ]
    out += [f"- line {line}: {what}" for line, what in defects]
    return "\n".join(out) + "\n"


def build(out_dir: Path) -> dict[str, tuple[list[Doc], list[Doc]]]:
    """Collect every source, cut, select, split and write the corpus files into out_dir."""
    srcs = [
        sources.github_source(),
        sources.python_docs_source(),
        sources.licenses_source(),
        sources.man_pages_source(MAN_PAGES_RENDERED, f"{SEED}/man"),
        demo_math.generated_math_source(MATH_UNITS_PER_MODULE, f"{SEED}/math"),
    ]
    splits: dict[str, tuple[list[Doc], list[Doc]]] = {}
    seen: set[str] = set()
    for src in srcs:
        for note in src.missing:
            print(f"warning: {src.domain}: skipped: {note}", file=sys.stderr)
        docs = select_documents(src, *BUDGET[src.domain], seen)
        if not docs:
            src.missing.append("no documents: the domain is left out")
        splits[src.domain] = split_train_test(docs, src.domain)
        print(f"{src.domain}: {len(splits[src.domain][0])} train, {len(splits[src.domain][1])} "
              "test documents", file=sys.stderr)  # fmt: skip
    train = [d for tr, _ in splits.values() for d in tr]
    test = [d for _, te in splits.values() for d in te]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "train.jsonl.zst": (len(train), write_zst(out_dir / "train.jsonl.zst", train)),
        "test.jsonl.zst": (len(test), write_zst(out_dir / "test.jsonl.zst", test)),
    }
    data, defects = bad_lines(test)
    (out_dir / "bad-lines.jsonl").write_bytes(data)
    files["bad-lines.jsonl"] = (9, data)
    text = provenance(srcs, splits, files, defects, environment())
    (out_dir / "PROVENANCE.md").write_text(text, encoding="utf-8")
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="output directory (default: examples/data)")  # fmt: skip
    args = parser.parse_args(argv)
    build(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
