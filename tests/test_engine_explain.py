"""`ttt validate` names the engine and path a spec trains on, and why."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ttt.cli import main
from ttt.engine.explain import config_dropout, explain_plan, explain_spec, spec_line
from ttt.spec import TTTSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_plan_follows_the_rule_members_and_path():
    cpu = explain_plan(TTTSpec(model="smollm2-135m"), "cpu")
    assert (cpu.engine, cpu.path) == ("ensemble", "stacked")
    assert "715-718 ms per neighbor" in cpu.line()  # the measured reason
    loop = explain_plan(TTTSpec(model="gpt2"), "cpu")
    assert (loop.engine, loop.path) == ("ensemble", "loop")
    gpu = explain_plan(TTTSpec(model="smollm2-135m", ensemble_size=8), "cuda")
    assert (gpu.engine, gpu.members, gpu.path) == ("ensemble", "E = 8 (ensembleSize)", "stacked")
    # GPT-2 trains with dropout 0.1: in float32 (the paper's, the default) each member
    # replays its own masks; under the GPU's bf16 autocast, batched with masks per member
    paper = explain_plan(TTTSpec(model="gpt2-large", reset_optimizer=False), "cuda")
    assert paper.path == "loop" and "replays its own masks" in paper.path_reason
    fast = explain_plan(TTTSpec(model="gpt2-large", reset_optimizer=False, dtype="auto"), "cuda")
    assert fast.path == "stacked" and "masks drawn per member" in fast.path_reason
    assert "each member a task with its carried optimizer" in paper.line()
    one = explain_plan(TTTSpec(model="smollm2-135m", engine="ensemble"), "cpu")
    assert (one.members, one.path) == ("E = 1 (ensembleSize unset off a GPU)", "stacked")
    drop = explain_plan(TTTSpec(model="gpt2", engine="ensemble", dtype="float32"), "cpu")
    assert drop.path == "loop" and "dropout masks" in drop.path_reason
    unknown = explain_plan(TTTSpec(model="/nowhere/model", ensemble_size=2), "cuda")
    assert unknown.path == "stacked or vmap or loop" and config_dropout("/nowhere/model") is None
    dyn = explain_plan(TTTSpec(method="dynamic-eval"), "cuda")
    assert dyn.engine == "sequential" and "method dynamic-eval" in dyn.line()
    # device auto: what a GPU and what a CPU would run, in one line
    auto = explain_spec(TTTSpec(model="smollm2-135m"))
    assert [p.device for p in auto] == ["cuda", "cpu"]
    assert spec_line(auto).startswith("device auto: engine: ensemble on cuda")


def test_validate_prints_the_engine_and_stays_a_spec(capsys, tmp_path):
    assert main(["validate", str(EXAMPLES / "pile-gpt2.yaml")]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("# engine: ensemble on cuda") and "path loop" in first
    saved = tmp_path / "run.yaml"
    saved.write_text(out)  # the output reads back as the same spec
    assert main(["validate", str(saved)]) == 0
    assert capsys.readouterr().out == out
    assert yaml.safe_load(out)["spec"]["ttt"]["resetOptimizer"] is False
    assert main(["validate", "--json", str(EXAMPLES / "demo.yaml")]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["spec"]["ttt"]["model"] == "smollm2-135m"
    assert got.err.startswith("device auto: engine: ensemble on cuda")
    assert "engine: ensemble on cpu, E = 1 (ensembleSize unset off a GPU), path stacked" in got.err
    main(["validate", "--paper", "--json", str(EXAMPLES / "pile-gpt2.yaml")])
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert [(d["device"], d["engine"], d["path"]) for d in engine["devices"]] == [
        ("cuda", "ensemble", "loop")
    ]
    main(["validate", "--paper", str(EXAMPLES / "pile-gpt2.yaml")])
    assert "# engine: ensemble on cuda" in capsys.readouterr().out


def test_a_saved_gpt2_without_dropout_is_predicted_stacked_as_the_engine_takes_it(
    tmp_path, tiny_gpt2
):
    from ttt.engine.members import choose_path

    model = tiny_gpt2()  # dropout 0: its config still says summary_first_dropout 0.1
    assert model.config.summary_first_dropout > 0
    model.save_pretrained(tmp_path / "lm")
    assert config_dropout(str(tmp_path / "lm")) is False
    plan = explain_plan(TTTSpec(model=str(tmp_path / "lm"), ensemble_size=2), "cpu")
    assert plan.path == choose_path(model, 2) == "stacked"
    # and with compile: the plan says so; where compile cannot run, the spec is refused
    compiled = explain_plan(TTTSpec(model=str(tmp_path / "lm"), compile=True), "cpu")
    assert "compiled (spec.ttt.compile)" in compiled.line()
