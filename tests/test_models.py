"""ttt.models and `ttt models`: push a model into the store, fetch it verified into a cache
shared by a node's ranks, load it with no network, and get the same numbers as from a path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import save_tiny_lm

from ttt.assets import resolve_model
from ttt.cli import main
from ttt.models import (
    ModelError,
    cache_root,
    fetch_model,
    local_model,
    parse_model_path,
    push_model,
)
from ttt.models.push import PROGRESS
from ttt.spec import loads_spec
from ttt.store import LocalStore, open_store, sha256_file

REPO = Path(__file__).resolve().parents[1]


def _storage(tmp: Path, **fields):
    """A run's storage section: a local store under tmp, or S3 when `endpoint` is given."""
    body = {"root": str(tmp / "store"), **fields}
    text = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: m}\n"
    return loads_spec(text + f"spec: {{storage: {json.dumps(body)}}}\n", "t", {}).spec.storage


def _minilm() -> Path:
    return Path(resolve_model("all-minilm-l6-v2"))


def _gguf() -> Path:
    return Path(resolve_model("smollm2-135m"))


def _uploads(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ttt.models.push"]


# --- push --------------------------------------------------------------------------------


def test_push_writes_every_file_and_a_manifest_with_hashes_and_identity(tmp_path):
    store, src = LocalStore(tmp_path / "store"), _minilm()
    dest = parse_model_path("s3://ttt/models/minilm", "ttt")
    body = push_model(src, store, dest, alias="all-minilm-l6-v2")
    assert body["kind"] == "ttt.dev/model" and body["format"] == "hf-dir"
    assert body["identity"] == {"hubId": "sentence-transformers/all-MiniLM-L6-v2", "revision": None}
    # every file but hidden ones (.gitattributes), nested folders included
    assert "1_Pooling/config.json" in body["files"] and ".gitattributes" not in body["files"]
    for name, info in body["files"].items():
        assert info == {"size": (src / name).stat().st_size, "sha256": sha256_file(src / name)}
        assert sha256_file(tmp_path / "store/models/minilm" / name) == info["sha256"]
    assert store.read_manifest("models/minilm")["files"] == body["files"]  # checksummed
    assert not store.exists(f"models/minilm/{PROGRESS}")


def test_a_gguf_file_is_its_own_identity_and_hub_id_and_revision_can_be_given(tmp_path):
    store = LocalStore(tmp_path / "store")
    dest = parse_model_path("s3://ttt/models/smol", "ttt")
    body = push_model(_gguf(), store, dest, hub_id="HuggingFaceTB/SmolLM2-135M", revision="abc")
    assert body["format"] == "gguf" and body["entry"] == _gguf().name
    assert body["identity"] == {"hubId": "HuggingFaceTB/SmolLM2-135M", "revision": "abc"}
    assert list(body["files"]) == [_gguf().name]


def test_revision_from_huggingface_cli_records_but_no_hub_id_from_the_config(tmp_path):
    src = save_tiny_lm(tmp_path / "lm")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "gpt2-large"}))
    records = src / ".cache/huggingface/download"
    records.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (records / f"{name}.metadata").write_text("a1b2c3\netag\n1700000000.0\n")
    body = push_model(src, LocalStore(tmp_path / "s"), parse_model_path("s3://ttt/m/lm"))
    # a fine-tuned copy keeps its base's _name_or_path: that is no identity
    assert body["identity"] == {"hubId": None, "revision": "a1b2c3"}
    assert not any(name.startswith(".cache") for name in body["files"])


def test_a_repush_uploads_nothing_and_an_interrupted_one_resumes(tmp_path, caplog):
    caplog.set_level("INFO", logger="ttt.models.push")
    src = save_tiny_lm(tmp_path / "lm")
    store = LocalStore(tmp_path / "store")
    dest = parse_model_path("s3://ttt/models/lm")
    first = push_model(src, store, dest, hub_id="gpt2")
    again = push_model(src, store, dest, hub_id="gpt2")
    assert again == first and "already pushed, identical" in _uploads(caplog)[-1]
    # a push killed after its first file: the manifest is not there, the progress record is
    store.delete("models/lm/")
    names = sorted(first["files"])

    class DiesAfterOne(LocalStore):
        puts = 0

        def put_file(self, local_path, key):
            if self.puts == 1:
                raise KeyboardInterrupt
            self.puts += 1
            return super().put_file(local_path, key)

    with pytest.raises(KeyboardInterrupt):
        push_model(src, DiesAfterOne(tmp_path / "store"), dest, hub_id="gpt2")
    assert store.read_manifest("models/lm") is None and store.exists(f"models/lm/{PROGRESS}")
    caplog.clear()
    push_model(src, store, dest, hub_id="gpt2")
    assert f"{len(names) - 1} file(s) uploaded, 1 already there" in _uploads(caplog)[-1]
    # another model at the same path: refused, since runs name models by path
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    with pytest.raises(ModelError, match="already holds another model.*new path"):
        push_model(src, store, dest, hub_id="gpt2")
    # the same files with their identity told better: the manifest is rewritten
    (src / "config.json").write_text((src / "config.json").read_text()[:-1])
    told = push_model(src, store, dest, hub_id="openai-community/gpt2", revision="r2")
    assert told["files"] == first["files"] and told["identity"]["revision"] == "r2"
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    # replaced on purpose: only the changed file is uploaded, under a new manifest
    caplog.clear()
    changed = push_model(src, store, dest, hub_id="gpt2", replace=True)
    assert f"1 file(s) uploaded, {len(names) - 1} already there" in _uploads(caplog)[-1]
    assert changed["files"]["config.json"] != first["files"]["config.json"]


def test_bad_sources_and_destinations_say_what_is_wrong(tmp_path):
    store = LocalStore(tmp_path / "store")
    dest = parse_model_path("s3://ttt/models/x")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="must be a .gguf"):
        push_model(tmp_path / "weights.bin", store, dest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        push_model(tmp_path / "empty", store, dest)
    with pytest.raises(ModelError, match="no such model"):
        push_model(tmp_path / "missing", store, dest)
    with pytest.raises(ModelError, match="not the run's store bucket"):
        parse_model_path("s3://other/models/x", "ttt")
    with pytest.raises(ModelError, match="expected s3://bucket/prefix"):
        parse_model_path("s3://ttt", "ttt")


# --- fetch, verify, cache ------------------------------------------------------------------


def test_fetch_verifies_caches_and_reuses(tmp_path, caplog):
    caplog.set_level("INFO", logger="ttt.models.cache")
    store = LocalStore(tmp_path / "store")
    push_model(_minilm(), store, parse_model_path("s3://ttt/models/minilm"))
    root = tmp_path / "cache"
    path = fetch_model("s3://ttt/models/minilm", store, bucket="ttt", root=root)
    assert path.parent == root / "ttt/models/minilm"
    assert sha256_file(path / "model.safetensors") == sha256_file(_minilm() / "model.safetensors")
    again = fetch_model("s3://ttt/models/minilm", store, bucket="ttt", root=root)
    assert again == path and "verified copy" in caplog.records[-1].getMessage()
    # a truncated cache file is noticed and fetched again
    (path / "vocab.txt").write_text("x")
    fetch_model("s3://ttt/models/minilm", store, bucket="ttt", root=root)
    assert sha256_file(path / "vocab.txt") == sha256_file(_minilm() / "vocab.txt")


def test_a_tampered_file_fails_its_sha256_naming_it(tmp_path):
    store = LocalStore(tmp_path / "store")
    push_model(_gguf(), store, parse_model_path("s3://ttt/models/smol"))
    blob = tmp_path / "store/models/smol" / _gguf().name
    with open(blob, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelError, match=f"file {_gguf().name} does not match the sha256"):
        fetch_model("s3://ttt/models/smol", store, root=tmp_path / "cache")
    assert not any((tmp_path / "cache/ttt/models/smol").glob("[!.]*"))  # nothing half-there
    with pytest.raises(ModelError, match="no model there.*ttt models push"):
        fetch_model("s3://ttt/models/none", store, root=tmp_path / "cache")


def test_a_gguf_is_fetched_as_its_file(tmp_path):
    storage = _storage(tmp_path, cacheDir=str(tmp_path / "cache"))
    push_model(_gguf(), LocalStore(tmp_path / "store"), parse_model_path("s3://ttt/models/smol"))
    path = Path(local_model("s3://ttt/models/smol", storage))
    assert path.name == _gguf().name and sha256_file(path) == sha256_file(_gguf())
    # under <storage.cacheDir>/models when TTT_MODELS_CACHE is not set
    assert path.parent.parent == tmp_path / "cache/models/ttt/models/smol"


def test_through_s3_a_model_loads_with_no_network(tmp_path, s3_server, s3_bucket, monkeypatch):
    from ttt.lm import load_lm

    storage = _storage(tmp_path, endpoint=s3_server, bucket=s3_bucket)
    lm = save_tiny_lm(tmp_path / "lm")
    uri = f"s3://{s3_bucket}/models/lm"
    assert main(["models", "push", str(lm), uri, "--hub-id", "gpt2"]) == 1  # not its bucket
    monkeypatch.setenv("TTT_STORAGE__ENDPOINT", s3_server)
    monkeypatch.setenv("TTT_STORAGE__BUCKET", s3_bucket)
    assert main(["models", "push", str(lm), uri, "--hub-id", "gpt2"]) == 0
    # no egress, as in an eval pod: only the store (loopback here) can be reached
    import socket

    connect = socket.socket.connect

    def loopback_only(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test: no egress to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setenv("TTT_MODELS_CACHE", str(tmp_path / "models"))
    model, tokenizer = load_lm(uri, device="cpu", storage=storage)
    cached = tmp_path / f"models/{s3_bucket}/models/lm"
    assert [p.name for p in cached.iterdir() if not p.name.startswith(".")] != []
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    reference, _ = load_lm(str(lm), device="cpu")
    assert model(ids).logits.equal(reference(ids).logits)
    assert cache_root(storage, {}) == Path("~/.cache/ttt/models").expanduser()


def test_a_node_s_ranks_fetch_one_copy_together(tmp_path):
    """Four processes fetch the same model at once: one downloads, the others wait on the
    lock and take its verified copy."""
    store_root = tmp_path / "store"
    push_model(_minilm(), LocalStore(store_root), parse_model_path("s3://ttt/models/minilm"))
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from ttt.models import fetch_model
        from ttt.store import LocalStore
        path = fetch_model("s3://ttt/models/minilm", LocalStore({str(store_root)!r}),
                           root={str(tmp_path / "cache")!r})
        print("PATH", path)
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {line for out in outs for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1
    assert sum("fetched model" in out for out in outs) == 1
    assert sum("verified copy" in out for out in outs) == 3
    path = Path(paths.pop().split(" ", 1)[1])
    for name in ("model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert sha256_file(path / name) == sha256_file(_minilm() / name)


def test_a_run_naming_models_by_store_path_scores_as_by_local_path(tmp_path):
    """The same tiny run, its LM and encoder named by local path and by pushed copy: the
    same vectors, and the same bits per byte to the last bit."""
    from test_eval import local_retriever, tiny_corpus, worker_run

    from ttt.embed import Encoder
    from ttt.eval import evaluate_rank
    from ttt.eval.records import parse_results

    lm = save_tiny_lm(tmp_path / "lm")
    results = {}
    for how in ("path", "store"):
        tmp = tmp_path / how
        tmp.mkdir()
        tiny_corpus(tmp, per_task=2)
        model = str(lm)
        encoder = "all-minilm-l6-v2"
        if how == "store":
            store = LocalStore(tmp / "store")
            push_model(lm, store, parse_model_path("s3://ttt/models/lm"), hub_id="gpt2")
            push_model(_minilm(), store, parse_model_path("s3://ttt/models/minilm"))
            model, encoder = "s3://ttt/models/lm", "s3://ttt/models/minilm"
        run = worker_run(tmp, model)
        store = open_store(run.spec.storage)
        evaluate_rank(
            run, store, 0, 1, retriever=local_retriever(run, tmp / "shards"),
            work_dir=tmp / "w", progress=False,
        )  # fmt: skip
        records = parse_results(store.get_bytes(f"{run.prefix}/eval/rank-00000/results.jsonl"), "r")
        bpb = {
            (r["doc"], after): -ll / (r["bytes"] * math.log(2))
            for r in records
            for after, ll in r["loglik"].items()
        }
        vectors = Encoder(encoder, storage=run.spec.storage, device="cpu").encode(["a test"])
        results[how] = (bpb, vectors)
    assert results["store"][0] == results["path"][0] and len(results["path"][0]) >= 4
    assert (results["store"][1] == results["path"][1]).all()


def test_the_cli_pushes_to_the_spec_s_store_and_shows_the_manifest(tmp_path, capsys):
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: m}\n"
        f"spec: {{storage: {{root: {tmp_path / 'store'}}}}}\n"
    )
    uri = "s3://ttt/models/smol"
    assert (
        main(["models", "push", "smollm2-135m", uri, "--spec", str(spec), "--revision", "v1"]) == 0
    )
    out = capsys.readouterr().out
    assert "hub id unknown, revision v1, sha256 " in out and f"model: {uri}" in out
    assert (tmp_path / "store/models/smol" / _gguf().name).is_file()
    assert main(["models", "show", uri, "--spec", str(spec)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["identity"]["revision"] == "v1" and shown["entry"] == _gguf().name
    assert main(["models", "show", "s3://ttt/models/none", "--spec", str(spec)]) == 1
    assert "no model there" in capsys.readouterr().err
