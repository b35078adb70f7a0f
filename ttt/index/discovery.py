"""Where the shard servers are: a static list, a headless Service's pods, or a registry."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from ttt.index.retrieval import RetrievalError, open_run_store

DEFAULT_PORT = 8000  # the shard server's (ttt.index.server.DEFAULT_PORT, not imported: no fastapi)


def normalize_url(url: str) -> str:
    """'host:port' or a URL -> 'http://host:port' without a trailing slash."""
    url = url.strip().rstrip("/")
    return url if re.match(r"^https?://", url) else f"http://{url}"


def discover_endpoints(run: Any, store: Any = None, *, missing_ok: bool = False) -> list[list[str]]:
    """URLs of each shard's servers: spec.retrieval.servers, a headless Service, or a registry.

    Server i of a static list or a StatefulSet serves shard i % shards (its replica i // shards).
    `service` is '<statefulset>.<service domain>[:port]'; pod i is '<statefulset>-i.<domain>'.
    Without either, a local run's servers are read from runs/<name>/registry/ in the store;
    a shard none of them serves is an error, or (`missing_ok`) an empty list.
    """
    shards, r = run.spec.corpus.shards, run.spec.retrieval
    endpoints: list[list[str]] = [[] for _ in range(shards)]
    if r.servers:
        if len(r.servers) % shards:
            raise RetrievalError(
                f"spec.retrieval.servers: {len(r.servers)} URLs for {shards} shards; "
                "give shards x replicas URLs, server i serving shard i % shards"
            )
        for i, url in enumerate(r.servers):
            endpoints[i % shards].append(normalize_url(url))
        return endpoints
    if r.service:
        host, port = _split_port(re.sub(r"^https?://", "", r.service))
        name, dot, domain = host.partition(".")
        if not dot or not name or not domain:
            raise RetrievalError(
                f"spec.retrieval.service: {r.service!r} is not '<statefulset>.<service>[:port]'"
            )
        for i in range(shards * run.spec.index.replicas):
            endpoints[i % shards].append(f"http://{name}-{i}.{domain}:{port}")
        return endpoints
    store = store or open_run_store(run)
    prefix = f"{run.prefix}/registry/"
    found = []
    for key in store.list(prefix):
        match = re.search(r"shard-(\d+)(?:\.(\d+))?\.json$", key)
        if match and int(match.group(1)) < shards:
            found.append((int(match.group(1)), int(match.group(2) or 0), key))
    for shard, _, key in sorted(found):  # replica 0 first
        endpoints[shard].append(_registered_url(store, key, r.registry_hosts))
    missing = [s for s, e in enumerate(endpoints) if not e]
    if missing and not missing_ok:
        raise RetrievalError(
            f"no server registered for shard(s) {_ranges(missing)} under {prefix}: start them "
            "with `ttt serve --spec FILE --shard I`, or set spec.retrieval.servers or .service"
        )
    return endpoints


def _registered_url(store: Any, key: str, allowed: list[str]) -> str:
    """A registry entry's URL, if it points at loopback or a host the spec allows.

    Whoever can write the registry would otherwise send the client, and its bearer token,
    to any host; a local run's servers are on loopback.
    """
    entry = store.get_json(key)
    url = normalize_url(str(entry.get("url", "")) if isinstance(entry, dict) else "")
    host = urlsplit(url).hostname or ""
    if not (_is_loopback(host) or host in allowed):
        raise RetrievalError(
            f"{key}: the registered server {url!r} is not on loopback; the client would send "
            f"its token to {host!r}. List the host in spec.retrieval.registryHosts if it is "
            "yours, or set spec.retrieval.servers/.service"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def registry_key(run: Any, shard: int, replica: int = 0) -> str:
    """Where a local run's server of `shard` (and `replica`) registers its URL in the store."""
    name = f"shard-{shard:05d}" + (f".{replica}" if replica else "")
    return f"{run.prefix}/registry/{name}.json"


def _split_port(host: str) -> tuple[str, int]:
    if ":" in host:
        host, _, port = host.rpartition(":")
        if not port.isdigit():
            raise RetrievalError(f"spec.retrieval.service: bad port {port!r}")
        return host, int(port)
    return host, DEFAULT_PORT


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
