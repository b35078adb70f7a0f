"""Wait until every shard of a run has a ready server: `python -m ttt.index.wait --spec FILE`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from ttt.errors import TTTError

log = logging.getLogger(__name__)


class IndexNotReady(TTTError, RuntimeError):
    """Some shard had no server answering /readyz with 200 before the deadline."""


def ready(url: str, timeout: float = 2.0) -> bool:
    """True when the server at `url` answers GET /readyz with 200 (no token needed)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def shards_down(
    endpoints: list[list[str]], probe: Callable[[str], bool] | None = None
) -> list[int]:
    """The shards none of whose servers is ready (`probe`: `ready` unless given)."""
    probe = probe or ready
    return [s for s, urls in enumerate(endpoints) if not any(probe(u) for u in urls)]


def wait_for_shards(
    run: Any, timeout_s: float, poll_s: float = 5.0, probe: Callable[[str], bool] | None = None
) -> None:
    """Return once every shard of `run` has a ready server; IndexNotReady after `timeout_s`.

    The servers are found as the eval worker finds them (`discover_endpoints`), so an eval
    pod that starts after this returns does not begin with partial retrievals.
    """
    from ttt.index.discovery import discover_endpoints

    deadline = time.monotonic() + timeout_s
    while True:
        endpoints = discover_endpoints(run, missing_ok=True)
        down = shards_down(endpoints, probe)
        if not down:
            log.info("all %d shards have a ready server", len(endpoints))
            return
        if time.monotonic() >= deadline:
            where = {s: endpoints[s] for s in down[:5]}
            raise IndexNotReady(
                f"run {run.name}: shard(s) {down} have no ready server after {timeout_s:.0f} s "
                f"(tried {where})"
            )
        log.info("waiting for shard(s) %s to become ready", down)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    from ttt.spec import load_spec

    p = argparse.ArgumentParser(prog="python -m ttt.index.wait", description=__doc__)
    p.add_argument("--spec", required=True, help="TTTRun YAML file")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between rounds (default 5)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        wait_for_shards(load_spec(args.spec), args.timeout, args.poll)
    except TTTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
