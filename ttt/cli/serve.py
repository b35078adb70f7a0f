"""`ttt serve`: serve one shard's index over HTTP until SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve one shard's k-NN index over HTTP (/v1/search, /healthz, /readyz, /metrics)",
        description="Load a shard's index and text store from the run's store and serve it. "
        "The bearer token comes from --token-file or $TTT_AUTH_TOKEN.",
        epilog="examples:\n"
        "  TTT_AUTH_TOKEN=secret ttt serve --spec examples/demo.yaml --shard 0 --port 8000\n"
        "  ttt serve --spec /etc/ttt/run.yaml --shard-from-hostname --host 0.0.0.0 "
        "--token-file /var/run/secrets/ttt/token",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--spec", required=True, metavar="FILE", help="TTTRun YAML file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--shard", type=int, metavar="I", help="shard ordinal to serve")
    which.add_argument(
        "--shard-from-hostname",
        action="store_true",
        help="take the StatefulSet ordinal from the hostname suffix -N (shard = N %% shards)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--no-auth", action="store_true", help="serve without a token (explicit)")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="after SIGTERM: seconds unready but still answering (default 5)",
    )
    p.add_argument("--max-k", type=int, default=1024, help="largest k per query")
    p.add_argument("--max-batch", type=int, default=256, help="most query vectors per request")
    p.add_argument("--max-body", type=int, default=16 * 2**20, help="largest request in bytes")
    p.add_argument("--threads", type=int, help="FAISS threads per search (default: all cores)")
    p.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write this server's URL to the run's registry in the store once ready "
        "(default: only when the store is a local directory)",
    )
    p.add_argument(
        "--wait-for-index",
        type=float,
        nargs="?",
        const=10.0,
        metavar="SECONDS",
        help="until this run's index of the shard is published, stay alive and unready, "
        "polling the store every SECONDS (default 10), instead of exiting",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ttt.index.lifecycle import Limits, serve
    from ttt.index.shard import ordinal_from_hostname
    from ttt.spec import load_spec

    run = load_spec(args.spec)
    ordinal = ordinal_from_hostname() if args.shard_from_hostname else None
    return serve(
        run,
        args.shard,
        args.host,
        args.port,
        token_file=args.token_file,
        auth_disabled=args.no_auth,
        ordinal=ordinal,
        limits=Limits(max_k=args.max_k, max_batch=args.max_batch, max_body=args.max_body),
        drain_seconds=args.drain_seconds,
        threads=args.threads,
        register=args.register,
        wait_for_index=args.wait_for_index,
    )
