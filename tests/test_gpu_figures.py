"""scripts/gpu-figures: run for real in smoke mode, its table written from the measured JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ttt.bench import gpu_table
from ttt.bench.gpu_table import BEGIN, END, NOT_YET, extract_json, num, render, replace_block

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "performance.md"


def block_of(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_the_json_is_read_from_the_end_of_a_bench_output():
    out = '== TTT-NN speed\n  x  1.0\n{\n  "a": {\n    "b": 2\n  }\n}\n'
    assert extract_json(out) == {"a": {"b": 2}}
    with pytest.raises(ValueError, match="--json"):
        extract_json("== no json here\n")


def test_the_table_is_rendered_from_the_figures_and_says_what_was_not_taken():
    speed = {
        "model": "gpt2", "parameters_M": 124.4, "ours_precision": "bfloat16", "ours_path": "loop",
        "documents": 16, "neighbors_per_document": 16, "chunk_tokens": 1024, "ours_members": 8,
        "paper_ms_per_neighbor": 1234.5, "sequential_ms_per_neighbor": 1111.25,
        "ours_ms_per_neighbor": 43.21, "ours_tokens_per_second": 23456.7, "ours_tflops": 17.5,
        "ours_percent_of_peak": 2.21, "peak_tflops": 790.0, "peak_source": "measured",
        "speedup_vs_paper": 28.57, "speedup_vs_sequential": 25.72, "ours_bpb_before": 4.1,
        "ours_bpb_after": 3.9,
    }  # fmt: skip
    figures = {
        "env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
        "runs": {
            "gpt2-loop": {"status": "ok", "figures": speed},
            "gpt2-stacked": {"status": "timed out", "timeout_s": 150},
            "gpt2-large-loop": {"status": "skipped"},
        },
    }
    table = render(figures)
    (row,) = [line for line in table.splitlines() if line.startswith("| gpt2, loop |")]
    for key in ("paper_ms_per_neighbor", "ours_ms_per_neighbor", "ours_tokens_per_second"):
        assert num(speed[key]) in row
    assert "1,234.5 / 1,111.25 / 43.21" in row and "28.57x" in row
    assert "| gpt2, stacked | not taken: timed out after 150 s |" in table
    assert "| gpt2-large, loop | not taken: skipped" in table
    assert "| gpt2-large, stacked | not taken: not run |" in table
    assert "Step profile (`--profile`): not taken: not run." in table
    assert "NVIDIA H100 80GB HBM3" in table and "Smoke" not in table
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", table)


def test_the_docs_hold_the_markers_and_no_smoke_figures():
    block = block_of(DOCS.read_text())
    assert block == NOT_YET or ("Smoke run" not in block and "| gpt2, loop |" in block)


@pytest.mark.slow
def test_the_script_runs_every_bench_and_writes_the_table_from_their_json(tmp_path):
    docs = tmp_path / "performance.md"
    docs.write_text(DOCS.read_text())
    out = tmp_path / "out"
    env = os.environ | {"PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        [str(REPO / "scripts" / "gpu-figures"), "--smoke", "--out", str(out), "--docs", str(docs)]
        + ["--budget", "240", "--work", str(tmp_path / "work")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "figures.json", "gpu-table.md", "performance.md", "runs.log",
    ]  # fmt: skip
    figures = json.loads((out / "figures.json").read_text())
    runs = figures["runs"]
    names = [name for name, _, _ in gpu_table.SPEED_RUNS] + ["profile", "sync"]
    assert sorted(runs) == sorted(names)
    assert all(runs[name]["status"] == "ok" for name in names)
    written = docs.read_text()
    before = DOCS.read_text()
    # only the block between the markers changed
    assert written[: written.index(BEGIN)] == before[: before.index(BEGIN)]
    assert written[written.index(END) :] == before[before.index(END) :]
    block = block_of(written)
    assert block == (out / "gpu-table.md").read_text().strip() == render(figures).strip()
    assert "Smoke run on a CPU" in block
    for name, preset, path in gpu_table.SPEED_RUNS:
        f = runs[name]["figures"]
        # each run's own measured JSON, as the CLI printed it (its log holds the same)
        assert f == json.loads((tmp_path / "work" / f"{name}.json").read_text())
        assert f["ours_path"] == path.split("+")[0] and f["model"] == preset
        assert f["device"] == "cpu" and f["ours_compile"] == ("+compile" in path)
        label = gpu_table.run_label(path)
        (row,) = [line for line in block.splitlines() if line.startswith(f"| {preset}, {label} |")]
        measured = " / ".join(
            num(f[f"{loop}_ms_per_neighbor"]) for loop in ("paper", "sequential", "ours")
        )
        assert measured in row and f"{num(f['speedup_vs_paper'])}x" in row
    profile = runs["profile"]["figures"]
    for key, label in gpu_table.PROFILE_ROWS:
        (row,) = [line for line in block.splitlines() if line.startswith(f"| {label} |")]
        assert f"| {num(profile[key]['operators'])} | {num(profile[key]['kernels'])} |" in row
    sync = runs["sync"]["figures"]
    for path in gpu_table.SYNC_PATHS:
        assert sync[path]["steps"] > 0 and sync[path]["cuda_syncs_per_step_max"] is None
        assert sync[path]["host_syncs_per_step_max"] == 0  # the engine's steps: no host sync
