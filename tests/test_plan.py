"""`ttt plan`: every figure of a small plan checked by hand; the index choice; counted corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ttt.cli import main
from ttt.corpus.figures import count_corpus
from ttt.index.choice import choose_index, families, nlist_for
from ttt.plan import PlanError, load_profile, plan_run
from ttt.spec import parse_spec

PROFILE = {
    "embeddingDim": 1024,
    "hardware": {"gpuMemoryGB": 80, "serverMemoryGB": 1},
    "throughputs": {
        "embedTokensPerSecond": 1e5,
        "indexVectorsPerSecond": 1e4,
        "trainTokensPerSecond": 1000,
        "scoreTokensPerSecond": 10000,
        "querySeconds": 0.5,
    },
    "corpus": {
        "train": {
            "A": {"documents": 1e6, "bytes": 4e9, "tokens": 1e9},  # 1000 tokens a document
            "B": {"documents": 1e6, "bytes": 2e9, "tokens": 5e8, "embedTokens": 3e8},
        },
        "test": {
            "A": {"documents": 100, "bytes": 400_000, "tokens": 100_000},
            "B": {"documents": 51, "bytes": 102_000, "tokens": 25_500},
        },
    },
}


def _run(retrieval: dict | None = None, eval_: dict | None = None):
    spec = {
        "corpus": {"shards": 2},
        "embedding": {"model": "roberta-large", "maxTokens": 512},
        "retrieval": {"neighbors": 10, **(retrieval or {})},
        "ttt": {"evalAfter": [0, 10]},
        "eval": {"portion": 0.5, "workers": 2, **(eval_ or {})},
    }
    raw = {"apiVersion": "ttt.dev/v1alpha1", "kind": "TTTRun", "metadata": {"name": "p"}}
    return parse_spec({**raw, "spec": spec}, environ={})


def test_small_plan_by_hand():
    plan = plan_run(_run(), PROFILE, bytes_per_vector=64)
    embed, index, ev = (plan["stages"][s] for s in ("embed", "index", "eval"))
    # embed: A cut at 512 of its 1000 tokens a document, B as given
    assert embed["tokens"] == 1e6 * 512 + 3e8
    assert embed["gpu_hours"] == pytest.approx(8.12e8 / 1e5 / 3600)
    assert embed["wall_hours"] == pytest.approx(8.12e8 / 1e5 / 3600 / 2)
    assert embed["storage_gb"] == pytest.approx(2e6 * 1024 * 4 / 1e9)  # float32 by default
    # index: nlist = 4 sqrt(2e6) = 5657 -> 4096; centroids 4096 x 1024 x 4 B over 2e6 rows
    # = 8.388608 B; PQ32 + 8 B of id = 48.39 <= 64 < PQ64's 72.39 (1024 % 48 != 0)
    assert index["type"] == "IVF4096,PQ32"
    assert index["bytes_per_vector"] == pytest.approx(40 + 8.388608)
    assert index["recall"] is None and "not measured" in index["why"]
    assert index["memory_per_shard_gb"] == pytest.approx(1e6 * 48.388608 / 1e9)
    assert index["memory_per_server_gb"] == pytest.approx(1e6 * (48.388608 + 16) / 1e9)
    assert index["servers"] == 2 and index["fits_server_memory"] is True
    assert index["gpu_hours"] == pytest.approx(2e6 / 1e4 / 3600)
    # eval: as the sampler counts (selection: reference, int(portion x n)): A 50 of 100,
    # B 25 of 51 -> 75 documents
    assert ev["documents"] == 75
    assert ev["train_tokens"] == pytest.approx(75 * 10 * 750)  # mean train document: 750
    assert ev["score_tokens"] == pytest.approx((50 * 1000 + 25 * 500) * 2)  # two checkpoints
    gpu = 562_500 / 1000 / 3600 + 125_000 / 10_000 / 3600
    assert ev["gpu_hours"] == pytest.approx(gpu)
    assert ev["retrieval_hours"] == pytest.approx(75 * 0.5 / 3600)
    assert ev["wall_hours"] == pytest.approx((gpu + 75 * 0.5 / 3600) / 2)
    # request 2 x 1024 x 12, response 2 x 10 x 60, texts 10 x 3000 B
    assert ev["network_per_query_bytes"] == 2 * 1024 * 12 + 2 * 10 * 60 + 10 * 3000
    assert plan["gpu_hours"] == pytest.approx(
        embed["gpu_hours"] + index["gpu_hours"] + ev["gpu_hours"]
    )


def test_sift_and_the_papers_seconds_per_neighbor():
    profile = {**PROFILE, "throughputs": {"evalSecondsPerNeighbor": 18.7}}
    plan = plan_run(_run({"selection": "sift", "candidates": 40}), profile, bytes_per_vector=64)
    ev = plan["stages"]["eval"]
    assert ev["gpu_hours"] == pytest.approx(75 * 10 * 18.7 / 3600)
    assert ev["network_per_query_bytes"] == (
        2 * 1024 * 12 + 2 * 40 * 60 + 2 * 40 * 1024 * 12 + 10 * 3000
    )
    assert plan["stages"]["embed"]["gpu_hours"] is None and plan["gpu_hours"] is None


def test_eval_documents_counted_as_the_sampler_counts_them():
    # sorted-ids rounds half up and keeps at least one: A 50, B 26
    plan = plan_run(_run(eval_={"selection": "sorted-ids"}), PROFILE, bytes_per_vector=64)
    assert plan["stages"]["eval"]["documents"] == 76


def test_seconds_per_neighbor_per_task():
    per_task = {"A": 2.0, "B": 30.0}
    profile = {**PROFILE, "throughputs": {"evalSecondsPerNeighbor": per_task}}
    ev = plan_run(_run(), profile, bytes_per_vector=64)["stages"]["eval"]
    assert ev["gpu_hours"] == pytest.approx((50 * 10 * 2.0 + 25 * 10 * 30.0) / 3600)
    missing = {**PROFILE, "throughputs": {"evalSecondsPerNeighbor": {"A": 2.0}}}
    with pytest.raises(PlanError, match=r"evalSecondsPerNeighbor: no figure for task\(s\) \['B'\]"):
        plan_run(_run(), missing, bytes_per_vector=64)
    bad = {**PROFILE, "throughputs": {"evalSecondsPerNeighbor": {"A": 2.0, "B": 0}}}
    with pytest.raises(PlanError, match=r"throughputs.evalSecondsPerNeighbor.B must be a positive"):
        plan_run(_run(), bad, bytes_per_vector=64)


def test_the_papers_setup_costs_863_a100_hours_not_11146():
    """Each task's documents x 50 x its own seconds per neighbor (the paper's per-task column,
    GPT-2 Large), over the Pile test set's 20 % per task: about 863 A100-hours."""
    from paper_figures import GPT2_LARGE

    root = Path(__file__).resolve().parents[1] / "examples"
    from ttt.spec import load_spec

    profile = load_profile(str(root / "plan-pile.yaml"))
    # the committed profile holds the paper's figures
    given = profile["throughputs"]["evalSecondsPerNeighbor"]
    assert given == {t: s for t, (s, _) in GPT2_LARGE.items()}
    assert {t: v["documents"] for t, v in profile["corpus"]["test"].items()} == {
        t: n for t, (_, n) in GPT2_LARGE.items()
    }
    plan = plan_run(load_spec(root / "pile-gpt2-large.yaml", environ={}), profile,
                    bytes_per_vector=64)  # fmt: skip
    ev = plan["stages"]["eval"]
    assert ev["documents"] == 42_910  # int(0.2 x n) per task; the paper says 42,916
    assert ev["gpu_hours"] == pytest.approx(863.1, abs=0.1)
    pooled = ev["documents"] * 50 * 18.70 / 3600  # every document at the Pile-weighted mean
    assert pooled / ev["gpu_hours"] > 12


def test_index_choice_uses_measured_recall():
    n, dim = 2e6, 1024
    assert nlist_for(n) == 4096 and nlist_for(210e6) == 65536
    measured = [{"approx_type": "IVF1024,PQ16", "approx_recall@50": 0.96}]
    c = choose_index(n, dim, 64, 0.95, measured)
    assert c.factory == "IVF4096,PQ16" and c.recall == 0.96  # cheaper than PQ32, meets 0.95
    c = choose_index(n, dim, 64, 0.98, measured)
    assert c.factory == "IVF4096,PQ32" and "recall not measured" in c.reason
    assert choose_index(n, dim, 1e6, 0.95).factory == "flat"  # exact when memory allows
    assert [f[0] for f in families(n, dim)][:3] == ["Flat", "HNSW32", "SQ8"]
    with pytest.raises(ValueError, match="no index family fits 10.0 bytes per vector"):
        choose_index(n, dim, 10, 0.95)


def test_corpus_counted_exactly_and_sampled(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps({"text": "x" * 400, "meta": {"pile_set_name": "A" if i % 2 else "B"}})
        for i in range(100)
    ]
    path.write_text("\n".join(lines) + "\n")
    full = count_corpus([str(path)], max_tokens=64, bytes_per_token=4.0)
    assert not full.sampled and full.total("documents") == 100
    assert full.total("bytes") == 100 * 400 and full.total("tokens") == 100 * 100
    assert full.total("embed_tokens") == 100 * 64
    sampled = count_corpus([str(path)], max_tokens=64, bytes_per_token=4.0, sample_documents=10)
    # lines of equal length: 10 lines read, scaled by file size / bytes read = 10
    assert sampled.sampled and sampled.total("documents") == pytest.approx(100)
    assert sampled.domains["A"].documents == pytest.approx(50)


def test_profile_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"throughputs": {"embedTokensPerSecnd": 1}}))
    with pytest.raises(PlanError, match="throughputs.embedTokensPerSecnd is not a field"):
        plan_run(_run(), load_profile(str(bad)), where=str(bad))
    bad.write_text(yaml.safe_dump({"throughputs": {"querySeconds": -1}}))
    with pytest.raises(PlanError, match="querySeconds must be a positive number"):
        plan_run(_run(), load_profile(str(bad)), where=str(bad))
    bad.write_text(yaml.safe_dump({"corpus": {"train": {"A": {"bytes": 1}}}}))
    with pytest.raises(Exception, match="corpus.train.A: needs documents and bytes"):
        plan_run(_run(), load_profile(str(bad)), where=str(bad))


def test_cli_plan_takes_bench_json_and_prints_the_command(tmp_path, capsys):
    spec = tmp_path / "run.yaml"
    spec.write_text(_run().to_yaml())
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    bench = tmp_path / "index.json"
    bench.write_text(
        json.dumps(
            {
                "vectors": 1000,
                "approx_type": "IVF256,PQ16",
                "approx_build_seconds": 0.5,
                "approx_recall@50": 0.99,
            }
        )
    )
    args = ["plan", str(spec), "--profile", str(profile), "--bench", str(bench)]
    assert main([*args, "--bytes-per-vector", "64"]) == 0
    out = capsys.readouterr().out
    assert "IVF4096,PQ16" in out and "ttt bench (" in out
    assert f"reproduce: ttt plan {spec} --profile {profile} --bench {bench}" in out
    assert main(["plan", str(spec), "--profile", str(tmp_path / "none.yaml")]) == 1
    assert "cannot read the plan profile" in capsys.readouterr().err


def test_pile_profile_in_examples_plans():
    """The committed Pile profile (docs' plan) still gives a plan of the paper's setup."""
    root = Path(__file__).resolve().parents[1] / "examples"
    from ttt.spec import load_spec

    plan = plan_run(
        load_spec(root / "pile-gpt2-large.yaml", environ={}),
        load_profile(str(root / "plan-pile.yaml")),
        bytes_per_vector=64,
    )
    assert plan["train"]["documents"] == 210e6
    assert plan["stages"]["eval"]["documents"] == 42_910  # the paper: 42,916
    assert plan["stages"]["index"]["bytes_per_vector"] <= 64


def test_float16_storage_halves_the_embeddings_on_disk():
    run = _run()
    half = run.model_copy(
        update={
            "spec": run.spec.model_copy(
                update={"embedding": run.spec.embedding.model_copy(update={"storage": "float16"})}
            )
        }
    )
    full = plan_run(run, PROFILE, bytes_per_vector=64)["stages"]["embed"]["storage_gb"]
    assert plan_run(half, PROFILE, bytes_per_vector=64)["stages"]["embed"]["storage_gb"] == (
        pytest.approx(full / 2)
    )
