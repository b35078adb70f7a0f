"""A pushed model's store path, its manifest (files, sizes, sha256, identity) and what a source directory or GGUF file holds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttt.errors import TTTError
from ttt.store import MANIFEST, check_key

SCHEME = "s3://"
KIND = "ttt.dev/model"
# huggingface-cli download --local-dir keeps one metadata file per downloaded file here:
# its first line is the commit (revision) the file came from.
HF_DOWNLOAD_META = Path(".cache") / "huggingface" / "download"
# Offline packages whose hub id is known (ttt/assets.py); the GGUF is a quantized
# conversion, so it has no hub id of its own: its identity is its file's hash.
KNOWN_HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


class ModelError(TTTError, ValueError):
    """A model that cannot be pushed, found, verified or loaded; the message names it."""


@dataclass(frozen=True)
class ModelPath:
    """`s3://bucket/prefix`: where a pushed model lives in the run's store."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        return check_key(f"{self.prefix}/{name}")


def is_store_path(name: str) -> bool:
    return name.startswith(SCHEME)


def parse_model_path(uri: str, bucket: str | None = None) -> ModelPath:
    """`s3://bucket/prefix` -> ModelPath; with `bucket`, it must be the store's bucket."""
    if not is_store_path(uri):
        raise ModelError(f"{uri!r}: a pushed model is named s3://bucket/prefix")
    found, _, prefix = uri[len(SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    if not found or not prefix:
        raise ModelError(f"{uri!r}: expected s3://bucket/prefix (e.g. s3://ttt/models/gpt2-large)")
    try:
        check_key(prefix)
    except TTTError as exc:
        raise ModelError(f"{uri!r}: {exc}") from None
    if bucket is not None and found != bucket:
        raise ModelError(
            f"{uri}: bucket {found!r} is not the run's store bucket ({bucket!r}, spec.storage.bucket)"
        )
    return ModelPath(found, prefix)


def source_files(src: Path) -> tuple[str, str | None, dict[str, Path]]:
    """(format, entry, {name: path}) of a model source: a GGUF file, or a Hugging Face model
    directory (every file but hidden ones such as .cache/ and .gitattributes)."""
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelError(f"{src}: a model file must be a .gguf (else give its directory)")
        return "gguf", src.name, {src.name: src}
    if not src.is_dir():
        raise ModelError(f"{src}: no such model directory or GGUF file")
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(root) / name
                files[path.relative_to(src).as_posix()] = path
    if "config.json" not in files:
        raise ModelError(f"{src}: not a Hugging Face model directory (no config.json)")
    return "hf-dir", None, files


def detect_revision(src: Path) -> str | None:
    """The commit a `huggingface-cli download --local-dir` directory came from, when every
    file's download record agrees on one; None when unknown."""
    meta = src / HF_DOWNLOAD_META if src.is_dir() else None
    if meta is None or not meta.is_dir():
        return None
    commits = set()
    for record in meta.rglob("*.metadata"):
        lines = record.read_text(errors="replace").splitlines()
        if lines and lines[0].strip():
            commits.add(lines[0].strip())
    return commits.pop() if len(commits) == 1 else None


def detect_hub_id(alias: str | None = None) -> str | None:
    """The hub id of a known offline package; None otherwise. config.json's `_name_or_path`
    is not taken: a model fine-tuned from gpt2-large and saved keeps that name, and would
    pass for the paper's weights."""
    if alias and alias.lower() in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[alias.lower()]
    return None


def check_model_manifest(body: Any, where: str) -> dict:
    """A model manifest as read from the store, or a ModelError naming what is wrong."""
    if body is None:
        raise ModelError(
            f"{where}: no model there (no {MANIFEST}); push it first: ttt models push SRC {where}"
        )
    if not isinstance(body, dict) or body.get("kind") != KIND:
        raise ModelError(f"{where}/{MANIFEST}: not a model manifest (kind {KIND!r} expected)")
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelError(f"{where}/{MANIFEST}: lists no files")
    for name, info in files.items():
        if not isinstance(info, dict) or not {"size", "sha256"} <= set(info):
            raise ModelError(f"{where}/{MANIFEST}: file {name!r} has no size and sha256")
        check_key(name)
    if body.get("format") == "gguf" and body.get("entry") not in files:
        raise ModelError(f"{where}/{MANIFEST}: its GGUF entry {body.get('entry')!r} is not listed")
    return body


def identity(body: dict) -> dict[str, Any]:
    """{hubId, revision, sha256 (a GGUF's own file hash)} of a model manifest."""
    ident = dict(body.get("identity") or {})
    entry = body.get("entry")
    if entry:
        ident["sha256"] = body["files"][entry]["sha256"]
    return ident


def describe_identity(body: dict) -> str:
    ident = identity(body)
    parts = [f"hub id {ident.get('hubId') or 'unknown'}"]
    parts.append(f"revision {ident.get('revision') or 'unknown'}")
    if ident.get("sha256"):
        parts.append(f"sha256 {ident['sha256'][:16]}")
    return ", ".join(parts)
