"""Runs compared (NN vs SIFT): hand-checked tables, and SIFT end to end in `ttt run`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ttt.eval.records import ResultsError
from ttt.report.compare import compare_records, format_comparison

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import tiny_spec

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def _rec(doc: str, task: str, nbytes: int, loglik: dict[int, float], select: float = 0.0) -> dict:
    return {
        "doc": doc,
        "task": task,
        "bytes": nbytes,
        "words": 10,
        "tokens": 20,
        "loglik": {str(k): v for k, v in loglik.items()},
        "neighbors": 2,
        "excluded": 0,
        "seconds": {"retrieve": 1.0, "train": 2.0, "score": 3.0, "select": select},
    }


def test_comparison_by_hand_on_shared_documents_and_checkpoints():
    nn = [
        _rec("a", "Github", 100, {0: -100.0, 1: -90.0, 2: -80.0}),
        _rec("b", "ArXiv", 300, {0: -300.0, 1: -270.0, 2: -240.0}),
        _rec("only-nn", "ArXiv", 50, {0: -1.0, 1: -1.0, 2: -1.0}),  # not shared: left out
    ]
    sift = [
        _rec("a", "Github", 100, {0: -100.0, 2: -70.0}, select=0.5),
        _rec("b", "ArXiv", 300, {0: -300.0, 2: -180.0}, select=1.5),
    ]
    c = compare_records({"nn": nn, "sift": sift})
    assert c["checkpoints"] == [0, 2] and c["documents"] == 2
    assert c["runs"]["nn"]["left_out"] == 1 and c["runs"]["sift"]["left_out"] == 0
    g_nn, g_sift = 80 / 100 / LN2, 70 / 100 / LN2
    a_nn, a_sift = 240 / 300 / LN2, 180 / 300 / LN2
    runs = c["runs"]
    assert runs["nn"]["tasks"]["Github"]["after"] == pytest.approx(g_nn)
    assert runs["sift"]["tasks"]["ArXiv"]["after"] == pytest.approx(a_sift)
    assert runs["sift"]["cost"]["seconds_per_document"]["select"] == pytest.approx(1.0)
    lines = format_comparison(c).splitlines()
    assert lines[0] == "| task | docs | nn (k=2) | sift (k=2) | sift - nn |"
    assert lines[2] == f"| ArXiv | 1 | {a_nn:.4f} | {a_sift:.4f} | {a_sift - a_nn:+.4f} |"
    assert lines[3] == f"| Github | 1 | {g_nn:.4f} | {g_sift:.4f} | {g_sift - g_nn:+.4f} |"
    # the Pile-weighted mean: ArXiv and Github weights (test bytes ignored: the paper's)
    mean_nn = runs["nn"]["mean"]["after"]
    mean_sift = runs["sift"]["mean"]["after"]
    assert lines[4] == (
        f"| **Pile-weighted mean** | 2 | {mean_nn:.4f} | {mean_sift:.4f} "
        f"| {mean_sift - mean_nn:+.4f} |"
    )
    assert a_sift < mean_sift < g_sift and a_nn == pytest.approx(g_nn) == mean_nn
    assert lines[-1] == "| sift | 1.000 | 1.0000 | 2.000 | 3.000 |"


def test_comparison_refuses_runs_without_common_ground():
    a = [_rec("a", "Github", 100, {0: -1.0})]
    with pytest.raises(ResultsError, match="at least two runs"):
        compare_records({"nn": a})
    with pytest.raises(ResultsError, match="no test document in common"):
        compare_records({"nn": a, "sift": [_rec("b", "Github", 100, {0: -1.0})]})
    with pytest.raises(ResultsError, match="share no checkpoint"):
        compare_records({"nn": a, "sift": [_rec("a", "Github", 100, {2: -1.0})]})


# --- end to end: `ttt run` with SIFT over redundant candidates, then `ttt report --compare` ---


def _redundant_specs(root: Path, model: Path | None = None) -> dict[str, Path]:
    """Two runs over a corpus where every training document has two near-copies."""
    specs = {}
    for selection in ("nearest", "sift"):
        text = tiny_spec(root, f"redundant-{selection}", shards=1)
        extra = "selection: sift, candidates: 6" if selection == "sift" else "selection: nearest"
        text = text.replace("inProcess: false}", f"inProcess: false, {extra}}}")
        text = text.replace("neighbors: 4", "neighbors: 2").replace("[0, 2, 4]", "[0, 1, 2]")
        text = text.replace("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1")
        text = text.replace("portion: 1.0", "portion: 1.0, tasks: [Licenses, Python Docs]")
        specs[selection] = root / f"{selection}.yaml"
        specs[selection].write_text(text)
    # short documents keep training cheap; each training document thrice, nearly the same
    for split, copies in (("train", 3), ("test", 1)):
        path = root / "corpus" / f"{split}.jsonl"
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        out = []
        for d in docs:
            text = d["text"][:400]
            out += [
                json.dumps({**d, "text": text + (f"\n(copy {c})" if c else "")})
                for c in range(copies)
            ]
        path.write_text("\n".join(out) + "\n")
    return specs


def _ttt(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(root), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ttt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


def _records(root: Path, name: str) -> list[dict]:
    path = root / "store" / "runs" / name / "eval" / "rank-00000" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.integration
def test_sift_end_to_end_selects_differently_where_candidates_are_redundant(tmp_path):
    from ttt.corpus import iter_documents

    specs = _redundant_specs(tmp_path)
    for selection, spec in specs.items():
        done = _ttt("run", str(spec), "--workdir", str(tmp_path / f"w-{selection}"), root=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    original = {
        d.id: d.text.split("\n(copy ")[0]
        for d in iter_documents([str(tmp_path / "corpus" / "train.jsonl")])
    }
    nn, sift = _records(tmp_path, "redundant-nearest"), _records(tmp_path, "redundant-sift")
    assert sorted(r["doc"] for r in nn) == sorted(r["doc"] for r in sift) and len(sift) == 2
    for r in nn:
        assert "selection" not in r and "select" not in r["seconds"]
        # NN trains on a document and its near-copy
        assert len({original[i] for i in r["neighbor_ids"]}) == 1
    for r in sift:
        assert r["selection"] == "sift" and r["candidates"] == 6 and r["seconds"]["select"] > 0
        assert r["neighbor_ranks"] != [0, 1]
        # different rows picked by SIFT are different documents, never copies of one
        assert len({original[i] for i in set(r["neighbor_ids"])}) == len(set(r["neighbor_ids"]))
        assert len(r["neighbor_ids"]) == 2 and set(r["checkpoint_neighbors"]) == {"0", "1", "2"}

    shown = _ttt(
        "report", "--spec", str(specs["sift"]), "--compare", str(specs["nearest"]), root=tmp_path
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "comparison over 2 shared test documents" in shown.stdout
    out = shown.stdout.split("comparison over")[1]  # after the run's own report table
    header = next(
        line for line in out.splitlines() if line.startswith("| task | docs | redundant-sift")
    )
    assert "redundant-nearest (nearest) (k=2)" in header
    summaries = {
        s: json.loads(
            (tmp_path / "store" / "runs" / f"redundant-{s}" / "report" / "summary.json").read_text()
        )
        for s in ("sift", "nearest")
    }
    for task in ("Licenses", "Python Docs"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {task} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(summaries["sift"]["tasks"][task]["after"], abs=1e-4)
        assert float(cells[3]) == pytest.approx(
            summaries["nearest"]["tasks"][task]["after"], abs=1e-4
        )
    compare = tmp_path / "store" / "runs" / "redundant-sift" / "report" / "compare"
    assert {p.name for p in compare.iterdir()} >= {
        "compare.json",
        "compare.md",
        "compare_bpb_vs_neighbors.png",
        "manifest.json",
    }
