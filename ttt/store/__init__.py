"""The artifact store: one interface over a local directory and an S3/MinIO bucket."""

from __future__ import annotations

from typing import Any

from ttt.store.base import (
    CHUNK,
    MANIFEST,
    MANIFEST_CHECKSUM,
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    Store,
    StoreAccessDenied,
    StoreError,
    StoreUnreachable,
    check_key,
    check_prefix,
    copy_hashing,
    fsync_dir,
    manifest_checksum,
    sha256_file,
    tmp_sibling,
    verify,
)
from ttt.store.local import LocalStore

__all__ = [
    "CHUNK",
    "MANIFEST",
    "MANIFEST_CHECKSUM",
    "IntegrityError",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Store",
    "Store",
    "StoreAccessDenied",
    "StoreError",
    "StoreUnreachable",
    "check_key",
    "check_prefix",
    "copy_hashing",
    "fsync_dir",
    "manifest_checksum",
    "open_store",
    "sha256_file",
    "tmp_sibling",
    "verify",
]


def open_store(storage: Any = None, **overrides: Any) -> Store:
    """The store a spec's `storage` section names: S3 when it has an endpoint, else local.

    `storage` is any object with the StorageSpec attributes (endpoint, bucket, secure,
    region, root, credentials_file, cache_dir); keyword arguments override them.
    """
    fields = {
        "endpoint": None,
        "bucket": "ttt",
        "secure": False,
        "region": None,
        "root": "ttt-store",
        "credentials_file": None,
        "cache_dir": None,
    }
    for name in fields:
        if storage is not None and hasattr(storage, name):
            fields[name] = getattr(storage, name)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"open_store: unknown storage fields {sorted(unknown)}")
    fields.update(overrides)
    if not fields["endpoint"]:
        return LocalStore(fields["root"])
    from ttt.store.s3 import S3Store

    return S3Store(
        fields["endpoint"],
        fields["bucket"],
        secure=fields["secure"],
        region=fields["region"],
        credentials_file=fields["credentials_file"],
        cache_dir=fields["cache_dir"],
    )


def __getattr__(name: str) -> Any:
    # S3Store (the minio client, retries, credentials) is imported on first use, so a
    # local run never loads minio; it is importable from here like every other store name.
    if name == "S3Store":
        from ttt.store.s3 import S3Store

        return S3Store
    raise AttributeError(name)
