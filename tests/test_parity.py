"""ttt.spec.parity and `ttt validate --paper`: every departure from the paper's code, and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttt.cli import main
from ttt.spec import PAPER_ENCODER, load_spec, loads_spec
from ttt.spec.parity import departures

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAPER = ["pile-gpt2.yaml", "pile-gpt2-large.yaml", "pile-gpt-neo.yaml"]
MINIMAL = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: t}\n"


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_examples_have_no_departure(name, capsys):
    run = load_spec(EXAMPLES / name, environ={})
    assert departures(run) == []
    t = run.spec.ttt
    assert (t.optimizer, t.weight_decay, t.reset_optimizer) == ("adamw", 0.01, False)
    assert not run.spec.retrieval.exclude_identical and run.spec.retrieval.neighbors == 50
    assert t.eval_after == list(range(51)) and run.spec.embedding.model == PAPER_ENCODER
    assert main(["validate", "--paper", str(EXAMPLES / name)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("#") and "0 departure(s)" in out[0]


def test_gpt_neo_runs_at_its_own_rate_and_context():
    t = load_spec(EXAMPLES / "pile-gpt-neo.yaml", environ={}).spec.ttt
    assert (t.learning_rate, t.max_length) == (5e-6, 2048)


def test_our_defaults_list_each_departure_with_the_value_that_restores_it(capsys, tmp_path):
    spec = tmp_path / "ours.yaml"
    spec.write_text(MINIMAL)
    assert main(["validate", "--paper", str(spec)]) == 0  # exit 0 either way
    lines = capsys.readouterr().out.splitlines()
    body = {line.split(":", 1)[0]: line for line in lines[1:]}
    assert lines[0].startswith("#") and f"{len(body)} departure(s)" in lines[0]
    assert body["spec.ttt.optimizer"].startswith("spec.ttt.optimizer: adam -> adamw")
    assert "0.0 -> 0.01" in body["spec.ttt.weightDecay"]
    assert "true -> false" in body["spec.ttt.resetOptimizer"]
    assert "true -> false" in body["spec.retrieval.excludeIdentical"]
    assert "[0, 50] -> [0, 1, ..., 50]" in body["spec.ttt.evalAfter"]
    assert "auto -> float32" in body["spec.embedding.dtype"]
    # the defaults that are the paper's are not listed
    for same in ("spec.embedding.model", "spec.retrieval.distanceThreshold", "spec.eval.seed"):
        assert same not in body


def test_a_gpt_neo_spec_at_gpt2s_rate_is_told_the_neo_rate():
    run = loads_spec(MINIMAL + "spec:\n  ttt: {model: EleutherAI/gpt-neo-1.3B}\n", environ={})
    found = {d.field: d for d in departures(run)}
    assert found["spec.ttt.learningRate"].paper == 5e-6
    assert found["spec.ttt.maxLength"].paper == 2048


def test_every_spec_and_override_in_the_papers_table_is_at_parity():
    """docs/paper.md: each row's spec (with its overrides) departs from the paper in nothing."""
    import re

    doc = (EXAMPLES.parent / "docs" / "paper.md").read_text()
    named = set(re.findall(r"`(examples/pile-[\w-]+\.yaml)`", doc))
    assert named == {f"examples/{n}" for n in PAPER}
    overrides = re.findall(r"\| `((?:TTT_\w+=\S* ?)+)` \|", doc)
    assert len(overrides) == 2  # in-context and interpolation
    for line in overrides:
        env = dict(pair.split("=", 1) for pair in line.split())
        for name in ("pile-gpt2-large.yaml", "pile-gpt-neo.yaml"):
            run = load_spec(EXAMPLES / name, environ=env)
            assert departures(run) == [], (name, line)
    split = load_spec(EXAMPLES / "pile-gpt2.yaml", environ={"TTT_TTT__SPLIT_TEXT": "true"})
    assert departures(split) == []
    for figure in ("1.208", "0.992", "1.072", "0.854", "0.739", "0.710", "1.064", "0.99"):
        assert figure in doc
