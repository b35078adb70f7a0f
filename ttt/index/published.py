"""Wait until a shard's index of this run is published: a fresh server waits unready."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def wait_published(
    run: Any,
    store: Any,
    shard: int,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll the store until `shard`'s index manifest of this run's index spec exists; return
    it. A missing index, or one built from another spec (a previous run's), is waited for:
    the server stays alive and unready (a chart installed before the pipeline has run)."""
    from ttt import telemetry
    from ttt.stages import is_done, shard_prefix

    prefix = shard_prefix(run, "index", shard)
    awaiting = telemetry.SHARD_AWAITING_INDEX.labels(str(shard))
    waited = False
    while not is_done(run, store, prefix, "index"):
        awaiting.set(1)  # the shard alerts leave a shard alone while its index is awaited
        if not waited:
            log.warning(
                "shard %d: no index of run %s (index %s) at %s yet; waiting, unready",
                shard,
                run.name,
                run.stage_hash("index"),
                prefix,
            )
            waited = True
        sleep(poll_s)
    awaiting.set(0)
    if waited:
        log.warning("shard %d: index published at %s; loading", shard, prefix)
    return store.read_manifest(prefix)
