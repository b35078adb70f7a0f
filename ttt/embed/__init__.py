"""Embedding: the encoder (encoder) and the embed stage that turns a shard's texts into vectors
(shards)."""

from __future__ import annotations

from ttt.embed.encoder import EmbedError, Encoder, mean_pool, plan_batches
from ttt.embed.shards import EMBEDDINGS, IDS, PART_SIZE, embed_shard, open_text_store

__all__ = [
    "EMBEDDINGS",
    "IDS",
    "PART_SIZE",
    "EmbedError",
    "Encoder",
    "embed_shard",
    "mean_pool",
    "open_text_store",
    "plan_batches",
]
