"""A pushed model fetched into a local cache directory, every file verified against its manifest's sha256, shared safely by the ranks of one node."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ttt.models.manifest import ModelError, ModelPath, check_model_manifest, parse_model_path
from ttt.store import IntegrityError, ObjectNotFound, Store

log = logging.getLogger(__name__)

CACHE_ENV = "TTT_MODELS_CACHE"
VERIFIED = ".verified"  # written last into a complete, verified copy


def cache_root(storage: Any = None, environ: dict[str, str] | None = None) -> Path:
    """Where pushed models are cached: $TTT_MODELS_CACHE, else <storage.cacheDir>/models
    (the chart's /var/cache/ttt), else ~/.cache/ttt/models."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    cache_dir = getattr(storage, "cache_dir", None)
    if cache_dir:
        return Path(cache_dir).expanduser() / "models"
    return Path(env.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ttt" / "models"


def content_key(body: dict) -> str:
    """A manifest's content (files, format, identity; not when it was written): a re-push of
    the same files keeps its cached copy, a changed one gets a fresh directory."""
    parts = {k: body.get(k) for k in ("format", "entry", "identity", "files")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (several ranks of one node fetch one model once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(target: Path, body: dict, key: str) -> bool:
    """A cached copy finished and verified for this manifest (sizes re-checked)."""
    marker = target / VERIFIED
    if not marker.is_file() or marker.read_text().strip() != key:
        return False
    for name, info in body["files"].items():
        path = target / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            log.warning("cached model %s: %s is missing or resized; fetching again", target, name)
            return False
    return True


def _download(store: Store, where: ModelPath, body: dict, tmp: Path) -> None:
    for name, info in sorted(body["files"].items()):
        try:
            store.get_file(where.key(name), tmp / name, sha256=info["sha256"])
        except IntegrityError:
            raise ModelError(
                f"model {where.uri}: file {name} does not match the sha256 its manifest "
                f"records ({info['sha256'][:16]}...): the store's copy is corrupt or was "
                "changed; push the model again"
            ) from None
        except ObjectNotFound:
            raise ModelError(
                f"model {where.uri}: file {name} is in its manifest but not in the store; "
                "push the model again"
            ) from None


def fetch_model(uri: str, store: Store, *, bucket: str | None = None, root: str | Path) -> Path:
    """The local path of the pushed model `uri` (its directory, or its GGUF file), fetched
    into `root` unless a verified copy is there; every file checked against its sha256."""
    where = parse_model_path(uri, bucket)
    body = check_model_manifest(store.read_manifest(where.prefix), where.uri)
    key = content_key(body)
    base = Path(root).expanduser() / where.bucket / where.prefix
    target = base / key
    with _locked(base / f".{key}.lock"):
        if not _complete(target, body, key):
            tmp = base / f".{key}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                _download(store, where, body, tmp)
                (tmp / VERIFIED).write_text(key + "\n")
                shutil.rmtree(target, ignore_errors=True)  # an incomplete or resized copy
                os.replace(tmp, target)  # atomic: a reader sees all of it or nothing
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetched model %s (%d bytes) into %s", uri, body.get("bytes", 0), target)
        else:
            log.info("model %s: verified copy in %s", uri, target)
    return target / body["entry"] if body.get("entry") else target


def local_model(name: str, storage: Any = None) -> str:
    """What a spec's model field names, as a local path where it can be one: an offline
    package's short name -> its path; s3://bucket/prefix -> the fetched, verified copy
    (read from the store `storage` describes); anything else (an HF id, a path) unchanged."""
    from ttt.assets import resolve_model
    from ttt.models.manifest import is_store_path

    if not is_store_path(name):
        return resolve_model(name)
    if storage is None:
        raise ModelError(f"model {name}: a pushed model is read from the run's store (none given)")
    from ttt.store import open_store

    store = open_store(storage)
    return str(fetch_model(name, store, bucket=storage.bucket, root=cache_root(storage)))
