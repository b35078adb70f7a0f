"""One shard server as a process: bind, serve, register once ready, drain on SIGTERM, exit."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ttt import telemetry
from ttt.index.api import Limits
from ttt.index.discovery import registry_key
from ttt.index.server import DEFAULT_PORT, ShardState, create_app
from ttt.index.serving import HeaderTimeoutH11, bind_socket
from ttt.index.shard import ShardError, load_shard, read_token, shard_of_ordinal

log = logging.getLogger(__name__)

# Seconds uvicorn waits for in-flight requests after the drain (the chart's grace period
# must exceed drain + this).
SHUTDOWN_SECONDS = 30


class _DrainingServer(uvicorn.Server):
    """uvicorn with a Kubernetes-friendly SIGTERM: not ready first, then finish and exit."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ShardState,
        drain_seconds: float,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.shard_state, self.drain_seconds, self.on_drain = state, drain_seconds, on_drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own handler re-raises the signal after shutdown (exit status 143);
        # a drained shard exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.shard_state.draining or sig == signal.SIGINT and self.should_exit:
            self.force_exit = True  # a second signal: stop now
            self.should_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Go unready, keep answering for drain_seconds, then stop after in-flight requests."""
        state = self.shard_state
        state.draining = True
        telemetry.SHARD_READY.labels(state.label).set(0)
        log.info(
            "shard %d: draining for %.1f s, then shutting down", state.shard, self.drain_seconds
        )
        if self.on_drain is not None:
            self.on_drain()
        timer = threading.Timer(self.drain_seconds, lambda: setattr(self, "should_exit", True))
        timer.daemon = True
        timer.start()


def serve(
    run: Any,
    shard: int | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    *,
    token_file: str | None = None,
    auth_disabled: bool = False,
    ordinal: int | None = None,
    store: Any = None,
    limits: Limits | None = None,
    drain_seconds: float = 5.0,
    register: bool | None = None,
    threads: int | None = None,
    wait_for_index: float | None = None,
) -> int:
    """Serve one shard of `run` until SIGTERM; returns the exit status (1 if loading failed).

    The shard comes from `shard`, or from a StatefulSet `ordinal` (shard = ordinal % shards).
    `register` (default: when the store is a local directory) writes
    runs/<name>/registry/shard-NNNNN.json with this server's URL once it is ready.
    `wait_for_index` (seconds between polls): wait, alive and unready, until the shard's index
    of this run is published, instead of failing when it is not (yet) there.
    """
    shards = run.spec.corpus.shards
    replica = 0
    if shard is None:
        if ordinal is None:
            raise ShardError("serve: give a shard or a StatefulSet ordinal")
        shard, replica = shard_of_ordinal(ordinal, shards)
    if not 0 <= shard < shards:
        raise ShardError(f"shard {shard} is out of range: spec.corpus.shards is {shards}")
    if store is None:
        from ttt.store import open_store

        store = open_store(run.spec.storage)
    token = read_token(token, token_file)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    # a comparison, not a bind: which name to advertise when bound to every interface
    advertised = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host  # nosec B104
    url = f"http://{'[' + advertised + ']' if ':' in advertised else advertised}:{bound}"
    key = registry_key(run, shard, replica)
    if register is None:
        register = run.spec.storage.endpoint is None

    def on_ready() -> None:
        if register:
            store.put_json(key, {"url": url, "shard": shard, "replica": replica})
            log.info("shard %d: registered %s at %s", shard, url, key)

    def on_drain() -> None:
        if register:
            with contextlib.suppress(Exception):  # the registry is a hint, never fatal
                store.delete(key)

    def loader() -> Any:
        if wait_for_index is not None:
            from ttt.index.published import wait_published

            wait_published(run, store, shard, wait_for_index)
        return load_shard(run, store, shard)

    app = create_app(
        loader,
        shard,
        token=token,
        auth_disabled=auth_disabled,
        limits=limits,
        on_ready=on_ready,
        threads=threads,
        run=run.name,
    )
    state: ShardState = app.state.shard
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        access_log=False,
        lifespan="on",
        http=HeaderTimeoutH11,
    )
    server = _DrainingServer(config, state, drain_seconds, on_drain)

    def exit_if_failed() -> None:
        state.loaded.wait()
        if state.error is not None:
            server.should_exit = True

    threading.Thread(target=exit_if_failed, daemon=True).start()
    log.info("shard %d (replica %d) of %s: serving on %s", shard, replica, run.name, url)
    server.run(sockets=[sock])
    on_drain()
    return 1 if state.error else 0
