"""The run spec: defaults, strict validation with field paths, env overrides, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttt.cli import main
from ttt.spec import STAGE_INPUTS, SpecError, json_schema, load_spec, loads_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MINIMAL = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: t}\n"


def test_paper_defaults():
    run = loads_spec(MINIMAL, environ={})
    s = run.spec
    assert s.index.type == "flat"
    assert s.retrieval.neighbors == 50 and s.retrieval.distance_threshold == 4.0
    assert s.ttt.learning_rate == 2e-5 and s.ttt.eps == 1e-8 and s.ttt.grad_clip == 1.0
    assert s.ttt.max_length == 1024 and s.ttt.chunk_stride == 1024
    assert s.ttt.optimizer == "adam" and s.ttt.reset_optimizer is True
    assert s.ttt.order == "nearest-first" and s.ttt.steps_per_neighbor == 1
    assert s.eval.portion == 0.2 and s.eval.seed == 1216
    assert s.embedding.pooling == "mean"
    # the paper's encoder and a float32 index, by default
    assert s.embedding.model == "socialfoundations/roberta-large-pile-lr2e-5-bs16-8gpu-1700000"
    assert s.embedding.storage == "float32"
    assert s.eval.selection == "reference"
    assert s.storage.endpoint is None  # the local store is the default


def test_dynamic_evaluation_without_split_text_is_refused():
    with pytest.raises(SpecError, match="dynamic-eval needs spec.ttt.splitText"):
        loads_spec(MINIMAL + "spec:\n  ttt: {method: dynamic-eval}\n", environ={})
    text = MINIMAL + "spec:\n  ttt: {method: dynamic-eval, splitText: true}\n"
    assert loads_spec(text, environ={}).spec.ttt.method == "dynamic-eval"


def test_the_offline_examples_and_tests_name_their_encoder():
    # the paper's encoder is the default; nothing offline may fall back to downloading it
    for path in [EXAMPLES / "demo.yaml", EXAMPLES.parent / "tests" / "tiny_run.py"]:
        assert "all-minilm-l6-v2" in path.read_text()


@pytest.mark.parametrize(
    "name", ["demo.yaml", "pile-gpt2.yaml", "pile-gpt2-large.yaml", "pile-gpt-neo.yaml"]
)
def test_examples_validate(name):
    run = load_spec(EXAMPLES / name, environ={})
    assert run.kind == "TTTRun" and run.prefix == f"runs/{run.name}"


def test_misspelt_field_names_its_path():
    text = MINIMAL + "spec:\n  ttt: {learningRat: 1.0e-5}\n"
    with pytest.raises(SpecError, match=r"spec\.ttt\.learningRat: unknown field"):
        loads_spec(text, environ={})


def test_mistyped_field_names_its_path_and_value():
    text = MINIMAL + "spec:\n  retrieval: {neighbors: many}\n  eval: {portion: 2}\n"
    with pytest.raises(SpecError) as err:
        loads_spec(text, "f.yaml", environ={})
    msg = str(err.value)
    assert msg.startswith("f.yaml: 2 error(s)")
    assert "spec.retrieval.neighbors" in msg and "'many'" in msg
    assert "spec.eval.portion" in msg


def test_invalid_yaml_names_line():
    with pytest.raises(SpecError, match=r"bad.yaml:2:\d+: invalid YAML"):
        loads_spec("metadata: {name: t}\nspec: {a: [1, }\nx: 1\n", "bad.yaml", environ={})


def test_stride_cannot_exceed_max_length():
    with pytest.raises(SpecError, match="stride"):
        loads_spec(MINIMAL + "spec:\n  ttt: {maxLength: 16, stride: 32}\n", environ={})


def test_env_overrides_nested_fields():
    env = {
        "TTT_TTT__LEARNING_RATE": "5e-6",
        "TTT_STORAGE__ENDPOINT": "minio:9000",
        "TTT_CORPUS__TRAIN": "[a.jsonl, b.jsonl]",
        "TTT_METADATA__NAME": "other",
        "TTT_S3_ACCESS_KEY": "not-a-spec-field",  # other TTT_ variables are left alone
    }
    run = loads_spec(MINIMAL, environ=env)
    assert run.spec.ttt.learning_rate == 5e-6
    assert run.spec.storage.endpoint == "minio:9000"
    assert run.spec.corpus.train == ["a.jsonl", "b.jsonl"]
    assert run.name == "other"


def test_env_override_unknown_field_is_an_error():
    with pytest.raises(SpecError, match="TTT_TTT__LEARNING_RAT: spec.ttt has no field"):
        loads_spec(MINIMAL, environ={"TTT_TTT__LEARNING_RAT": "1"})


def test_env_override_is_validated():
    with pytest.raises(SpecError, match="spec.ttt.maxLength"):
        loads_spec(MINIMAL, environ={"TTT_TTT__MAXLENGTH": "-3"})


def test_stage_hash_tracks_only_its_inputs():
    a = loads_spec(MINIMAL, environ={})
    b = loads_spec(MINIMAL, environ={"TTT_TTT__LEARNING_RATE": "1e-3"})
    assert a.stage_hash("embed") == b.stage_hash("embed")
    assert a.stage_hash("eval") != b.stage_hash("eval")


def test_schema_is_camel_case_and_strict():
    schema = json_schema()
    ttt = schema["$defs"]["TTTSpec"]
    assert "learningRate" in ttt["properties"]
    assert ttt["additionalProperties"] is False


def test_cli_validate(tmp_path, capsys):
    assert main(["validate", str(EXAMPLES / "demo.yaml")]) == 0
    assert "learningRate" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "spec:\n  index: {typ: flat}\n")
    assert main(["validate", str(bad)]) == 1
    assert "spec.index.typ: unknown field" in capsys.readouterr().err
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "TTTRun"


def test_operational_fields_stay_out_of_every_stage_hash():
    base = {"metadata": {"name": "a"}}
    a = parse_spec(base, environ={})
    scaled = parse_spec(
        {
            **base,
            "spec": {
                "index": {"replicas": 3},
                "retrieval": {"timeoutSeconds": 60, "retries": 5, "servers": ["http://x:1"]},
            },
        },
        environ={},
    )
    for stage in STAGE_INPUTS:
        assert a.stage_hash(stage) == scaled.stage_hash(stage), stage
    # what changes the results still does
    moved = parse_spec({**base, "spec": {"index": {"nprobe": 7}}}, environ={})
    assert a.stage_hash("index") != moved.stage_hash("index")


def test_reliability_knobs_stay_out_of_the_hash_and_are_bounded(tmp_path, capsys):
    base = {"metadata": {"name": "a"}}
    a = parse_spec(base, environ={})
    knobs = {
        "allowPartial": True,
        "minShards": 1,
        "deadlineSeconds": 5,
        "maxBackoffSeconds": 0.5,
        "waitSeconds": 60,
        "registryHosts": ["h"],
    }
    tuned = parse_spec({**base, "spec": {"retrieval": knobs}}, environ={})
    assert all(a.stage_hash(s) == tuned.stage_hash(s) for s in STAGE_INPUTS)
    # a k the shard servers refuse (k <= 1024, with the leakage guard's 8 extra) is refused
    # here, not on every query of a running evaluation
    bad = tmp_path / "k.yaml"
    bad.write_text(MINIMAL + "spec:\n  retrieval: {neighbors: 1017}\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.retrieval.neighbors: 1017" in err and "at most 1016" in err
    ok = parse_spec({**base, "spec": {"retrieval": {"neighbors": 1016}}}, environ={})
    assert ok.spec.retrieval.neighbors == 1016
    local = {"neighbors": 5000, "inProcess": True}  # no server in the way
    assert parse_spec({**base, "spec": {"retrieval": local}}, environ={})
    with pytest.raises(SpecError, match="retries"):
        parse_spec({**base, "spec": {"retrieval": {"retries": 11}}}, environ={})
    with pytest.raises(SpecError, match="minShards: 3 is more than the 2 shard"):
        parse_spec(
            {**base, "spec": {"corpus": {"shards": 2}, "retrieval": {"minShards": 3}}},
            environ={},
        )
