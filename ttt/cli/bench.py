"""`ttt bench embed|index|retrieval|ttt|reliability`: figures and the command behind them."""

from __future__ import annotations

import argparse
import json


def _embed(args: argparse.Namespace) -> dict:
    from ttt.bench.embed import bench_embed

    return bench_embed(
        preset=args.preset,
        model=args.model,
        documents=args.documents,
        batch_tokens=args.batch_tokens,
        max_tokens=args.max_tokens,
        device=args.device,
        corpus=args.corpus,
        seed=args.seed,
    )


def _index(args: argparse.Namespace) -> dict:
    from ttt.bench.index import bench_index

    return bench_index(
        preset=args.preset,
        vectors=args.vectors,
        dim=args.dim,
        index_type=args.type,
        nprobe=args.nprobe,
        rerank=args.rerank,
        k=args.k,
        queries=args.queries,
        embeddings=args.embeddings,
        use_gpu=args.use_gpu,
        seed=args.seed,
    )


def _retrieval(args: argparse.Namespace) -> dict:
    from ttt.bench.retrieval import bench_retrieval

    return bench_retrieval(
        args.preset,
        shards=args.shards,
        vectors_per_shard=args.vectors_per_shard,
        dim=args.dim,
        k=args.k,
        queries=args.queries,
        batch=args.batch,
        doc_bytes=args.doc_bytes,
        seed=args.seed,
        with_text=args.with_text,
    )


def _reliability(args: argparse.Namespace) -> dict:
    from ttt.bench.reliability import bench_reliability

    figures = bench_reliability(args.preset, out=args.out)
    if args.out:
        print(f"wrote {args.out}")
    failed = [r["fault"] for r in figures["faults"] if not r["ok"]]
    print(f"fault matrix: {len(figures['faults']) - len(failed)}/{len(figures['faults'])} "
          "as expected" + (f"; NOT: {failed}" if failed else ""))  # fmt: skip
    return figures


def _ttt(args: argparse.Namespace) -> dict:
    from ttt.bench.ttt import bench_ttt

    return bench_ttt(
        preset=args.preset,
        model=args.model,
        documents=args.documents,
        neighbors=args.neighbors,
        max_length=args.max_length,
        members=args.members,
        path=args.path,
        device=args.device,
        layers=args.layers,
        width=args.width,
        seed=args.seed,
    )


def _runner(bench):
    def run(args: argparse.Namespace) -> int:
        figures = bench(args)
        if args.json:
            print(json.dumps(figures, indent=2, default=str))
        return 0

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: embedding, index build, fan-out retrieval, TTT-NN training",
        epilog="example: ttt bench retrieval --preset cpu --json",
    )
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    e = benches.add_parser(
        "embed",
        help="embedding tokens/s: ours vs the paper's path (batches of 16, fp32)",
        epilog="example: ttt bench embed --preset cpu",
    )
    e.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    e.add_argument("--model", default="all-minilm-l6-v2")
    e.add_argument("--documents", type=int)
    e.add_argument("--batch-tokens", type=int)
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--device")
    e.add_argument("--corpus", nargs="+", help="Pile-format files instead of synthetic text")
    e.set_defaults(func=_runner(_embed))

    i = benches.add_parser(
        "index",
        help="index build seconds, bytes per vector and recall@k: flat vs approximate",
        epilog="example: ttt bench index --preset cpu --type IVF256,PQ32 --nprobe 16",
    )
    i.add_argument("--preset", choices=["cpu", "cpu-1m", "gpu"], default="cpu")
    i.add_argument("--vectors", type=int)
    i.add_argument("--dim", type=int)
    i.add_argument("--type", help="FAISS factory string of the approximate index")
    i.add_argument("--nprobe", type=int)
    i.add_argument(
        "--rerank",
        type=int,
        help="re-rank k x RERANK candidates exactly against the vectors on disk "
        "(0 = off; default: the preset's)",
    )
    i.add_argument("--k", type=int, default=50)
    i.add_argument("--queries", type=int)
    i.add_argument("--embeddings", help="a published embeddings.npy instead of synthetic vectors")
    i.add_argument("--use-gpu", choices=["auto", "always", "never"], default="auto")
    i.set_defaults(func=_runner(_index))

    r = benches.add_parser(
        "retrieval",
        help="fan-out query latency p50/p99 and resident memory of local shard servers",
        epilog="example: ttt bench retrieval --preset cpu --shards 3",
    )
    r.add_argument("--preset", choices=["cpu", "large"], default="cpu")
    r.add_argument("--shards", type=int)
    r.add_argument("--vectors-per-shard", type=int)
    r.add_argument("--dim", type=int)
    r.add_argument("--k", type=int)
    r.add_argument("--queries", type=int)
    r.add_argument("--batch", type=int)
    r.add_argument(
        "--doc-bytes",
        type=int,
        help="serve a text store of documents this long and report the servers' resident "
        "memory against its text and offsets bytes (0 = synthetic texts, no store)",
    )
    r.add_argument("--with-text", action="store_true")
    r.set_defaults(func=_runner(_retrieval))

    t = benches.add_parser(
        "ttt",
        help="TTT-NN ms per neighbor, TFLOP/s and bpb: the paper's loop vs ours, one process",
        epilog="example: ttt bench ttt --preset cpu",
    )
    t.add_argument("--preset", choices=["cpu", "gpt2", "gpt2-large"], default="cpu")
    t.add_argument("--model", help="an offline name, HF id or path instead of the preset's")
    t.add_argument("--documents", type=int)
    t.add_argument("--neighbors", type=int, help="neighbors per document")
    t.add_argument("--max-length", type=int, help="tokens per training chunk")
    t.add_argument("--members", type=int, help="ensemble size (default: from free memory)")
    t.add_argument(
        "--path",
        choices=["vmap", "loop"],
        help="the engine's path (default: vmap without dropout, loop with it; vmap with "
        "dropout draws each member's masks independently)",
    )
    t.add_argument("--device")
    t.add_argument("--layers", type=int, help="GPT-2 presets: fewer layers (tests, CPUs)")
    t.add_argument("--width", type=int, help="GPT-2 presets: a smaller width")
    t.set_defaults(func=_runner(_ttt))

    for parser in (e, i, r, t):
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--json", action="store_true", help="also print the figures as JSON")

    rel = benches.add_parser(
        "reliability",
        help="fault matrix, fuzzing (hypothesis, schemathesis), loopback load, bandit",
        epilog="example: ttt bench reliability --out docs/reliability.md",
    )
    rel.add_argument("--preset", choices=["full", "quick"], default="full")
    rel.add_argument("--out", help="write the Markdown page here (docs/reliability.md)")
    rel.add_argument("--json", action="store_true", help="also print the figures as JSON")
    rel.set_defaults(func=_runner(_reliability))
