"""A carried optimizer's state in the store: saved with a rank's record boundary, resumed."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

STATES = "optimizer"  # under the rank's prefix: state-NNNNNNNN.pt and its .json
# A state is Adam's two moments, 8 bytes a parameter (6 GB for GPT-2 Large): it is saved at
# most this often, not at every upload of the records, so a killed rank evaluates again at
# most this much work (the records past the newest state).
STATE_SECONDS = 300.0


class CarriedState:
    """The optimizer state after a rank's n-th record, at `<rank>/optimizer/state-<n>.pt`,
    with `state-<n>.json` (the document, its task, the spec hash and the bytes' sha256)
    written after it, so a .json always names a whole .pt. Saved just before the records
    holding that document are uploaded; older states are removed once they are."""

    def __init__(
        self, store: Any, prefix: str, spec_hash: str, every: float = STATE_SECONDS
    ) -> None:
        self.store, self.dir, self.spec_hash = store, f"{prefix}/{STATES}", spec_hash
        self.every, self.last = every, time.monotonic()

    def due(self) -> bool:
        """Whether `every` seconds have passed since the last save (or since the start)."""
        return time.monotonic() - self.last >= self.every

    def save(self, data: bytes, records: Sequence[dict[str, Any]]) -> int:
        n, last = len(records), records[-1]
        self.store.put_bytes(f"{self.dir}/state-{n:08d}.pt", data)
        facts = {
            "records": n,
            "doc": last["doc"],
            "task": last["task"],
            "spec_hash": self.spec_hash,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.store.put_json(f"{self.dir}/state-{n:08d}.json", facts)
        self.last = time.monotonic()
        return n

    def prune(self, keep: int) -> None:
        """Remove the states before the `keep`-th record's (its records are uploaded)."""
        for key in self.store.list(f"{self.dir}/"):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("state-") and int(name[6:14]) < keep:
                self.store.delete(key)

    def saved(self) -> list[dict[str, Any]]:
        """The saved states' facts of this spec, newest first."""
        out = []
        for key in sorted(self.store.list(f"{self.dir}/"), reverse=True):
            if key.endswith(".json"):
                facts = self.store.get_json(key)
                if facts.get("spec_hash") == self.spec_hash:
                    out.append({**facts, "key": key[: -len(".json")] + ".pt"})
        return out

    def read(self, facts: dict[str, Any]) -> bytes | None:
        """A state's bytes, or None when they do not match their sha256 (logged)."""
        data = self.store.get_bytes(facts["key"])
        if hashlib.sha256(data).hexdigest() != facts["sha256"]:
            log.warning("%s: optimizer state does not match its sha256; not used", facts["key"])
            return None
        return data


def resume_point(
    mine: Sequence[Any], done: set[str], states: Sequence[dict[str, Any]]
) -> tuple[int, dict[str, Any] | None]:
    """Where a rank with a carried optimizer resumes: (how many of its documents, in order,
    keep their records; the saved state to resume from, or None for a fresh optimizer).

    The finished documents form a prefix of the rank's order; past the newest saved state
    that lies within it, the results depend on a state that is lost, so they are evaluated
    again, unless a task starts later in the prefix (a new task starts a fresh optimizer)."""
    p = 0
    while p < len(mine) and mine[p].id in done:
        p += 1
    if p == len(mine):
        return p, None
    boundary = p  # the start of the task the prefix ends in
    while boundary > 0 and mine[boundary - 1].domain == mine[boundary].domain:
        boundary -= 1
    position = {d.id: i for i, d in enumerate(mine[:p])}
    for facts in states:
        i = position.get(facts["doc"])
        if i is not None and i + 1 > boundary:
            return i + 1, facts
    return boundary, None
