"""`ttt bench embed|index|retrieval|ttt|reliability`: figures and the command behind them."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Sequence
from typing import Any

# A benchmark's own options, after the --preset every benchmark has: (flag, add_argument
# keywords). The function it runs takes each option's dest as a keyword (see RENAMED).
Arguments = Sequence[tuple[str, dict[str, Any]]]
INT: dict[str, Any] = {"type": int}

EMBED: Arguments = [
    ("--model", {"default": "all-minilm-l6-v2"}),
    ("--documents", INT),
    ("--batch-tokens", INT),
    ("--max-tokens", INT),
    ("--device", {}),
    ("--corpus", {"nargs": "+", "help": "Pile-format files instead of synthetic text"}),
]
INDEX: Arguments = [
    ("--vectors", INT),
    ("--dim", INT),
    ("--type", {"help": "FAISS factory string of the approximate index"}),
    ("--nprobe", INT),
    (
        "--rerank",
        {
            "type": int,
            "help": "re-rank k x RERANK candidates exactly against the vectors on disk "
            "(0 = off; default: the preset's)",
        },
    ),
    ("--k", {"type": int, "default": 50}),
    ("--queries", INT),
    ("--embeddings", {"help": "a published embeddings.npy instead of synthetic vectors"}),
    ("--use-gpu", {"choices": ["auto", "always", "never"], "default": "auto"}),
]
RETRIEVAL: Arguments = [
    ("--shards", INT),
    ("--vectors-per-shard", INT),
    ("--dim", INT),
    ("--k", INT),
    ("--queries", INT),
    ("--batch", INT),
    (
        "--doc-bytes",
        {
            "type": int,
            "help": "serve a text store of documents this long and report the servers' "
            "resident memory against its text and offsets bytes (0 = synthetic texts, no store)",
        },
    ),
    ("--with-text", {"action": "store_true"}),
]
TTT: Arguments = [
    ("--model", {"help": "an offline name, HF id or path instead of the preset's"}),
    ("--documents", INT),
    ("--neighbors", {"type": int, "help": "neighbors per document"}),
    ("--max-length", {"type": int, "help": "tokens per training chunk"}),
    ("--members", {"type": int, "help": "ensemble size (default: from free memory)"}),
    (
        "--path",
        {
            "choices": ["stacked", "vmap", "loop"],
            "help": "the engine's path (default: as the engine chooses: loop for dropout in "
            "float32, else stacked for GPT-2 and Llama, vmap for other architectures with "
            "several members and loop with one; stacked or vmap with dropout draw each "
            "member's masks independently)",
        },
    ),
    ("--device", {}),
    (
        "--recompute",
        {
            "action": "store_true",
            "help": "our engine recomputes each layer in the backward (spec.ttt.recompute)",
        },
    ),
    (
        "--compile",
        {
            "action": "store_true",
            "help": "our engine compiles its stacked step (spec.ttt.compile; the compile "
            "time is the warm-up's, ours_warmup_seconds)",
        },
    ),
    ("--layers", {"type": int, "help": "GPT-2 presets: fewer layers (tests, CPUs)"}),
    ("--width", {"type": int, "help": "GPT-2 presets: a smaller width"}),
    (
        "--profile",
        {
            "action": "store_true",
            "help": "instead of timings: per member-step and per path, operators, bytes "
            "allocated and parameter traffic per parameter, host syncs, fused attention, "
            "and the bytes per parameter a worker holds (a CPU proxy of the GPU's costs)",
        },
    ),
]
RELIABILITY: Arguments = [
    ("--out", {"help": "write the Markdown page here (docs/reliability.md)"}),
]
# Options whose dest is not the benchmark function's keyword.
RENAMED = {"type": "index_type"}


def _report_reliability(args: argparse.Namespace, figures: dict) -> None:
    if args.out:
        print(f"wrote {args.out}")
    failed = [r["fault"] for r in figures["faults"] if not r["ok"]]
    print(f"fault matrix: {len(figures['faults']) - len(failed)}/{len(figures['faults'])} "
          "as expected" + (f"; NOT: {failed}" if failed else ""))  # fmt: skip


def _runner(
    target: str,
    dests: list[str],
    report: Callable[[argparse.Namespace, dict], None] | None = None,
) -> Callable[[argparse.Namespace], int]:
    """Run `module:function` with the parsed options as keywords; print its figures as JSON
    on --json. The module is imported only when its benchmark runs."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        bench = getattr(importlib.import_module(module), name)
        figures = bench(**{RENAMED.get(d, d): getattr(args, d) for d in dests})
        if report is not None:
            report(args, figures)
        if args.json:
            print(json.dumps(figures, indent=2, default=str))
        return 0

    return run


def _add_bench(
    benches: argparse._SubParsersAction,
    name: str,
    target: str,
    arguments: Arguments,
    *,
    help: str,
    example: str,
    presets: list[str],
    seed: bool = True,
    report: Callable[[argparse.Namespace, dict], None] | None = None,
) -> None:
    """One `ttt bench NAME`: --preset (the first is the default), its own options, --seed
    (unless seed is False) and --json."""
    p = benches.add_parser(name, help=help, epilog=f"example: ttt bench {name} {example}")
    actions = [p.add_argument("--preset", choices=presets, default=presets[0])]
    actions += [p.add_argument(flag, **options) for flag, options in arguments]
    if seed:
        actions.append(p.add_argument("--seed", type=int, default=0))
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=_runner(target, [a.dest for a in actions], report))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: embedding, index build, fan-out retrieval, TTT-NN training",
        epilog="example: ttt bench retrieval --preset cpu --json",
    )
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _add_bench(
        benches,
        "embed",
        "ttt.bench.embed:bench_embed",
        EMBED,
        help="embedding tokens/s: ours vs the paper's path (batches of 16, fp32)",
        example="--preset cpu",
        presets=["cpu", "gpu"],
    )
    _add_bench(
        benches,
        "index",
        "ttt.bench.index:bench_index",
        INDEX,
        help="index build seconds, bytes per vector and recall@k: flat vs approximate",
        example="--preset cpu --type IVF256,PQ32 --nprobe 16",
        presets=["cpu", "cpu-1m", "gpu"],
    )
    _add_bench(
        benches,
        "retrieval",
        "ttt.bench.retrieval:bench_retrieval",
        RETRIEVAL,
        help="fan-out query latency p50/p99 and resident memory of local shard servers",
        example="--preset cpu --shards 3",
        presets=["cpu", "large"],
    )
    _add_bench(
        benches,
        "ttt",
        "ttt.bench.ttt:bench_ttt",
        TTT,
        help="TTT-NN ms per neighbor, TFLOP/s and bpb: the paper's loop vs ours, one process",
        example="--preset cpu",
        presets=["cpu", "gpt2", "gpt2-large"],
    )
    _add_bench(
        benches,
        "reliability",
        "ttt.bench.reliability:bench_reliability",
        RELIABILITY,
        help="fault matrix, fuzzing (hypothesis, schemathesis), loopback load, bandit",
        example="--out docs/reliability.md",
        presets=["full", "quick"],
        seed=False,
        report=_report_reliability,
    )
