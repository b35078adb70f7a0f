"""FAISS shard indexes: building, serving one shard over HTTP, and the fan-out client."""
