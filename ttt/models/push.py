"""`ttt models push`: a Hugging Face model directory or a GGUF file into the store, with a manifest of its files' hashes and its identity."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ttt.models.manifest import (
    KIND,
    ModelError,
    ModelPath,
    check_model_manifest,
    detect_hub_id,
    detect_revision,
    source_files,
)
from ttt.store import (
    MANIFEST,
    MANIFEST_CHECKSUM,
    Store,
    StoreError,
    manifest_checksum,
    sha256_file,
)

log = logging.getLogger(__name__)

# Written after every uploaded file while a push runs, removed when the manifest lands: a
# push killed half way resumes from it instead of uploading gigabytes again.
PROGRESS = "push-progress.json"


def _old_manifest(store: Store, dest: ModelPath) -> dict | None:
    """The manifest of an earlier push to dest, or None (none, or unreadable: re-push all)."""
    try:
        body = store.read_manifest(dest.prefix)
    except StoreError as exc:
        log.warning("%s: ignoring its unreadable manifest (%s)", dest.uri, exc)
        return None
    if isinstance(body, dict) and isinstance(body.get("files"), dict):
        return body
    return None


def _already_there(store: Store, dest: ModelPath) -> dict[str, dict]:
    """{name: {size, sha256}} the store holds under dest from a finished or broken push."""
    known: dict[str, dict] = {}
    body = _old_manifest(store, dest)
    if body is not None:
        known.update(body["files"])
    if store.exists(dest.key(PROGRESS)):
        progress = store.get_json(dest.key(PROGRESS))
        if isinstance(progress, dict):
            known.update(progress)
    return known


def push_model(
    src: str | Path,
    store: Store,
    dest: ModelPath,
    *,
    hub_id: str | None = None,
    revision: str | None = None,
    alias: str | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Upload every file of `src` under `dest` and write its manifest last; returns it.

    A file the store already holds with the same sha256 (a finished push, or the progress
    record of an interrupted one) is not uploaded again. The identity is the hub id given
    (or a known offline package's), else unknown, and the revision given, else the commit
    huggingface-cli's download records name; `ttt validate --paper` cannot match an unknown
    hub id to the paper's models and says so.

    A path that holds another model is not overwritten unless `replace`: a run names its
    models by path, so its finished stages (embeddings, results) would silently stand for
    weights that are no longer there; push other weights under a new path.
    """
    src = Path(src).expanduser()
    fmt, entry, files = source_files(src)
    ident = {
        "hubId": hub_id or detect_hub_id(alias),
        "revision": revision or detect_revision(src),
    }
    # hash first: an identical earlier push is left as it is (same manifest, same cache key)
    recorded = {n: {"size": p.stat().st_size, "sha256": sha256_file(p)} for n, p in files.items()}
    store.ensure_bucket()
    old = _old_manifest(store, dest)
    same = ("kind", "format", "entry", "identity", "files")
    unchanged = old is not None and [old.get(k) for k in same] == [
        KIND,
        fmt,
        entry,
        ident,
        recorded,
    ]
    if unchanged and all(store.exists(dest.key(name)) for name in recorded):
        log.info("%s: already pushed, identical (%d file(s))", dest.uri, len(recorded))
        return check_model_manifest(old, dest.uri)
    same_weights = old is not None and [old.get(k) for k in same[:3]] + [old.get("files")] == [
        KIND,
        fmt,
        entry,
        recorded,
    ]
    if old is not None and not replace and not same_weights:
        raise ModelError(
            f"{dest.uri} already holds another model (pushed {old.get('created', '?')}, "
            f"{len(old['files'])} file(s)); runs that name it keep the stages they finished "
            "with it: push to a new path, or replace it on purpose (--replace)"
        )
    known = _already_there(store, dest)
    if old is not None:
        # readers must not take the old manifest for files being replaced under it
        store.put_json(dest.key(PROGRESS), known)
        store.delete(dest.key(MANIFEST))
    uploaded = skipped = 0
    done: dict[str, dict] = {}
    for name, path in files.items():
        have, want = known.get(name), recorded[name]
        if have == want and store.exists(dest.key(name)):
            skipped += 1
        else:
            info = store.put_file(path, dest.key(name))
            if info.sha256 != want["sha256"]:  # the file changed while it was read
                raise ModelError(f"{path}: changed while it was pushed; push again")
            uploaded += 1
        done[name] = want
        store.put_json(dest.key(PROGRESS), {**known, **done})
    # files of an earlier push that this source no longer has
    for stale in sorted(set(known) - set(files)):
        if store.list(dest.key(stale)) == [dest.key(stale)]:  # delete() takes a prefix
            store.delete(dest.key(stale))
    body: dict[str, Any] = {
        "kind": KIND,
        "format": fmt,
        "entry": entry,
        "identity": ident,
        "source": str(src),
        "files": recorded,
        "bytes": sum(f["size"] for f in recorded.values()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    body[MANIFEST_CHECKSUM] = manifest_checksum(body)
    store.put_json(dest.key(MANIFEST), body)
    store.delete(dest.key(PROGRESS))
    log.info(
        "pushed %s to %s: %d file(s) uploaded, %d already there (%d bytes)",
        src, dest.uri, uploaded, skipped, body["bytes"],
    )  # fmt: skip
    return check_model_manifest(body, dest.uri)
