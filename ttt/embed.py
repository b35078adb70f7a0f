"""The encoder and the embedding shards: documents -> mean-pooled vectors -> vector shards."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ttt import telemetry
from ttt.device import pick_device, pick_dtype
from ttt.errors import TTTError

log = logging.getLogger(__name__)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


EMBEDDINGS, IDS = "embeddings.npy", "ids.json"
PART_SIZE = 4096  # documents per resumable part: minutes of work on a GPU, not hours
# A token is rarely longer than this many characters; cutting a document before tokenizing
# keeps a multi-megabyte Pile document from costing seconds for the 512 tokens we keep.
_CHARS_PER_TOKEN_BOUND = 32
# transformers renamed from_pretrained's torch_dtype to dtype in 4.56.
_DTYPE_KWARG = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer"}


class EmbedError(TTTError, RuntimeError):
    """An embedding stage that cannot run; the message names the shard and the store key."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's document vector: the mean of the last hidden states over real tokens."""
    weights = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1.0)


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Rows sorted by length (longest first) and packed so that padded width x rows <= budget.

    Longest first: the widest batch runs first, so an out-of-memory budget fails at once.
    A document longer than the whole budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable for ties
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if current and w * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def _attention_kwargs(path: str) -> dict[str, str]:
    """attn_implementation="sdpa" for architectures that have it; {} for the others."""
    try:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        model_class = AutoModel._model_mapping[type(config)]
    except (OSError, KeyError, ValueError):
        return {}
    return {"attn_implementation": "sdpa"} if getattr(model_class, "_supports_sdpa", False) else {}


def _collect(
    pending: tuple[np.ndarray, torch.Tensor, int, Any],
) -> tuple[np.ndarray, np.ndarray, int]:
    """A launched batch's (rows, vectors, tokens), once its copy to the host has finished."""
    rows, vectors, tokens, done = pending
    if done is not None:
        done.synchronize()
    return rows, vectors.numpy(), tokens


class Encoder:
    """A transformer encoder that turns texts into one vector each (float32, n x dim)."""

    def __init__(
        self,
        model: str,
        pooling: str = "mean",
        max_tokens: int = 512,
        normalize: bool = False,
        dtype: str = "auto",
        device: str = "auto",
        batch_tokens: int = 16384,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from ttt.assets import resolve_model

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r}: expected 'mean' or 'cls'")
        self.name = model
        self.pooling, self.normalize, self.batch_tokens = pooling, normalize, batch_tokens
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        path = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # SDPA (flash / memory-efficient kernels on a GPU) where the architecture has it
            self.model = AutoModel.from_pretrained(
                path, **{_DTYPE_KWARG: self.dtype}, **_attention_kwargs(path)
            )
        except OSError as exc:
            raise EmbedError(f"encoder {model!r} ({path}): cannot load: {exc}") from None
        self.model.to(self.device).eval()
        self.max_tokens = min(max_tokens, self._position_limit())
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def from_spec(cls, embedding: Any) -> Encoder:
        """An encoder from a run's `spec.embedding` section."""
        return cls(
            embedding.model,
            pooling=embedding.pooling,
            max_tokens=embedding.max_tokens,
            normalize=embedding.normalize,
            dtype=embedding.dtype,
            device=embedding.device,
            batch_tokens=embedding.batch_tokens,
        )

    def _position_limit(self) -> int:
        config = self.model.config
        limit = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        if getattr(config, "model_type", "") in _ROBERTA_LIKE:
            limit -= int(config.pad_token_id) + 1  # RoBERTa's positions start after padding
        tokenizer_limit = int(getattr(self.tokenizer, "model_max_length", 1 << 30))
        return min(limit, tokenizer_limit if tokenizer_limit < 1 << 30 else limit)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated to max_tokens."""
        bound = self.max_tokens * _CHARS_PER_TOKEN_BOUND
        cut = [t[:bound] for t in texts]
        ids = self.tokenizer(
            cut, truncation=True, max_length=self.max_tokens, return_attention_mask=False
        )["input_ids"]
        for i, text in enumerate(texts):
            # A cut text that came out short may have lost real tokens: tokenize it whole.
            if len(text) > bound and len(ids[i]) < self.max_tokens:
                ids[i] = self.tokenizer(text, truncation=True, max_length=self.max_tokens)[
                    "input_ids"
                ]
        return ids

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the encoder reads for these texts (after truncation), padding excluded."""
        return sum(len(ids) for ids in self.tokenize(texts))

    @torch.inference_mode()
    def _launch(self, batch: list[list[int]]) -> torch.Tensor:
        """Queue one batch on the device; its float32 vectors (on a GPU: still computing)."""
        width = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        if self.device.type == "cuda":  # pinned pages: the copy runs while the host packs on
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        input_ids = input_ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "mean":
            vectors = mean_pool(hidden, mask)
        else:
            vectors = hidden[:, 0].to(torch.float32)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        if self.device.type == "cuda":
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            return host.copy_(vectors, non_blocking=True)
        return vectors

    def encode_batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Yields (rows, vectors, tokens) per packed batch; rows index into `texts`.

        On a GPU the next batch is packed and queued before the previous one is read back
        (pinned, non-blocking copies), so the device never waits for the host in between.
        """
        ids = self.tokenize(texts)
        pending: tuple[np.ndarray, torch.Tensor, int, Any] | None = None
        for rows in plan_batches([len(x) for x in ids], self.batch_tokens):
            batch = [ids[r] for r in rows]
            launched = self._launch(batch)
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
            if pending is not None:
                yield _collect(pending)
            pending = (np.asarray(rows), launched, sum(len(x) for x in batch), done)
        if pending is not None:
            yield _collect(pending)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One float32 vector per text, in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for rows, vectors, _ in self.encode_batches(texts):
            out[rows] = vectors
        return out


# --- the embedding stage ---------------------------------------------------------------------


def open_text_store(run: Any, store: Any, shard: int) -> Any:
    """The published text store of a shard (see `ttt.stages.open_text_store`)."""
    from ttt.stages import open_text_store as open_published

    return open_published(run, store, shard, EmbedError)


def embed_shard(
    run: Any,
    store: Any,
    shard: int,
    *,
    encoder: Encoder | None = None,
    part_size: int = PART_SIZE,
    on_part: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Embed every document of a shard into embeddings.npy and publish it.

    The rows are float32 (the paper's index) or float16 (spec.embedding.storage, our option).

    Work is saved part by part under `<prefix>/parts/<spec hash>/`, so a crashed run resumes
    at the first unfinished part. `on_part(i)` is called after part i is saved. When the
    corpus stage has not been published for this spec, it is run first.
    """
    from ttt.stages import is_done, publish_corpus, shard_prefix

    prefix = shard_prefix(run, "embed", shard)
    spec_hash = run.stage_hash("embed")
    done = store.read_manifest(prefix)
    if done is not None and done.get("spec_hash") == spec_hash:
        log.info("embed shard %d: already published (%s), skipping", shard, spec_hash)
        return done
    if not 0 <= shard < run.spec.corpus.shards:
        raise EmbedError(f"shard {shard}: the spec has {run.spec.corpus.shards} shard(s)")
    if not is_done(run, store, shard_prefix(run, "corpus", shard), "corpus"):
        publish_corpus(run, store, progress=progress)
    texts = open_text_store(run, store, shard)
    encoder = encoder or Encoder.from_spec(run.spec.embedding)
    n = len(texts)
    n_parts = math.ceil(n / part_size)
    parts_prefix = f"{prefix}/parts/{spec_hash}"
    storage = run.spec.embedding.storage
    label = str(shard)
    totals = {"tokens": 0, "seconds": 0.0, "resumed_parts": 0}
    bar = tqdm(total=n, desc=f"embed shard {shard}", unit="doc", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="ttt-embed-") as tmp:
        infos = []
        for p in range(n_parts):
            key = f"{parts_prefix}/part-{p:05d}"
            rows = range(p * part_size, min(n, (p + 1) * part_size))
            info = store.get_json(f"{key}.json") if store.exists(f"{key}.json") else None
            # A part saved with another part size covers other rows: redo it.
            if info is not None and (info["start"], info["count"]) == (rows.start, len(rows)):
                totals["resumed_parts"] += 1
                bar.update(info["count"])
            else:
                info = _embed_part(encoder, texts, rows, Path(tmp), key, store, bar, label, storage)
                log.info(
                    "embed shard %d: part %d/%d, %.0f tokens/s, %.1f docs/s",
                    shard,
                    p + 1,
                    n_parts,
                    info["tokens"] / max(info["seconds"], 1e-9),
                    info["count"] / max(info["seconds"], 1e-9),
                )
            infos.append(info)
            totals["tokens"] += info["tokens"]
            totals["seconds"] += info["seconds"]
            if on_part is not None:
                on_part(p)
        bar.close()
        files = _assemble(store, parts_prefix, infos, n, encoder.dim, texts.ids, Path(tmp), storage)
        seconds = max(totals["seconds"], 1e-9)
        manifest = {
            "stage": "embed",
            "shard": shard,
            "spec_hash": spec_hash,
            "encoder": encoder.name,
            "pooling": encoder.pooling,
            "max_tokens": encoder.max_tokens,
            "normalize": encoder.normalize,
            "dtype": run.spec.embedding.storage,
            "dim": encoder.dim,
            "count": n,
            "ids": IDS,
            "corpus": shard_prefix(run, "corpus", shard),
            "tokens": totals["tokens"],
            "seconds": round(totals["seconds"], 3),
            "tokens_per_second": round(totals["tokens"] / seconds, 1),
            "documents_per_second": round(n / seconds, 2),
            "parts": n_parts,
            "resumed_parts": totals["resumed_parts"],
            "device": str(encoder.device),
            "compute_dtype": str(encoder.dtype).removeprefix("torch."),
        }
        result = store.publish(prefix, files, manifest)
    texts.close()
    store.delete(f"{prefix}/parts/")
    log.info(
        "embed shard %d: %d documents, %d tokens in %.1f s (%.0f tokens/s, %.1f docs/s)",
        shard,
        n,
        totals["tokens"],
        seconds,
        totals["tokens"] / seconds,
        n / seconds,
    )
    return result if isinstance(result, dict) else manifest


def _embed_part(
    encoder: Encoder,
    texts: Any,
    rows: range,
    tmp: Path,
    key: str,
    store: Any,
    bar: tqdm,
    label: str,
    storage: str = "float32",
) -> dict:
    """Embed one part, save it to the store (vectors first, then its small json record)."""
    start = time.perf_counter()
    part_texts = [texts.text(r) for r in rows]
    out = np.zeros((len(part_texts), encoder.dim), dtype=storage)
    tokens = 0
    for batch_rows, vectors, batch_tokens in encoder.encode_batches(part_texts):
        out[batch_rows] = vectors
        tokens += batch_tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        telemetry.EMBED_TOKENS.labels(shard=label).inc(batch_tokens)
        telemetry.EMBED_DOCUMENTS.labels(shard=label).inc(len(batch_rows))
        bar.update(len(batch_rows))
        bar.set_postfix(tok_s=f"{tokens / elapsed:,.0f}", refresh=False)
    seconds = time.perf_counter() - start
    path = tmp / f"{Path(key).name}.npy"
    np.save(path, out)
    obj = store.put_file(path, f"{key}.npy")
    path.unlink()
    info = {
        "start": rows.start,
        "count": len(rows),
        "tokens": tokens,
        "seconds": seconds,
        "sha256": getattr(obj, "sha256", None),
    }
    store.put_json(f"{key}.json", info)  # written last: its presence marks the part done
    return info


def _assemble(
    store: Any,
    parts_prefix: str,
    infos: list[dict],
    n: int,
    dim: int,
    ids: list[str],
    tmp: Path,
    storage: str = "float32",
) -> dict[str, Path]:
    """Concatenate the parts into one embeddings.npy (memory-mapped, not in RAM)."""
    path = tmp / EMBEDDINGS
    out = np.lib.format.open_memmap(path, mode="w+", dtype=storage, shape=(n, dim))
    for p, info in enumerate(infos):
        key = f"{parts_prefix}/part-{p:05d}.npy"
        part = np.load(store.fetch(key, sha256=info.get("sha256")), allow_pickle=False)
        if part.shape != (info["count"], dim):
            raise EmbedError(f"{key}: shape {part.shape}, expected ({info['count']}, {dim})")
        out[info["start"] : info["start"] + info["count"]] = part
    out.flush()
    del out
    ids_path = tmp / IDS
    ids_path.write_text(json.dumps(list(ids)), encoding="utf-8")
    return {EMBEDDINGS: path, IDS: ids_path}
