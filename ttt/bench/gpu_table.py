"""docs/performance.md's GPU table, rendered from the figures scripts/gpu-figures measured.

The table lives between two markers in the docs; everything in it comes from the runs'
JSON (`ttt bench ttt --json` per run, gathered into one figures.json): no figure is typed
in. Before a GPU run the block says the figures are not yet taken.

    python -m ttt.bench.gpu_table --results figures.json --docs docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- gpu-figures:begin -->"
END = "<!-- gpu-figures:end -->"

# the speed runs, in the table's order: (run name, preset, the engine's path)
SPEED_RUNS = [
    ("gpt2-loop", "gpt2", "loop"),
    ("gpt2-stacked", "gpt2", "stacked"),
    ("gpt2-large-loop", "gpt2-large", "loop"),
    ("gpt2-large-stacked", "gpt2-large", "stacked"),
    ("gpt2-stacked-compiled", "gpt2", "stacked+compile"),  # last: while the budget lasts
]


def run_path(path: str) -> tuple[str, list[str]]:
    """A SPEED_RUNS path as `ttt bench ttt` takes it: the path and any flags after a +."""
    name, *flags = path.split("+")
    return name, [f"--{flag}" for flag in flags]


def run_label(path: str) -> str:
    """A SPEED_RUNS path as the table names it: "stacked, compiled"."""
    name, flags = run_path(path)
    return ", ".join([name, *("compiled" for f in flags if f == "--compile")])


PROFILE_RUN, SYNC_RUN = "profile", "sync"
SYNC_PATHS = ("loop", "vmap", "stacked")  # the engine's paths, each checked for syncs
PROFILE_ROWS = [
    ("sequential", "sequential (`ttt/train.py`)"),
    ("engine_loop", "engine, loop path"),
    ("engine_vmap", "engine, vmap path"),
    ("engine_stacked", "engine, stacked path"),
]

NOT_YET = (
    "GPU figures: **not yet taken**. No GPU was lent to the session that wrote "
    "`scripts/gpu-figures`; its header says how to run it on one and bring this table back."
)


def extract_json(text: str) -> dict[str, Any]:
    """The figures a `ttt bench ... --json` run printed: the last JSON object of its output
    (json.dumps(indent=2) puts its opening brace alone on a line)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "{":
            try:
                found = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    raise ValueError("no JSON object at the end of the output (was --json given?)")


def num(value: Any) -> str:
    """A figure as the JSON holds it, with thousands separators; '-' where there is none."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return format(value, ",")


def _not_taken(run: dict[str, Any] | None) -> str:
    if run is None:
        return "not taken: not run"
    status = run.get("status", "missing")
    if status == "timed out":
        return f"not taken: timed out after {num(run.get('timeout_s'))} s"
    if status == "skipped":
        return "not taken: skipped (the time budget was spent)"
    return f"not taken: {status}"


def speed_table(runs: dict[str, Any]) -> list[str]:
    out = [
        (
            "| preset, path | model | documents x neighbors, chunk | members | "
            "ms per neighbor: paper / sequential / ours | ours tokens/s | ours TFLOP/s "
            "(% of peak) | ours vs paper | ours vs sequential | bpb before -> after (ours) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, preset, path in SPEED_RUNS:
        run = runs.get(name)
        f = (run or {}).get("figures")
        if not f:
            out.append(f"| {preset}, {run_label(path)} | {_not_taken(run)} |" + " |" * 8)
            continue
        retried = " (documents halved after a timeout)" if run.get("retried") else ""
        out.append(
            f"| {preset}, {run_label(path)}{retried} | {f['model']} ({num(f['parameters_M'])}M), "
            f"{f['ours_precision']} | {num(f['documents'])} x {num(f['neighbors_per_document'])}, "
            f"{num(f['chunk_tokens'])} tokens | {num(f['ours_members'])} | "
            f"{num(f['paper_ms_per_neighbor'])} / {num(f['sequential_ms_per_neighbor'])} / "
            f"{num(f['ours_ms_per_neighbor'])} | {num(f['ours_tokens_per_second'])} | "
            f"{num(f['ours_tflops'])} ({num(f['ours_percent_of_peak'])} % of "
            f"{num(f['peak_tflops'])}, {f['peak_source']}) | {num(f['speedup_vs_paper'])}x | "
            f"{num(f['speedup_vs_sequential'])}x | "
            f"{num(f['ours_bpb_before'])} -> {num(f['ours_bpb_after'])} |"
        )
    return out


def profile_table(run: dict[str, Any] | None) -> list[str]:
    f = (run or {}).get("figures")
    if not f:
        return [f"Step profile (`--profile`): {_not_taken(run)}."]
    out = [
        (
            "| path | operators | kernels | bytes allocated / param | parameter traffic / param "
            "| host syncs | attention | held bytes / param |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in PROFILE_ROWS:
        row = f.get(key)
        if not row:
            out.append(f"| {label} | not in the profile's output |" + " |" * 6)
            continue
        held = (f.get(f"{key}_held_bytes_per_param") or {}).get("total")
        out.append(
            f"| {label} | {num(row['operators'])} | {num(row.get('kernels'))} | "
            f"{num(row['bytes_allocated_per_param'])} | "
            f"{num(row['param_traffic_bytes_per_param'])} | {num(row['host_syncs'])} | "
            f"{row['attention']} | {num(held)} |"
        )
    out.append(
        f"\n{num(f.get('parameters'))} parameters, {num(f.get('layers'))} layers; "
        f"resident peak {num(f.get('resident_peak_bytes_per_param'))} bytes per parameter."
    )
    return out


def sync_table(run: dict[str, Any] | None) -> list[str]:
    f = (run or {}).get("figures")
    if not f:
        return [f"Sync check: {_not_taken(run)}."]
    out = [
        (
            "| path | steps | host syncs per step, counted (dispatch mode) | "
            "syncs per step, CUDA's sync debug mode | first step, CUDA's sync debug mode |"
        ),
        "|---|---|---|---|---|",
    ]
    for path in SYNC_PATHS:
        row = f.get(path) or {}
        cuda = row.get("cuda_syncs_per_step_max")
        first = row.get("cuda_syncs_first_step")
        na = f"n/a ({f.get('device')}: no CUDA)"
        out.append(
            f"| {path} | {num(row.get('steps'))} | {num(row.get('host_syncs_per_step_max'))} | "
            f"{na if cuda is None else num(cuda)} | {na if first is None else num(first)} |"
        )
    return out


def render(figures: dict[str, Any]) -> str:
    """The block between the markers, from figures.json (scripts/gpu-figures' output)."""
    env = figures.get("env") or {}
    runs = figures.get("runs") or {}
    lines = []
    if figures.get("smoke"):
        lines += [
            "**Smoke run on a CPU with tiny GPT-2 shapes: these are not GPU figures.**",
            "",
        ]
    lines += [
        (
            f"Taken {env.get('date', '?')} by `scripts/gpu-figures` on {env.get('device', '?')} "
            f"(torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}, transformers "
            f"{env.get('transformers', '?')}, commit {env.get('commit', '?')}); "
            f"{num(figures.get('seconds'))} s of a {num(figures.get('budget_s'))} s budget. "
            "Each row is one process: the paper's loop, the sequential loop and the engine on "
            "the same documents; compare ratios within a row."
        ),
        "",
        *speed_table(runs),
        "",
        *profile_table(runs.get(PROFILE_RUN)),
        "",
        *sync_table(runs.get(SYNC_RUN)),
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what stands between the markers replaced by `block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN} ... {END} are not in the document")
    return f"{text[: start + len(BEGIN)]}\n{block}\n{text[end:]}"


def write_docs(path: Path, block: str) -> None:
    path.write_text(replace_block(path.read_text(), block))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttt.bench.gpu_table", description=__doc__)
    parser.add_argument("--results", type=Path, help="figures.json from scripts/gpu-figures")
    parser.add_argument("--docs", type=Path, default=Path("docs/performance.md"))
    parser.add_argument(
        "--not-yet", action="store_true", help="write the 'not yet taken' block instead"
    )
    args = parser.parse_args(argv)
    if args.not_yet:
        block = NOT_YET
    elif args.results is None:
        parser.error("--results or --not-yet")
    else:
        block = render(json.loads(args.results.read_text()))
    write_docs(args.docs, block)
    print(f"wrote the GPU table into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
