"""The corpus stage and stage bookkeeping shared by every distributor (local run, KFP, Job)."""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ttt.corpus import TextStore, shard_name, text_store_files, write_text_shards
from ttt.spec import TTTRun

log = logging.getLogger(__name__)


def shard_prefix(run: TTTRun, stage: str, shard: int) -> str:
    """runs/<name>/<stage>/shard-NNNNN: where a per-shard stage publishes."""
    return f"{run.prefix}/{stage}/{shard_name(shard)}"


def is_done(run: TTTRun, store: Any, prefix: str, stage: str) -> bool:
    """A stage is finished when its manifest exists and was made from the same spec."""
    manifest = store.read_manifest(prefix)
    return manifest is not None and manifest.get("spec_hash") == run.stage_hash(stage)


def open_text_store(
    run: TTTRun, store: Any, shard: int, error: type[Exception] = RuntimeError
) -> TextStore:
    """The published text store of a shard, as a local `TextStore` (fetched when remote).

    Raises `error` (the caller's stage error) when the corpus stage has not published it.
    Kept free of torch so that a shard server starts in a second.
    """
    prefix = shard_prefix(run, "corpus", shard)
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise error(
            f"shard {shard}: no corpus text store at {prefix}/manifest.json; "
            "publish the corpus shards first (ttt run, or the corpus-shard component)"
        )
    files = manifest.get("files", {})
    local = {
        name: Path(store.fetch(f"{prefix}/{name}", sha256=files.get(name, {}).get("sha256")))
        for name in text_store_files(".")
    }
    parents = {p.parent for p in local.values()}
    if len(parents) == 1:
        return TextStore(parents.pop())
    directory = Path(tempfile.mkdtemp(prefix=f"ttt-corpus-{shard:05d}-"))
    for name, path in local.items():  # a cache that keeps the files apart: link them together
        (directory / name).symlink_to(path.resolve())
    return TextStore(directory)


def publish_corpus(run: TTTRun, store: Any, *, progress: bool = True) -> list[dict]:
    """Split the training corpus into the spec's shards and publish each shard's text store.

    One pass over the corpus writes every shard (a document's shard is a hash of its id), so
    the stage is all-or-nothing: it is skipped only when every shard's manifest matches.
    """
    n = run.spec.corpus.shards
    prefixes = [shard_prefix(run, "corpus", i) for i in range(n)]
    if all(is_done(run, store, p, "corpus") for p in prefixes):
        log.info("corpus: %d shards already published, skipping", n)
        return [store.read_manifest(p) for p in prefixes]
    if not run.spec.corpus.train:
        raise ValueError("spec.corpus.train: no training corpus given")
    with tempfile.TemporaryDirectory(prefix="ttt-corpus-") as tmp:
        stats = write_text_shards(
            run.spec.corpus.train,
            n,
            tmp,
            store=store,
            strict=run.spec.corpus.strict,
            progress=progress,
        )
        if stats.total_bad_lines:
            log.warning("corpus: %s", stats.summary())
        manifests = []
        for i, prefix in enumerate(prefixes):
            body = {
                "stage": "corpus",
                "shard": i,
                "shards": n,
                "spec_hash": run.stage_hash("corpus"),
                "created": datetime.now(UTC).isoformat(),
                **stats.shards[i],
                "bad_lines": stats.to_dict().get("bad_lines", {}),
            }
            files = text_store_files(Path(tmp) / shard_name(i))
            manifests.append(store.publish(prefix, files, body))
    return manifests
