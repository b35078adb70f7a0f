"""The encoder: documents -> token batches planned by length -> mean-pooled, normalised vectors."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt.device import pick_device, pick_dtype
from ttt.errors import TTTError

log = logging.getLogger(__name__)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


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
        storage: Any = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from ttt.models import local_model

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r}: expected 'mean' or 'cls'")
        self.name = model
        self.pooling, self.normalize, self.batch_tokens = pooling, normalize, batch_tokens
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        path = local_model(model, storage)  # a pushed model: its verified local copy
        offline = {"local_files_only": True} if Path(path).is_dir() else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **offline)
            # SDPA (flash / memory-efficient kernels on a GPU) where the architecture has it
            self.model = AutoModel.from_pretrained(
                path, **{_DTYPE_KWARG: self.dtype}, **_attention_kwargs(path), **offline
            )
        except OSError as exc:
            raise EmbedError(f"encoder {model!r} ({path}): cannot load: {exc}") from None
        self.model.to(self.device).eval()
        self.max_tokens = min(max_tokens, self._position_limit())
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def from_spec(cls, embedding: Any, storage: Any = None) -> Encoder:
        """An encoder from a run's `spec.embedding` section (`storage`: the run's
        `spec.storage`, where a model named s3://bucket/prefix is read)."""
        return cls(
            embedding.model,
            pooling=embedding.pooling,
            max_tokens=embedding.max_tokens,
            normalize=embedding.normalize,
            dtype=embedding.dtype,
            device=embedding.device,
            batch_tokens=embedding.batch_tokens,
            storage=storage,
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
