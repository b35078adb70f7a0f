"""Tests of ttt.report: figures pinned against hand-computed sums, rank merging, files, CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from ttt.cli import main
from ttt.eval.records import ResultsError
from ttt.report import build_report, format_table, summarize
from ttt.spec import parse_spec
from ttt.store import open_store

LN2 = math.log(2)
W_GITHUB, W_ARXIV = 7.59, 8.96  # the Pile's weights of the two tasks (percent, as tttlm)


def make_run(tmp: Path):
    raw = {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTRun",
        "metadata": {"name": "tiny"},
        "spec": {
            "ttt": {"evalAfter": [0, 2]},
            "storage": {"root": str(tmp / "store")},
            "metrics": {"enabled": False},
        },
    }
    return parse_spec(raw, environ={})


def records(spec_hash: str) -> list[dict]:
    def rec(doc, task, nbytes, words, loglik, seconds, neighbors, excluded=0, partial=False):
        return {
            "doc": doc, "task": task, "bytes": nbytes, "words": words, "tokens": nbytes // 3,
            "loglik": loglik, "spec_hash": spec_hash, "neighbors": neighbors,
            "excluded": excluded, "partial": partial, "failed_shards": [1] if partial else [],
            "seconds": dict(zip(("retrieve", "train", "score"), seconds, strict=True)),
        }  # fmt: skip

    return [
        rec("g:1", "Github", 100, 20, {"0": -200.0, "1": -150.0, "2": -120.0}, (1, 2, 3), 2, 1),
        # retrieved only one neighbor: its score at k=2 is the one after that neighbor
        rec("g:2", "Github", 50, 10, {"0": -60.0, "1": -40.0}, (0.5, 1, 1.5), 1, partial=True),
        rec("a:1", "ArXiv", 80, 16, {"0": -100.0, "2": -90.0}, (1, 1, 1), 2),
    ]


GITHUB_BEFORE, GITHUB_AFTER = 260 / 150 / LN2, 160 / 150 / LN2
ARXIV_BEFORE, ARXIV_AFTER = 100 / 80 / LN2, 90 / 80 / LN2


def weighted(github: float, arxiv: float) -> float:
    return (W_GITHUB * github + W_ARXIV * arxiv) / (W_GITHUB + W_ARXIV)


def test_summary_pinned_against_hand_computed_sums():
    s = summarize(records("h"), [0, 2])
    g, a = s["tasks"]["Github"], s["tasks"]["ArXiv"]
    assert list(s["tasks"]) == ["ArXiv", "Github"]
    assert (g["documents"], g["bytes"], g["words"]) == (2, 150, 30)
    assert g["before"] == pytest.approx(GITHUB_BEFORE, rel=1e-12)
    assert g["after"] == pytest.approx(GITHUB_AFTER, rel=1e-12)
    assert g["difference"] == pytest.approx(GITHUB_AFTER - GITHUB_BEFORE, rel=1e-12)
    assert g["checkpoints"]["0"]["byte_perplexity"] == pytest.approx(math.exp(260 / 150))
    assert g["checkpoints"]["0"]["word_perplexity"] == pytest.approx(math.exp(260 / 30))
    assert g["checkpoints"]["2"]["word_perplexity"] == pytest.approx(math.exp(160 / 30))
    assert a["before"] == pytest.approx(ARXIV_BEFORE) and a["after"] == pytest.approx(ARXIV_AFTER)
    assert s["mean"]["before"] == pytest.approx(weighted(GITHUB_BEFORE, ARXIV_BEFORE))
    assert s["mean"]["after"] == pytest.approx(weighted(GITHUB_AFTER, ARXIV_AFTER))
    assert (g["neighbors_used"], g["neighbors_excluded"], g["partial_retrievals"]) == (3, 1, 1)
    assert (s["neighbors_excluded"], s["partial_retrievals"], s["documents"]) == (1, 1, 3)
    assert s["cost"]["seconds"] == pytest.approx({"retrieve": 2.5, "train": 4.0, "score": 5.5})
    assert s["cost"]["seconds_per_document"]["score"] == pytest.approx(5.5 / 3)
    # the curve at an intermediate checkpoint
    s1 = summarize(records("h"), [0, 1, 2])
    assert s1["tasks"]["Github"]["checkpoints"]["1"]["bits_per_byte"] == pytest.approx(
        190 / 150 / LN2
    )
    assert s1["tasks"]["ArXiv"]["checkpoints"]["1"]["bits_per_byte"] == pytest.approx(ARXIV_BEFORE)


def test_table_is_the_papers():
    table = format_table(summarize(records("h"), [0, 2]))
    lines = table.splitlines()
    assert lines[0] == (
        "| task | docs | before (k=0) | after (k=2) | difference | after 10-90 % "
        "| ref. docs | ref. before | ref. after |"
    )
    s = summarize(records("h"), [0, 2])
    lo, hi = s["tasks"]["Github"]["error_bars"]["2"]
    # the reference's median rule keeps g:2 only (int(median([3, 2])) = 2: tttlm's code)
    assert lines[3] == (
        f"| Github | 2 | {GITHUB_BEFORE:.3f} | {GITHUB_AFTER:.3f} "
        f"| {GITHUB_AFTER - GITHUB_BEFORE:+.3f} | {lo:.3f}-{hi:.3f} "
        f"| 1 | {60 / 50 / LN2:.3f} | {40 / 50 / LN2:.3f} |"
    )
    mean_before, mean_after = (
        weighted(GITHUB_BEFORE, ARXIV_BEFORE),
        weighted(GITHUB_AFTER, ARXIV_AFTER),
    )
    assert lines[4].startswith(
        f"| **Pile-weighted mean** | 3 | {mean_before:.3f} | {mean_after:.3f} "
        f"| {mean_after - mean_before:+.3f} |"
    )
    assert "| 2 |" in lines[4][-30:]  # the reference's rule counts 2 documents
    assert "bootstrap over documents, 1,000 resamples, 10-90 % quantiles" in table


def _curve_records(h: str = "h") -> list[dict]:
    """Github: two documents with 2 neighbors, one with 1 (the median rule drops it)."""

    def rec(doc, nbytes, loglik, neighbors):
        return {
            "doc": doc, "task": "Github", "bytes": nbytes, "words": 10, "tokens": 10,
            "loglik": loglik, "spec_hash": h, "neighbors": neighbors,
            "checkpoint_neighbors": {k: min(int(k), neighbors) for k in loglik},
        }  # fmt: skip

    return [
        rec("g:1", 100, {"0": -100.0, "2": -80.0}, 2),
        rec("g:2", 100, {"0": -120.0, "2": -70.0}, 2),
        rec("g:3", 50, {"0": -90.0, "2": -85.0}, 1),  # fewer than k neighbors
    ]


def test_both_aggregations_side_by_side_with_their_document_counts():
    s = summarize(_curve_records(), [0, 2])
    assert s["tasks"]["Github"]["documents"] == 3
    assert s["tasks"]["Github"]["after"] == pytest.approx(235 / 250 / LN2)
    ref = s["reference_aggregation"]
    assert ref["documents"] == 2 and ref["tasks"]["Github"]["documents"] == 2
    assert ref["tasks"]["Github"]["before"] == pytest.approx(220 / 200 / LN2)
    assert ref["tasks"]["Github"]["after"] == pytest.approx(150 / 200 / LN2)
    assert ref["mean"]["after"] == pytest.approx(150 / 200 / LN2)


def test_bootstrap_error_bars_per_task_and_for_the_mean():
    from ttt.report.aggregate import bootstrap

    rows = _curve_records()
    s = summarize(rows, [0, 2])
    per_doc = [-r["loglik"]["2"] / r["bytes"] / LN2 for r in rows]
    lo, hi = s["tasks"]["Github"]["error_bars"]["2"]
    assert min(per_doc) <= lo < s["tasks"]["Github"]["after"] < hi <= max(per_doc)
    assert s["mean"]["error_bars"]["2"] == pytest.approx([lo, hi])  # one task: the same
    # one document: every resample is that document
    one = bootstrap(rows[:1], [0, 2])
    assert one["tasks"]["Github"]["2"] == pytest.approx([0.8 / LN2, 0.8 / LN2])
    # 1,000 resamples, 10 % and 90 % quantiles: against a plain resampling loop
    import numpy as np

    rng = np.random.default_rng(5)
    many = [dict(rows[i % 3], doc=f"d{i}", bytes=50 + 7 * i) for i in range(30)]
    ll = np.array([r["loglik"]["2"] for r in many])
    nb = np.array([r["bytes"] for r in many], float)
    samples = []
    for _ in range(4000):
        idx = rng.integers(0, 30, 30)
        samples.append(-ll[idx].sum() / nb[idx].sum() / LN2)
    want = np.quantile(samples, [0.1, 0.9])
    got = bootstrap(many, [2])["tasks"]["Github"]["2"]
    assert got == pytest.approx(want, rel=0.02)


def test_the_median_rule_only_for_the_methods_whose_reference_script_applies_it():
    for method in ("ttt-nn", "dynamic-eval"):
        ref = summarize(_curve_records(), [0, 2], method)["reference_aggregation"]
        assert ref["documents"] == 2 and ref["median_rule"]
    for method in ("in-context", "interpolation"):
        s = summarize(_curve_records(), [0, 2], method)
        ref = s["reference_aggregation"]
        # tttlm's baseline scripts count every document: the ref. columns equal the first ones
        assert ref["documents"] == 3 and not ref["median_rule"]
        assert ref["mean"]["after"] == pytest.approx(s["mean"]["after"])
        assert "counts every document (no median rule)" in format_table(s)


def test_cost_as_the_paper_counts_it_and_loss_per_neighbor_rank():
    rows = [
        dict(r, seconds={"retrieve": 0.0, "train": 4.0, "score": 3.0}, score_passes=3,
             train_losses=[2.0, 1.0])
        for r in _curve_records()[:2]
    ]  # fmt: skip
    s = summarize(rows, [0, 2])
    # training 8 s over 4 neighbors; one scoring pass is 1 s, charged once per neighbor
    assert s["cost"]["train_seconds_per_neighbor"] == pytest.approx(2.0)
    assert s["cost"]["paper_seconds_per_neighbor"] == pytest.approx(3.0)
    assert s["cost"]["tasks"]["Github"]["paper_seconds_per_neighbor"] == pytest.approx(3.0)
    assert s["training_loss_by_rank"] == {"1": 2.0, "2": 1.0}
    assert "seconds per neighbor" not in format_table(s)  # seconds vary between re-runs
    table = format_table(s)  # deterministic: losses, not seconds
    assert "Mean training loss by neighbor rank: 2.000 (rank 1) -> 1.000 (rank 2)" in table


def _timed(doc: str, task: str, seconds: float, losses: list[float], nbytes: int = 100) -> dict:
    """A document trained on len(losses) neighbors at `seconds` each (one scoring pass: 0)."""
    return {
        "doc": doc, "task": task, "bytes": nbytes, "words": 10, "tokens": 10,
        "loglik": {"0": -100.0}, "spec_hash": "h", "neighbors": len(losses),
        "seconds": {"train": seconds * len(losses), "score": 0.0}, "score_passes": 1,
        "train_losses": losses,
    }  # fmt: skip


def test_seconds_per_neighbor_is_the_pile_weighted_mean_of_per_task_means_as_the_paper():
    from paper_figures import GPT2_LARGE

    # each task's documents at the paper's per-task seconds; Pile-CC has 50 documents, Books3 1:
    # pooled over documents the cheap tasks dominate, the reference weighs tasks by the Pile
    rows = []
    for task, (sec, _docs) in GPT2_LARGE.items():
        count = 50 if task == "Pile-CC" else 1
        rows += [_timed(f"{task}:{i}", task, sec, [1.0] * 50) for i in range(count)]
    cost = summarize(rows, [0])["cost"]
    assert round(cost["paper_seconds_per_neighbor"], 2) == 18.70  # the paper's GPT-2 Large
    assert cost["tasks"]["Books3"]["paper_seconds_per_neighbor"] == pytest.approx(100.87)
    pooled = sum(s * (50 if t == "Pile-CC" else 1) for t, (s, _) in GPT2_LARGE.items()) / 71
    assert pooled < 8  # what pooling documents gave: not the paper's figure


def test_loss_by_rank_and_cost_use_median_length_curves_and_task_weights():
    rows = [
        # Github: two documents with 2 neighbors, one with 1 (dropped by the median rule)
        _timed("g:1", "Github", 2.0, [2.0, 1.0]),
        _timed("g:2", "Github", 4.0, [4.0, 3.0]),
        _timed("g:3", "Github", 100.0, [9.0]),
        # ArXiv: one document
        _timed("a:1", "ArXiv", 10.0, [1.0, 0.5]),
    ]
    s = summarize(rows, [0])
    wg, wa = W_GITHUB / (W_GITHUB + W_ARXIV), W_ARXIV / (W_GITHUB + W_ARXIV)
    assert s["cost"]["tasks"]["Github"]["paper_seconds_per_neighbor"] == pytest.approx(3.0)
    assert s["cost"]["tasks"]["Github"]["documents"] == 2
    assert s["cost"]["paper_seconds_per_neighbor"] == pytest.approx(wg * 3.0 + wa * 10.0)
    assert s["training_loss_by_rank"] == pytest.approx(
        {"1": wg * 3.0 + wa * 1.0, "2": wg * 2.0 + wa * 0.5}
    )
    # the table keeps every document pooled, as its other first columns
    assert s["training_loss_by_rank_pooled"] == pytest.approx({"1": 4.0, "2": 1.5})


def test_interpolation_reports_the_best_mixing_weight_per_task():
    mix_good = [-100.0 + i for i in range(10)] + [-92.0 - i for i in range(10)]  # best a = 0.09
    rows = [
        dict(r, loglik={"0": -100.0, "2": -100.0}, mix_loglik={"0": [-100.0] * 20, "2": mix_good})
        for r in _curve_records()[:2]
    ]
    s = summarize(rows, [0, 2])
    g = s["tasks"]["Github"]
    assert g["mixing_weight"]["2"] == 0.09
    assert g["after"] == pytest.approx(2 * 91 / 200 / LN2)
    assert g["before"] == pytest.approx(2 * 100 / 200 / LN2)
    assert "Interpolation: the best mixing weight per task at k=2: Github 0.09" in format_table(s)


def _publish_ranks(run, store) -> None:
    h = run.stage_hash("eval")
    rank0, rank1 = records(h)[:2], records(h)[2:]
    twice = dict(records(h)[0], loglik={"0": -1.0, "2": -1.0})  # a doc two ranks both did
    stale = dict(records(h)[2], doc="a:2", spec_hash="another-spec")
    lines0 = "".join(json.dumps(r) + "\n" for r in rank0).encode()
    lines1 = "".join(json.dumps(r) + "\n" for r in [*rank1, twice, stale]).encode()
    store.ensure_bucket()
    torn = store.root / "rank0.jsonl"
    torn.write_bytes(lines0 + b'{"doc": "g:')
    manifest = {"spec_hash": h, "world_size": 2, "count": 2}
    store.publish(f"{run.prefix}/eval/rank-00000", {"results.jsonl": torn}, manifest)
    store.put_bytes(f"{run.prefix}/eval/rank-00001/results.jsonl", lines1)


def test_build_report_merges_ranks_and_writes_the_files(tmp_path):
    run = make_run(tmp_path)
    store = open_store(run.spec.storage)
    _publish_ranks(run, store)
    with pytest.raises(ResultsError, match="rank-00001: no finished results"):
        build_report(run, store, out_dir=tmp_path / "out")  # rank 1 has no manifest
    summary = build_report(run, store, out_dir=tmp_path / "out", allow_incomplete=True)
    assert summary["complete"] is False
    # the duplicate, the stale record and the torn line count nothing
    assert summary["documents"] == 3
    assert summary["tasks"]["Github"]["before"] == pytest.approx(GITHUB_BEFORE)
    assert summary["ranks"]["rank-00000"]["finished"] is True
    assert summary["ranks"]["rank-00001"]["finished"] is False
    prefix = f"{run.prefix}/report"
    stored = store.get_json(f"{prefix}/summary.json")
    assert stored["mean"]["after"] == pytest.approx(weighted(GITHUB_AFTER, ARXIV_AFTER))
    assert store.get_bytes(f"{prefix}/table.md").decode() == summary["table_markdown"]
    for name in ("bpb_vs_neighbors.png", "before_after.png"):
        png = store.get_bytes(f"{prefix}/{name}")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    manifest = store.read_manifest(prefix)
    assert manifest["spec_hash"] == run.stage_hash("report") and manifest["documents"] == 3
    assert set(manifest["files"]) == {
        "summary.json",
        "table.md",
        "bpb_vs_neighbors.png",
        "before_after.png",
        "report.html",
    }


def test_report_without_results_says_what_to_run(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(ResultsError, match="run `ttt eval` first"):
        build_report(run, open_store(run.spec.storage))


def test_cli_report_prints_the_table_and_where_it_is(tmp_path, capsys):
    run = make_run(tmp_path)
    _publish_ranks(run, open_store(run.spec.storage))
    spec = tmp_path / "run.yaml"
    spec.write_text(run.to_yaml())
    assert main(["report", "--spec", str(spec)]) == 1
    assert "rank-00001: no finished results" in capsys.readouterr().err
    assert main(["report", "--spec", str(spec), "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "| Github | 2 |" in out and "Pile-weighted mean" in out
    assert "seconds per neighbor:" not in out  # these records trained on no neighbor
    assert f"{run.prefix}/report/" in out
    empty = tmp_path / "empty.yaml"
    empty.write_text(run.to_yaml().replace(str(tmp_path / "store"), str(tmp_path / "none")))
    assert main(["report", "--spec", str(empty)]) == 1
    assert "no eval results" in capsys.readouterr().err


def test_the_plots_draw_the_error_bars(tmp_path):
    from ttt.report import plot_before_after, plot_bpb_vs_neighbors

    s = summarize(_curve_records(), [0, 2])
    bare = json.loads(json.dumps(s))
    for v in [*bare["tasks"].values(), bare["mean"]]:
        del v["error_bars"]
    for plot in (plot_bpb_vs_neighbors, plot_before_after):
        with_bars = plot(s, tmp_path / "a.png").read_bytes()
        without = plot(bare, tmp_path / "b.png").read_bytes()
        assert with_bars != without, plot.__name__


def _finished_ranks(run, store, tmp_path) -> list[str]:
    """Two finished ranks, published as evaluate_rank does; returns their results keys."""
    h = run.stage_hash("eval")
    keys = []
    for rank, group in enumerate((records(h)[:2], records(h)[2:])):
        path = tmp_path / f"r{rank}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in group))
        prefix = f"{run.prefix}/eval/rank-{rank:05d}"
        facts = {"stage": "eval", "rank": rank, "world_size": 2, "count": len(group)}
        store.publish(prefix, {"results.jsonl": path}, {**facts, "spec_hash": h})
        keys.append(f"{prefix}/results.jsonl")
    return keys


def test_report_refuses_a_missing_rank_naming_it(tmp_path):
    run = make_run(tmp_path)
    store = open_store(run.spec.storage)
    _finished_ranks(run, store, tmp_path)
    assert build_report(run, store, out_dir=tmp_path / "ok")["complete"] is True
    store.delete(f"{run.prefix}/eval/rank-00001/")  # lost: the report must not shrink silently
    with pytest.raises(ResultsError, match=r"incomplete \(2 ranks\): rank-00001"):
        build_report(run, store, out_dir=tmp_path / "out")


def test_report_refuses_a_results_file_that_does_not_match_its_manifest(tmp_path):
    run = make_run(tmp_path)
    store = open_store(run.spec.storage)
    keys = _finished_ranks(run, store, tmp_path)
    path = store.root / keys[1]
    data = path.read_bytes()
    flipped = data.replace(b'"loglik": {"0": -', b'"loglik": {"0": +', 1)  # same size
    assert len(flipped) == len(data) and flipped != data
    path.write_bytes(flipped)
    with pytest.raises(ResultsError, match="rank-00001: .* does not match its manifest"):
        build_report(run, store, out_dir=tmp_path / "out")
    # overwritten by a second writer with fewer records: short, and a different checksum
    path.write_bytes(data)
    first = store.root / keys[0]
    first.write_bytes(first.read_bytes().split(b"\n", 1)[0] + b"\n")
    with pytest.raises(ResultsError, match="rank-00000"):
        build_report(run, store, out_dir=tmp_path / "out")


def test_headline_figures_for_kfp_and_mlflow():
    from ttt.report import headline_figures

    summary = summarize(records("h"), [0, 2])
    figures = headline_figures(summary)
    assert figures["bpb_before.Github"] == pytest.approx(GITHUB_BEFORE)
    assert figures["bpb_after.ArXiv"] == pytest.approx(ARXIV_AFTER)
    assert figures["bpb_after.pile_mean"] == pytest.approx(weighted(GITHUB_AFTER, ARXIV_AFTER))
    lo, hi = figures["bpb_after_p10.pile_mean"], figures["bpb_after_p90.pile_mean"]
    assert lo <= hi and figures["documents.pile_mean"] == 3
    # no neighbor was trained on in these records: no seconds per neighbor, not a NaN
    assert "seconds_per_neighbor" not in figures
    assert all(isinstance(v, float) for v in figures.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_.]+", k) for k in figures)


def test_the_kfp_report_component_emits_metrics_and_the_page(tmp_path):
    """The report component's own function, as KFP calls it: a Metrics artifact with the
    headline figures and an HTML artifact that is report.html."""
    from kfp import dsl

    from components.report.component import report

    run = make_run(tmp_path)
    store = open_store(run.spec.storage)
    _finished_ranks(run, store, tmp_path)
    outputs = {
        "summary": dsl.Artifact(uri=str(tmp_path / "summary")),
        "table": dsl.Markdown(uri=str(tmp_path / "table")),
        "metrics": dsl.Metrics(uri=str(tmp_path / "metrics")),
        "page": dsl.HTML(uri=str(tmp_path / "page")),
    }
    report.python_func(spec=run.to_yaml(), **outputs)
    logged = outputs["metrics"].metadata
    assert logged["bpb_before.Github"] == pytest.approx(GITHUB_BEFORE)
    assert logged["bpb_after.pile_mean"] == pytest.approx(weighted(GITHUB_AFTER, ARXIV_AFTER))
    assert "bpb_after_p10.ArXiv" in logged and "bpb_after_p90.ArXiv" in logged
    page = (tmp_path / "page").read_text()
    assert page.startswith("<!DOCTYPE html>") and '"Github"' in page
    assert page == store.get_bytes(f"{run.prefix}/report/report.html").decode()
