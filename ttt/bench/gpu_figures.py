"""scripts/gpu-figures' runner: every bench of docs/performance.md's GPU table, in budget.

Each run is a child process (`ttt bench ttt ... --json` through the CLI, or the sync check)
with its own timeout, its output gathered into runs.log. On a GPU the children are spawned
(each imports torch afresh: no CUDA state is shared with a fork); with --smoke they are
forked after one import (a CPU's imports are slow). The parent touches CUDA only after the
last child ended.
Runs that time out are retried once with half the documents while the budget allows.
figures.json gathers every run's JSON and status; the table is written into the docs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt.bench import gpu_table

MIN_RUN_S = 15  # a run is not started with less of the budget left


@dataclass
class Run:
    name: str
    argv: list[str]  # the CLI's arguments, or the sync check's options
    cap_s: int  # its own timeout, before the budget's
    sync: bool = False  # the sync check (a function), not a CLI bench
    documents: int | None = None  # halved on a retry
    result: dict[str, Any] = field(default_factory=dict)


def plan_runs(smoke: bool) -> list[Run]:
    """The runs, cheapest first: the profile and the sync check, then the speed runs.

    On a GPU the presets' chunks (1024 tokens) and models, with fewer documents than the
    presets (about a minute of the paper's loop each, times three loops per run, would not
    fit 9 minutes for four runs): gpt2 16 documents x 16 neighbors with 8 members,
    gpt2-large 8 x 8 with 4. In smoke mode: tiny GPT-2 shapes on the CPU."""
    if smoke:
        shape = ["--layers", "1", "--width", "64", "--max-length", "32", "--device", "cpu"]
        sizes = {"gpt2": (2, 1, 2), "gpt2-large": (2, 1, 2)}  # documents, neighbors, members
        caps = {"gpt2": 90, "gpt2-large": 90, "profile": 90, "sync": 90}
    else:
        shape = []
        sizes = {
            "gpt2": (int(os.environ.get("GPT2_DOCUMENTS", "16")), 16, 8),
            "gpt2-large": (int(os.environ.get("GPT2_LARGE_DOCUMENTS", "8")), 8, 4),
        }
        caps = {"gpt2": 150, "gpt2-large": 210, "profile": 90, "sync": 90}
    runs = [
        Run(
            gpu_table.PROFILE_RUN,
            ["bench", "ttt", "--preset", "gpt2", "--profile", "--documents", "2"]
            + ["--neighbors", "2", "--members", "2", *shape, "--json"],
            caps["profile"],
        ),
        Run(
            gpu_table.SYNC_RUN,
            ["--preset", "gpt2", "--documents", "2", "--neighbors", "2", "--members", "2"] + shape,
            caps["sync"],
            sync=True,
        ),
    ]
    for name, preset, path in gpu_table.SPEED_RUNS:
        documents, neighbors, members = sizes[preset]
        path, flags = gpu_table.run_path(path)
        argv = ["bench", "ttt", "--preset", preset, "--path", path, "--neighbors", str(neighbors)]
        argv += ["--members", str(members), *flags, *shape, "--json"]
        runs.append(Run(name, argv, caps[preset], documents=documents))
    return runs


def run_argv(run: Run) -> list[str]:
    if run.documents is None:
        return run.argv
    return [*run.argv, "--documents", str(run.documents)]


def sync_check(argv: list[str]) -> dict[str, Any]:
    """Each engine path's training steps under the dispatch mode's count of host syncs and,
    on a GPU, CUDA's sync debug mode (each synchronizing call warns): per step."""
    import torch

    from ttt.bench.ttt import PRESETS, bench_texts, build_model
    from ttt.device import pick_device
    from ttt.engine.ensemble import EnsembleTTT
    from ttt.engine.profile import count_steps
    from ttt.spec import TTTSpec

    p = argparse.ArgumentParser()
    for name in ("--preset", "--device"):
        p.add_argument(name)
    for name in ("--documents", "--neighbors", "--members", "--layers", "--width"):
        p.add_argument(name, type=int)
    p.add_argument("--max-length", type=int)
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    where = pick_device(a.device or "auto")
    length = a.max_length or preset["max_length"]
    lm, tokenizer = build_model(preset["model"], where, a.layers, a.width)
    texts = bench_texts(tokenizer, a.documents, a.neighbors, length)
    items = [(i, text, nbrs, None) for i, (text, nbrs) in enumerate(texts)]
    spec = TTTSpec(
        model=preset["model"],
        dtype="auto",
        max_length=length,
        optimizer="adamw",
        weight_decay=0.0,
        eval_after=[0, a.neighbors],
        ensemble_size=a.members,
    )
    out: dict[str, Any] = {"device": str(where), "members": a.members, "chunk_tokens": length}
    for path in gpu_table.SYNC_PATHS:
        engine = EnsembleTTT(lm, tokenizer, spec, members=a.members, path=path)
        counted = count_steps(engine)
        cuda: list[int] = []
        inner = engine.train_step

        def step(*args: Any, inner: Any = inner, cuda: list[int] = cuda) -> Any:
            if where.type != "cuda":
                return inner(*args)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return inner(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    cuda.append(sum("synchroniz" in str(w.message) for w in caught))

        engine.train_step = step
        list(engine.evaluate_stream(items))
        later = counted[1:] or counted
        out[path] = {
            "steps": len(counted),
            "host_syncs_per_step_max": max(c.host_syncs for c in later) if later else None,
            "cuda_syncs_first_step": cuda[0] if cuda else None,
            "cuda_syncs_per_step_max": max(cuda[1:] or cuda) if cuda else None,
        }
        del engine
    return out


def _child(run: Run, log: str) -> None:
    """In the forked child: the run's output to `log`, its exit status the run's."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    if run.sync:
        print(json.dumps(sync_check(run.argv), indent=2))
        sys.stdout.flush()
        os._exit(0)
    from ttt.cli import main

    code = main(run_argv(run))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def execute(run: Run, timeout_s: float, work: Path, method: str = "fork") -> dict[str, Any]:
    """One run in a child process (forked, or spawned), killed at `timeout_s`; its status
    and JSON."""
    log = work / f"{run.name}.log"
    log.unlink(missing_ok=True)
    start = time.monotonic()
    child = multiprocessing.get_context(method).Process(target=_child, args=(run, str(log)))
    child.start()
    child.join(timeout_s)
    seconds = round(time.monotonic() - start, 1)
    result: dict[str, Any] = {"argv": run_argv(run), "seconds": seconds}
    if child.is_alive():
        child.terminate()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        return result | {"status": "timed out", "timeout_s": round(timeout_s)}
    text = log.read_text(errors="replace") if log.exists() else ""
    if child.exitcode != 0:
        return result | {"status": f"failed (exit {child.exitcode}, see runs.log)"}
    try:
        figures = gpu_table.extract_json(text)
    except ValueError as exc:
        return result | {"status": f"failed ({exc})"}
    (work / f"{run.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return result | {"status": "ok", "figures": figures}


def environment(repo: Path) -> dict[str, Any]:
    """What the figures were taken on (after the runs: this touches CUDA)."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    git = shutil.which("git")
    try:
        if git is None:
            raise OSError("no git")
        commit = subprocess.run(
            [git, "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if cuda else "a CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-figures", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 shapes on the CPU")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "gpu-figures"),
    )
    parser.add_argument("--docs", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--budget", type=float, default=530.0, help="seconds for all runs")
    parser.add_argument("--work", type=Path, default=None, help="per-run logs and JSON")
    parser.add_argument(
        "--start-method",
        choices=["fork", "spawn"],
        help="children forked after one import (default with --smoke) or spawned, each "
        "importing torch afresh (default on a GPU: no CUDA state is shared with a fork)",
    )
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    args.out.mkdir(parents=True, exist_ok=True)
    # per-run files stay out of --out: a lent machine sends back at most 8 files
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    method = args.start_method or ("fork" if args.smoke else "spawn")
    if method == "fork":
        import ttt.bench.ttt  # torch, transformers, the engine: once, before the forks
        import ttt.cli  # noqa: F401

    results: dict[str, Any] = {}
    for run in plan_runs(args.smoke):
        left = deadline - time.monotonic()
        if left < MIN_RUN_S:
            results[run.name] = {"argv": run_argv(run), "status": "skipped"}
            continue
        print(f"== {run.name}: {' '.join(run_argv(run))} (at most {min(run.cap_s, left):.0f} s)")
        result = execute(run, min(run.cap_s, left), work, method)
        left = deadline - time.monotonic()
        if result["status"] == "timed out" and (run.documents or 0) > 1 and left >= MIN_RUN_S:
            run.documents = max(1, run.documents // 2)  # fewer documents, once
            print(f"   timed out; again with {run.documents} documents")
            result = execute(run, min(run.cap_s, left), work, method) | {"retried": True}
        print(f"   {result['status']} in {result['seconds']} s")
        results[run.name] = result
    figures = {
        "smoke": args.smoke,
        "budget_s": args.budget,
        "seconds": round(time.monotonic() - start, 1),
        "env": environment(repo),
        "runs": results,
    }
    # back from a lent machine: at most 8 files, so one JSON, one log, the docs, the table
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    with open(args.out / "runs.log", "w") as log:
        for run in results:
            part = work / f"{run}.log"
            if part.exists():
                log.write(f"===== {run}\n{part.read_text(errors='replace')}\n")
    block = gpu_table.render(figures)
    (args.out / "gpu-table.md").write_text(block + "\n")
    gpu_table.write_docs(args.docs, block)
    if args.out.resolve() != args.docs.resolve().parent:
        shutil.copy(args.docs, args.out / "performance.md")
    print(block)
    ok = all(r.get("status") == "ok" for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
