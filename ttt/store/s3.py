"""The S3/MinIO backend of the artifact store: streaming transfers, retries, credentials."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from ttt.store.base import (
    CHUNK,
    ObjectInfo,
    ObjectNotFound,
    Store,
    StoreAccessDenied,
    StoreError,
    StoreUnreachable,
    check_key,
    check_prefix,
    fsync_dir,
    sha256_file,
    tmp_sibling,
    verify,
)
from ttt.store.credentials import S3Credentials, read_credentials_file
from ttt.store.s3_failures import DENIED, NETWORK, TRANSIENT, short_error, status_code

log = logging.getLogger(__name__)
T = TypeVar("T")

# Parts are read into memory one at a time per upload thread, so an upload holds about
# (threads + 1) x PART_SIZE bytes whatever the file's size.
PART_SIZE = 32 << 20
UPLOAD_THREADS = 4
BIG = 256 << 20  # transfers at least this large are logged with their rate


class _HashingReader:
    """A file reader that hashes what minio reads from it, in order."""

    def __init__(self, f: BinaryIO):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


class S3Store(Store):
    """A bucket on MinIO or any S3-compatible endpoint, through the minio SDK."""

    def __init__(
        self,
        endpoint: str,
        bucket: str = "ttt",
        *,
        secure: bool = False,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        credentials_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
        part_size: int = PART_SIZE,
        attempts: int = 5,
        backoff: float = 0.2,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
    ):
        if "://" in endpoint:  # accept a URL; its scheme decides TLS
            url = urlsplit(endpoint)
            if url.scheme not in ("http", "https") or url.path not in ("", "/"):
                raise StoreError(
                    f"S3 endpoint {endpoint!r}: expected host:port or http(s)://host:port"
                )
            endpoint, secure = url.netloc, url.scheme == "https"
        try:
            check_bucket_name(bucket)
        except ValueError as e:
            raise StoreError(f"storage.bucket {bucket!r}: {e} (S3 bucket naming rules)") from e
        self.endpoint, self.bucket, self.secure, self.region = endpoint, bucket, secure, region
        self.url = f"{'https' if secure else 'http'}://{endpoint}"
        self.part_size, self.attempts, self.backoff = part_size, max(1, attempts), backoff
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "ttt"
        self.cache_dir = Path(cache_dir or cache_root).expanduser()
        access_key, secret_key, source = self._credentials(access_key, secret_key, credentials_file)
        if access_key is None:
            log.warning("no S3 credentials for %s; using anonymous access", self.describe())
        else:
            log.debug("S3 credentials for %s from %s", self.describe(), source)
        # Short timeouts and no urllib3 retries: _call retries with backoff and turns the
        # last failure into an error that names the endpoint and the bucket.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            maxsize=UPLOAD_THREADS + 4,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self.client = Minio(
            endpoint, access_key, secret_key, secure=secure, region=region, http_client=http
        )

    @staticmethod
    def _credentials(
        access_key: str | None, secret_key: str | None, credentials_file: str | Path | None
    ) -> tuple[str | None, str | None, str]:
        """Explicit keys, else the mounted Secret the spec names, else the environment."""
        if access_key is not None:
            if not secret_key:
                raise StoreError("an S3 access key was given without its secret key")
            return access_key, secret_key, "arguments"
        if credentials_file:
            return (*read_credentials_file(credentials_file), str(credentials_file))
        env = S3Credentials()
        if env.access_key is None or env.secret_key is None:
            return None, None, "nowhere"
        return env.access_key.get_secret_value(), env.secret_key.get_secret_value(), "environment"

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.url}"

    # --- retries and errors -------------------------------------------------------------

    def _call(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one S3 operation, retrying transient failures with exponential backoff."""
        what = f"{op} {key}" if key else op
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except (MinioException, *NETWORK) as exc:
                last = exc
                self._raise_if_final(exc, what, key)
                if attempt == self.attempts:
                    break
                log.warning(
                    "%s on %s failed (attempt %d/%d): %s; retrying in %.1fs",
                    what, self.describe(), attempt, self.attempts, short_error(exc), delay,
                )  # fmt: skip
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 10.0)
        if isinstance(last, NETWORK):
            raise StoreUnreachable(
                f"cannot connect to S3 store at {self.url} (bucket {self.bucket!r}) after "
                f"{self.attempts} attempts during {what}: {short_error(last)}"
            ) from last
        raise StoreError(
            f"{what} failed on {self.describe()} after {self.attempts} attempts: {short_error(last)}"
        ) from last

    def _raise_if_final(self, exc: BaseException, what: str, key: str | None) -> None:
        """Raise the StoreError for a failure that retrying cannot fix."""
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        if isinstance(exc, urllib3.exceptions.SSLError):
            raise StoreUnreachable(
                f"cannot connect to S3 store at {self.url} (bucket {self.bucket!r}): TLS "
                f"failed ({short_error(exc)}); check storage.secure and the certificate"
            ) from exc
        if isinstance(exc, NETWORK):
            return
        code = exc.code if isinstance(exc, S3Error) else None
        status = status_code(exc)
        if code in DENIED or (code is None and status == 403):
            raise StoreAccessDenied(
                f"S3 store at {self.url} (bucket {self.bucket!r}) rejected the credentials "
                f"or denied access ({code or status}) during {what}; check TTT_S3_ACCESS_KEY/"
                "TTT_S3_SECRET_KEY or storage.credentialsFile"
            ) from exc
        if code in ("NoSuchKey", "NoSuchObject") and key is not None:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from exc
        if code == "NoSuchBucket":
            raise StoreError(
                f"bucket {self.bucket!r} does not exist at {self.url} (during {what}); create "
                "it, or call ensure_bucket()"
            ) from exc
        if code in TRANSIENT or (status is not None and (status >= 500 or status == 429)):
            return
        raise StoreError(f"{what} failed on {self.describe()}: {short_error(exc)}") from exc

    # --- transfers ----------------------------------------------------------------------

    def put_file(self, local_path: str | Path, key: str) -> ObjectInfo:
        path, key = Path(local_path), check_key(key)
        size = path.stat().st_size
        start = time.monotonic()

        def upload() -> str:
            with open(path, "rb") as f:  # reopened per attempt: the hash restarts with it
                reader = _HashingReader(f)
                self.client.put_object(
                    self.bucket, key, reader, length=size, part_size=self.part_size,
                    num_parallel_uploads=UPLOAD_THREADS,
                )  # fmt: skip
                return reader.digest.hexdigest()

        sha256 = self._call("upload", key, upload)
        self._log_rate("uploaded", key, size, start)
        return ObjectInfo(key, size, sha256)

    def _download(self, key: str, dest: Path, sha256: str | None) -> tuple[int, str, str]:
        """Stream `key` into `dest` via a temp file; returns (size, sha256, etag)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dest)
        digest = hashlib.sha256()
        state: dict[str, Any] = {"size": 0, "etag": None}
        start = time.monotonic()
        try:
            with open(tmp, "wb") as out:

                def attempt() -> None:
                    # A retry resumes where the broken stream stopped.
                    resp = self.client.get_object(self.bucket, key, offset=state["size"])
                    try:
                        etag = resp.headers.get("ETag", "").strip('"')
                        if state["etag"] is None:
                            state["etag"] = etag
                        elif etag != state["etag"]:
                            raise StoreError(
                                f"{key} in {self.describe()} changed while downloading"
                            )
                        for chunk in resp.stream(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            state["size"] += len(chunk)
                    finally:
                        resp.close()
                        resp.release_conn()

                self._call("download", key, attempt)
                out.flush()
                os.fsync(out.fileno())
            verify(key, self, digest.hexdigest(), sha256)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._log_rate("downloaded", key, state["size"], start)
        return state["size"], digest.hexdigest(), state["etag"]

    def get_file(self, key: str, local_path: str | Path, sha256: str | None = None) -> Path:
        dest = Path(local_path)
        self._download(check_key(key), dest, sha256)
        return dest

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        """A cached download under cache_dir/<endpoint>/<bucket>/<key>, reused while valid.

        With `sha256` a cached copy recorded with that hash is used without any request;
        without, one HEAD compares the object's ETag with the cached one. Either way the
        cached file is hashed again first: a copy changed on disk (even to the same size and
        mtime) is downloaded again, never trusted.
        """
        key = check_key(key)
        path = self.cache_dir / self.endpoint.replace(":", "_") / self.bucket / key
        meta_path = path.with_name(f".{path.name}.ttt-cache.json")
        meta = _read_cache_meta(path, meta_path)
        if meta is not None:
            if sha256 is not None and meta["sha256"] == sha256:
                return path
            if sha256 is None:
                stat = self._call("stat", key, lambda: self.client.stat_object(self.bucket, key))
                if (stat.etag or "").strip('"') == meta["etag"]:
                    return path
        size, digest, etag = self._download(key, path, sha256)
        meta = {"sha256": digest, "etag": etag, "size": size}
        tmp = tmp_sibling(meta_path)
        with open(tmp, "w") as f:
            f.write(json.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        fsync_dir(meta_path.parent)
        return path

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        key = check_key(key)
        self._call(
            "upload", key,
            lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data)),
        )  # fmt: skip
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def get_bytes(self, key: str) -> bytes:
        key = check_key(key)

        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call("download", key, read)

    def exists(self, key: str) -> bool:
        key = check_key(key)
        try:
            self._call("stat", key, lambda: self.client.stat_object(self.bucket, key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix)

        def listing() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return sorted(o.object_name for o in objects if not o.object_name.endswith("/"))

        return self._call("list", prefix or "(all)", listing)

    def delete(self, prefix: str) -> int:
        keys = self.list(check_prefix(prefix, allow_empty=False))

        def remove() -> None:
            # remove_objects is lazy: its errors only arrive as they are iterated.
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            if errors:
                shown = ", ".join(f"{e.name}: {e.code}" for e in errors[:5])
                raise StoreError(f"delete {prefix} on {self.describe()}: {shown}")

        if keys:
            self._call("delete", prefix, remove)
        return len(keys)

    def ensure_bucket(self) -> None:
        def make() -> None:
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket, location=self.region)
            except S3Error as e:  # created meanwhile by another worker
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create bucket", None, make)

    def _log_rate(self, verb: str, key: str, size: int, start: float) -> None:
        if size >= BIG:
            secs = max(time.monotonic() - start, 1e-6)
            log.info("%s %s (%.0f MB, %.0f MB/s) on %s", verb, key, size / 1e6,
                     size / 1e6 / secs, self.describe())  # fmt: skip


def _read_cache_meta(path: Path, meta_path: Path) -> dict | None:
    """The cache record of `path` if the file is still the one it describes (by sha256:
    size and mtime say nothing of a byte changed in place)."""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("size") != path.stat().st_size:
            return None
        if sha256_file(path) != meta.get("sha256"):
            log.warning("cached %s changed on disk: downloading it again", path)
            return None
    except (OSError, ValueError):
        return None
    return meta
