"""The local-directory backend of the artifact store: atomic writes, fsync'd, one file per key."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ttt.store.base import (
    TMP_NAME,
    ObjectInfo,
    ObjectNotFound,
    Store,
    check_key,
    check_prefix,
    copy_hashing,
    fsync_dir,
    sha256_file,
    tmp_sibling,
    verify,
)


class LocalStore(Store):
    """A directory on this machine; every write lands by atomic rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()

    def describe(self) -> str:
        return f"local dir {self.root}"

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in {self.describe()}")

    def _write(self, key: str, src: BinaryIO) -> ObjectInfo:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dest)
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                size = copy_hashing(src, out, digest)
                out.flush()
                os.fsync(out.fileno())  # the data on disk before the rename publishes it
            os.replace(tmp, dest)
            fsync_dir(dest.parent)  # and the rename itself
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key, size, digest.hexdigest())

    def put_file(self, local_path: str | Path, key: str) -> ObjectInfo:
        local_path = Path(local_path)
        dest = self._path(key)
        if dest.exists() and dest.samefile(local_path):  # written in place already
            return ObjectInfo(key, dest.stat().st_size, sha256_file(dest))
        with open(local_path, "rb") as src:
            return self._write(key, src)

    def get_file(self, key: str, local_path: str | Path, sha256: str | None = None) -> Path:
        src_path = self._path(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dest)
        digest = hashlib.sha256()
        try:
            with open(src_path, "rb") as src, open(tmp, "wb") as out:
                copy_hashing(src, out, digest)
                out.flush()
                os.fsync(out.fileno())
            verify(key, self, digest.hexdigest(), sha256)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except FileNotFoundError as e:
            tmp.unlink(missing_ok=True)
            if not src_path.is_file():
                raise self._missing(key) from e
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        if sha256 is not None:
            verify(key, self, sha256_file(path), sha256)
        return path

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._write(key, io.BytesIO(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise self._missing(key) from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk(self, prefix: str) -> Iterator[str]:
        # Walk only the deepest directory the prefix names, then filter by string prefix.
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if TMP_NAME.match(name):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._walk(check_prefix(prefix)))

    def delete(self, prefix: str) -> int:
        keys = self.list(check_prefix(prefix, allow_empty=False))
        dirs = set()
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            dirs.update(path.parents)
        # Prune directories left empty, deepest first, never the root itself.
        for d in sorted((d for d in dirs if self.root in d.parents), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        return len(keys)
