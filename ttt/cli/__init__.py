"""The `ttt` command: one subcommand module per stage, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

# Each name is a module ttt.cli.<name> with `register(subparsers)`; a module registers one
# or more subcommands whose handler is `args.func(args) -> int`.
COMMAND_MODULES = [
    "validate",
    "corpus",
    "embed",
    "index",
    "serve",
    "query",
    "eval",
    "report",
    "run",
    "bench",
    "plan",
    "models",
    "rehearse",
]

EPILOG = """examples:
  ttt validate examples/demo.yaml          print the resolved run spec
  ttt corpus stats examples/data/test.jsonl.zst
  ttt run examples/demo.yaml               the whole pipeline on this machine
  ttt models push DIR s3://ttt/models/NAME  a model into the store (pods need no hub)
  ttt query --spec examples/demo.yaml "grep searches for PATTERNS in each FILE" --k 3
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttt",
        description="Test-time training on nearest neighbors (Hardt & Sun, ICLR 2024).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"ttt.cli.{name}") is None:
            continue
        importlib.import_module(f"ttt.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else os.environ.get("TTT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Libraries that log every request or load at INFO would drown the stage progress.
    for noisy in ("faiss.loader", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ttt.errors import TTTError

    try:
        return int(args.func(args) or 0)
    except (TTTError, OSError) as exc:
        # Bad input, an unreachable store, a missing file: one line that names the file,
        # field or endpoint, not a traceback. Anything else is a bug and shows its traceback.
        print(f"ttt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
