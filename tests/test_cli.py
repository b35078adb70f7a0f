"""The `ttt` CLI: help with examples everywhere, and bad input fails early with a clear error."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ttt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.yaml"
BAD_LINES = ROOT / "examples" / "data" / "bad-lines.jsonl"

COMMANDS = [
    ["validate"],
    ["schema"],
    ["corpus"],
    ["corpus", "stats"],
    ["corpus", "shard"],
    ["embed"],
    ["index"],
    ["index", "build"],
    ["serve"],
    ["query"],
    ["eval"],
    ["report"],
    ["run"],
    ["bench"],
    ["bench", "embed"],
    ["bench", "index"],
    ["bench", "retrieval"],
    ["plan"],
    ["bench", "reliability"],
    ["bench", "ttt"],
    ["models"],
    ["models", "push"],
    ["models", "show"],
    ["rehearse"],
]


def _walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    """Every command path under a parser (so a new subcommand is checked without listing it)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append([*prefix, name])
                found.extend(_walk(child, [*prefix, name]))
    return found


def _help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_registered_command_is_checked():
    assert sorted(_walk(build_parser(), [])) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_an_example(capsys, command):
    out = _help(capsys, command)
    assert f"usage: ttt {' '.join(command)}" in out
    match = re.search(r"^examples?:\s*\n?\s*(ttt|\S+=\S+ ttt) ", out, re.MULTILINE)
    assert match, f"`ttt {' '.join(command)} --help` shows no example:\n{out}"


def test_top_level_help_lists_commands_and_examples(capsys):
    out = _help(capsys, [])
    for name in {c[0] for c in COMMANDS}:
        assert name in out
    assert "examples:" in out


def test_no_arguments_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: ttt" in capsys.readouterr().out


def test_python_dash_m_ttt():
    result = subprocess.run(
        [sys.executable, "-m", "ttt", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: ttt" in result.stdout
    assert "examples:" in result.stdout


def _spec(tmp_path: Path, misspell: bool) -> tuple[Path, Path]:
    """The demo spec with an absolute store root (so any work would show), optionally broken."""
    raw = yaml.safe_load(DEMO.read_text())
    store = tmp_path / "store"
    raw["spec"]["storage"] = {"root": str(store)}
    raw["spec"]["corpus"]["train"] = [str(ROOT / "examples/data/train.jsonl.zst")]
    raw["spec"]["corpus"]["test"] = [str(ROOT / "examples/data/test.jsonl.zst")]
    raw["spec"]["metrics"] = {"enabled": False}
    if misspell:
        raw["spec"]["ttt"]["learningRat"] = raw["spec"]["ttt"].pop("learningRate")
    path = tmp_path / ("bad.yaml" if misspell else "good.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path, store


def _spec_commands(spec: str, out: Path) -> list[list[str]]:
    return [
        ["embed", "--spec", spec, "--shard", "all"],
        ["index", "build", "--spec", spec, "--shard", "0"],
        ["serve", "--spec", spec, "--shard", "0", "--port", "0", "--no-auth"],
        ["query", "--spec", spec, "def fibonacci(n):", "--local"],
        ["eval", "--spec", spec, "--rank", "0", "--world-size", "1", "--local-index"],
        ["report", "--spec", spec, "--out", str(out)],
        ["run", spec, "--workdir", str(out)],
        ["validate", spec],
        ["corpus", "stats", "--spec", spec, str(BAD_LINES)],
        ["corpus", "shard", "--spec", spec, str(BAD_LINES), "--shards", "2", "--out", str(out)],
    ]


SPEC_COMMAND_IDS = [
    "embed",
    "index build",
    "serve",
    "query",
    "eval",
    "report",
    "run",
    "validate",
    "corpus stats",
    "corpus shard",
]


@pytest.mark.parametrize("which", range(len(SPEC_COMMAND_IDS)), ids=SPEC_COMMAND_IDS)
def test_misspelt_field_fails_before_any_work(capsys, tmp_path, which):
    spec, store = _spec(tmp_path, misspell=True)
    out = tmp_path / "out"
    rc = main(_spec_commands(str(spec), out)[which])
    err = capsys.readouterr().err
    assert rc in (1, 2)
    assert str(spec) in err
    assert "spec.ttt.learningRat" in err
    assert "Traceback" not in err
    assert not store.exists() and not out.exists(), "work started before the spec was checked"


@pytest.mark.parametrize("which", range(len(SPEC_COMMAND_IDS)), ids=SPEC_COMMAND_IDS)
def test_missing_spec_file_names_the_path(capsys, tmp_path, which):
    spec = tmp_path / "no-such-spec.yaml"
    out = tmp_path / "out"
    rc = main(_spec_commands(str(spec), out)[which])
    err = capsys.readouterr().err
    assert rc in (1, 2)
    assert str(spec) in err and "cannot read" in err
    assert not out.exists()


def test_eval_without_an_index_is_a_one_line_error(capsys, tmp_path):
    spec, _ = _spec(tmp_path, misspell=False)
    argv = ["eval", "--spec", str(spec), "--rank", "0", "--world-size", "1"]
    rc = main([*argv, "--local-index", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no index at" in err and "ttt index build" in err


def test_corpus_stats_reports_every_bad_line_with_file_and_line(capsys):
    assert main(["corpus", "stats", str(BAD_LINES)]) == 0
    out = capsys.readouterr().out
    expected = {"malformed_json": 2, "invalid_utf8": 4, "missing_text": 6, "empty_text": 8}
    assert "bad lines: 4" in out
    for reason, line in expected.items():
        row = next((r for r in out.splitlines() if r.strip().startswith(reason)), None)
        assert row is not None, f"{reason} not reported:\n{out}"
        assert f"{BAD_LINES}:{line}" in row
    assert re.search(r"^total\s+5\s", out, re.MULTILINE)


def test_corpus_stats_strict_fails_on_the_first_bad_line(capsys):
    assert main(["corpus", "stats", "--strict", str(BAD_LINES)]) == 1
    err = capsys.readouterr().err
    assert f"{BAD_LINES}:2" in err and "malformed_json" in err
    assert "Traceback" not in err
