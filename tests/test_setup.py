"""The README's two set-up commands: what they install, what CI runs, and the README's examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from tiny_run import _read

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL_SERVERS = ROOT / "scripts" / "install-servers"


def _setup_commands() -> list[str]:
    """The commands of the README's 'Two commands on a fresh machine' block."""
    section = README.split("## Two commands on a fresh machine", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_the_readme_names_exactly_two_setup_commands():
    assert _setup_commands() == ["make demo", "make test"]


def test_ci_runs_exactly_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    # the shebang-free body: strict mode, cd to the repo root, then the README's command
    assert commands[-1] == _setup_commands()[1]
    assert not any({"apt-get", "pip", "pip3"} & set(c.split()) for c in commands), commands


def test_the_readme_test_command_installs_the_servers_its_tests_start():
    plan = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "./scripts/install-servers" in plan
    # the servers step runs before pytest, so a fresh machine has Prometheus when tests start
    assert plan.index("./scripts/install-servers") < plan.index("pytest")


def _bin_with(tmp_path: Path, names: list[str]) -> Path:
    """A directory holding only the named commands (the real ones, or empty stand-ins)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ["bash", "id", *names]:
        real = shutil.which(name)
        if real:
            (bin_dir / name).symlink_to(real)
        else:  # a server binary that this machine lacks: `command -v` only needs it to exist
            (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / name).chmod(0o755)
    return bin_dir


def test_install_servers_is_a_no_op_when_every_program_is_on_the_path(tmp_path):
    bin_dir = _bin_with(
        tmp_path, ["prometheus", "prometheus-pushgateway", "chromium", "chromedriver"]
    )
    done = subprocess.run(
        [str(bin_dir / "bash"), str(INSTALL_SERVERS)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stdout


def test_install_servers_says_what_to_do_without_apt(tmp_path):
    bin_dir = _bin_with(tmp_path, ["prometheus", "chromium"])  # no pushgateway, no apt-get
    done = subprocess.run(
        [str(bin_dir / "bash"), str(INSTALL_SERVERS)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "prometheus-pushgateway chromedriver not on the PATH" in done.stderr
    assert "apt-get is missing" in done.stderr and "chromium-driver" in done.stderr


def test_the_readme_query_example_finds_what_a_reader_expects(tmp_path, capsys):
    """The README's `ttt query` line, run over a slice of the demo corpus with the demo's encoder,
    answers with the grep manual page first and Man Pages after it."""
    from ttt.cli import main

    match = re.search(r'ttt query --spec examples/demo.yaml --local "([^"]+)" --k (\d+)', README)
    assert match, "README has no `ttt query` example"
    text, k = match.group(1), match.group(2)

    # every domain's first 60 training documents, plus the manual page the example is about
    lines, seen = [], {}
    for doc in _read(ROOT / "examples" / "data" / "train.jsonl.zst"):
        domain = doc["meta"]["pile_set_name"]
        is_grep = doc["text"].startswith("GREP(1)")
        if is_grep or seen.get(domain, 0) < 60:
            seen[domain] = seen.get(domain, 0) + 1
            lines.append(json.dumps(doc))
    assert any(json.loads(line)["text"].startswith("GREP(1)") for line in lines)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("\n".join(lines) + "\n")

    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    raw["spec"]["corpus"] = {"train": [str(corpus)], "test": [str(corpus)], "shards": 2}
    raw["spec"]["storage"] = {"root": str(tmp_path / "store")}
    raw["spec"]["metrics"] = {"enabled": False}
    spec = tmp_path / "demo-slice.yaml"
    spec.write_text(yaml.safe_dump(raw))

    assert main(["embed", "--spec", str(spec), "--shard", "all", "--quiet"]) == 0
    assert main(["index", "build", "--spec", str(spec), "--shard", "all"]) == 0
    capsys.readouterr()
    assert main(["query", "--spec", str(spec), "--local", text, "--k", k, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    neighbors = result["neighbors"]
    assert len(neighbors) == int(k) and not result["partial"]
    assert neighbors[0]["text"].startswith("GREP(1)")
    assert {n["domain"] for n in neighbors} == {"Man Pages"}
