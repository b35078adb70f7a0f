"""The store's interface (Store, ObjectInfo), its errors, and the key, hashing and manifest helpers both backends share."""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ttt.errors import TTTError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# A manifest carries the sha256 of its own canonical JSON: a flipped byte in a recorded
# checksum or count is caught when it is read, not trusted.
MANIFEST_CHECKSUM = "manifest_sha256"
CHUNK = 1 << 20  # 1 MiB: hashing and copying granularity; never a whole file in memory
# Temporary files are hidden siblings of their destination so os.replace stays on one
# filesystem (atomic); list() never shows them.
TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


class StoreError(TTTError):
    """Any failure of the artifact store; the message names the store and the key."""


class StoreUnreachable(StoreError):
    """The store's endpoint cannot be reached."""


class StoreAccessDenied(StoreError):
    """The store rejected the credentials (or they lack a permission)."""


class ObjectNotFound(StoreError):
    """No object under the key."""


class IntegrityError(StoreError):
    """An object's content does not match its recorded sha256."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """Reject keys that are not plain relative `/`-separated paths (both backends agree)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}: expected a relative path like 'a/b.json'")
    return key


def check_prefix(prefix: str, allow_empty: bool = True) -> str:
    """A listing prefix: a key, a key with a trailing `/`, or (when allowed) empty for all."""
    if prefix or not allow_empty:
        check_key(prefix.removesuffix("/"))
    return prefix


def tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def copy_hashing(src: BinaryIO, dst: BinaryIO, digest: Any) -> int:
    """Copy a stream chunk by chunk, updating `digest`; returns the bytes copied."""
    size = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory that holds the entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Store(abc.ABC):
    """Keys are `/`-separated strings relative to the bucket (S3) or root directory (local).

    `list` and `delete` take S3-style string prefixes: end one with `/` to mean a directory
    (`runs/a/` does not match `runs/ab/x`, `runs/a` does).
    """

    bucket: str | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the store lives, for logs and error messages."""

    @abc.abstractmethod
    def put_file(self, local_path: str | Path, key: str) -> ObjectInfo:
        """Upload a file, streaming; its sha256 is computed on the way."""

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | Path, sha256: str | None = None) -> Path:
        """Download to `local_path` (atomically); with `sha256`, a mismatch is an error."""

    @abc.abstractmethod
    def fetch(self, key: str, sha256: str | None = None) -> Path:
        """A local path holding the object: the file itself (local) or a cached download."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix`."""

    @abc.abstractmethod
    def delete(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; returns how many were deleted."""

    def ensure_bucket(self) -> None:
        """Create the bucket (S3) or the root directory (local) if it is missing."""

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        return self.put_bytes(key, (json.dumps(obj, indent=2) + "\n").encode())

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{key} in {self.describe()}: not valid JSON: {e}") from e

    def publish(self, prefix: str, files: dict[str, Path], manifest: dict) -> dict:
        """Upload `files` under `prefix/`, then write `prefix/manifest.json` last.

        Readers take a stage as finished only when its manifest exists, so the old
        manifest is removed first and the new one written after every file is in place.
        """
        prefix = check_key(prefix.rstrip("/"))
        if MANIFEST in files:
            raise StoreError(f"publish {prefix}: '{MANIFEST}' is reserved for the manifest")
        manifest_key = f"{prefix}/{MANIFEST}"
        if self.exists(manifest_key):
            self.delete(manifest_key)
        recorded = {}
        for name, path in files.items():
            info = self.put_file(path, check_key(f"{prefix}/{name}"))
            recorded[name] = {"size": info.size, "sha256": info.sha256}
        body = {
            **manifest,
            "files": recorded,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        body[MANIFEST_CHECKSUM] = manifest_checksum(body)
        self.put_json(manifest_key, body)
        log.debug("published %s (%d files) to %s", prefix, len(files), self.describe())
        return body

    def read_manifest(self, prefix: str) -> dict | None:
        """The manifest under `prefix`, or None when the stage has not finished.

        A manifest whose content does not match its own recorded checksum is an
        IntegrityError (manifests written before checksums were recorded are taken as they are).
        """
        key = f"{check_key(prefix.rstrip('/'))}/{MANIFEST}"
        try:
            body = self.get_json(key)
        except ObjectNotFound:
            return None
        recorded = body.get(MANIFEST_CHECKSUM) if isinstance(body, dict) else None
        if recorded is not None and recorded != manifest_checksum(body):
            raise IntegrityError(
                f"{key} in {self.describe()}: the manifest does not match its own checksum "
                "(corrupt or edited); publish the stage again"
            )
        return body

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def manifest_checksum(body: dict) -> str:
    """sha256 of a manifest's canonical JSON, its own checksum field left out."""
    rest = {k: v for k, v in body.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def verify(key: str, store: Store, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{key} in {store.describe()}: sha256 mismatch (expected {expected}, got {actual})"
        )
