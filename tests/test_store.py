"""The artifact store: both backends through the same tests, S3 against a real moto server."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ttt.spec import StorageSpec
from ttt.store import (
    IntegrityError,
    LocalStore,
    ObjectNotFound,
    Store,
    StoreAccessDenied,
    StoreError,
    StoreUnreachable,
    open_store,
)
from ttt.store.credentials import S3Credentials, read_credentials_file
from ttt.store.s3 import S3Store

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_server")
    # The smallest part S3 allows, so a 20 MB file goes up in four parts.
    return S3Store(endpoint, bucket, cache_dir=tmp_path / "cache", part_size=5 * MiB)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".tmp-" in p.name]


# --- the interface, on both backends ---------------------------------------------------


def test_bytes_json_exists(store: Store) -> None:
    info = store.put_bytes("runs/a/x.bin", b"hello")
    assert (info.key, info.size, info.sha256) == ("runs/a/x.bin", 5, _sha(b"hello"))
    assert store.get_bytes("runs/a/x.bin") == b"hello"
    assert store.exists("runs/a/x.bin") and not store.exists("runs/a/y.bin")
    assert not store.exists("runs/a")  # a "directory" is not an object
    store.put_json("runs/a/m.json", {"n": 3, "s": "ü"})
    assert store.get_json("runs/a/m.json") == {"n": 3, "s": "ü"}
    store.put_bytes("runs/a/x.bin", b"replaced")
    assert store.get_bytes("runs/a/x.bin") == b"replaced"


def test_put_and_get_file(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    info = store.put_file(src, "f/src.bin")
    assert (info.size, info.sha256) == (len(data), _sha(data))
    out = tmp_path / "out" / "copy.bin"
    assert store.get_file("f/src.bin", out, sha256=info.sha256) == out
    assert out.read_bytes() == data
    assert _leftovers(tmp_path) == []


def test_sha256_mismatch_is_detected_and_partial_removed(store: Store, tmp_path: Path) -> None:
    store.put_bytes("f/a.bin", b"payload")
    out = tmp_path / "dl" / "a.bin"
    with pytest.raises(IntegrityError, match="f/a.bin"):
        store.get_file("f/a.bin", out, sha256=_sha(b"something else"))
    assert not out.exists() and _leftovers(tmp_path / "dl") == []
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.fetch("f/a.bin", sha256=_sha(b"something else"))
    assert store.fetch("f/a.bin", sha256=_sha(b"payload")).read_bytes() == b"payload"


def test_missing_objects(store: Store, tmp_path: Path) -> None:
    for call in (
        lambda: store.get_bytes("no/such"),
        lambda: store.get_file("no/such", tmp_path / "x"),
        lambda: store.fetch("no/such"),
    ):
        with pytest.raises(ObjectNotFound) as e:
            call()
        assert "no/such" in str(e.value) and store.describe() in str(e.value)
    assert store.read_manifest("no/stage") is None
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/"])
def test_invalid_keys(store: Store, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_bytes(key, b"x")


def test_list_and_delete_use_string_prefixes(store: Store) -> None:
    for key in ["a/x", "a/y/z", "ab/q", "b"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/x", "a/y/z", "ab/q", "b"]
    assert store.list("a/") == ["a/x", "a/y/z"]
    assert store.list("a") == ["a/x", "a/y/z", "ab/q"]
    assert store.list("a/y/") == ["a/y/z"]
    assert store.list("nothing/") == []
    with pytest.raises(StoreError):
        store.delete("")  # never "everything" by accident
    assert store.delete("a/") == 2
    assert store.list() == ["ab/q", "b"]
    assert store.delete("a/") == 0
    if isinstance(store, LocalStore):
        assert not (store.root / "a").exists()  # emptied directories are pruned


def test_publish_writes_manifest_with_checksums(store: Store, tmp_path: Path) -> None:
    files = {}
    for name, data in {"embeddings.npy": os.urandom(1000), "ids.json": b"[1, 2]"}.items():
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    body = store.publish("runs/r/embed/shard-00000", files, {"stage": "embed", "shard": 0})
    stored = store.read_manifest("runs/r/embed/shard-00000")
    assert stored == body
    assert stored["stage"] == "embed" and stored["shard"] == 0 and stored["created"]
    for name, path in files.items():
        data = path.read_bytes()
        assert stored["files"][name] == {"size": len(data), "sha256": _sha(data)}
        got = store.fetch(
            f"runs/r/embed/shard-00000/{name}", sha256=stored["files"][name]["sha256"]
        )
        assert got.read_bytes() == data
    assert store.list("runs/r/embed/shard-00000/")[-1].endswith("manifest.json")


def test_publish_writes_the_manifest_last_in_real_write_order(store: Store, tmp_path: Path):
    """The order of the writes themselves, not of a sorted listing."""
    writes: list[tuple[str, str]] = []
    for method in ("put_file", "put_bytes", "delete"):
        real = getattr(store, method)

        def record(*args, _real=real, _method=method, **kwargs):
            key = args[1] if _method == "put_file" else args[0]
            writes.append((_method, key))
            return _real(*args, **kwargs)

        setattr(store, method, record)  # publish calls these through self
    files = {}
    for name in ("z-last-alphabetically.bin", "a.bin"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    store.publish("runs/r/stage", files, {"stage": "s"})
    writes.clear()
    store.publish("runs/r/stage", files, {"stage": "s", "again": True})
    manifest = "runs/r/stage/manifest.json"
    assert writes[0] == ("delete", manifest)  # the old manifest goes before any file
    assert writes[-1] == ("put_bytes", manifest)  # and the new one after every file
    assert {k for _, k in writes[1:-1]} == {f"runs/r/stage/{n}" for n in files}


def test_a_manifest_is_checked_against_its_own_checksum(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"payload")
    body = store.publish("runs/r/stage", {"data.bin": data}, {"stage": "s", "count": 10})
    assert store.read_manifest("runs/r/stage") == body
    raw = store.get_bytes("runs/r/stage/manifest.json")
    flipped = raw.replace(b'"count": 10', b'"count": 11')  # same size, one digit
    assert len(flipped) == len(raw) and flipped != raw
    store.put_bytes("runs/r/stage/manifest.json", flipped)
    with pytest.raises(IntegrityError, match="does not match its own checksum"):
        store.read_manifest("runs/r/stage")


def test_local_writes_fsync_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    from ttt.eval.records import write_records

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = LocalStore(tmp_path / "store")
    for write in (
        lambda: store.put_bytes("a/b", b"data"),
        lambda: store.get_file("a/b", tmp_path / "copy"),
        lambda: write_records(tmp_path / "results.jsonl", [{"doc": "a"}]),
    ):
        events.clear()
        write()
        assert events == ["fsync file", "rename", "fsync dir"]


def test_failed_publish_leaves_no_manifest(store: Store, tmp_path: Path) -> None:
    """The manifest goes last and a stale one goes first: half a stage is never finished."""
    good = tmp_path / "good.bin"
    good.write_bytes(b"v1")
    store.publish("runs/r/stage", {"good.bin": good}, {"stage": "s", "version": 1})
    assert store.read_manifest("runs/r/stage")["version"] == 1
    files = {"good.bin": good, "missing.bin": tmp_path / "does-not-exist"}
    with pytest.raises(FileNotFoundError):
        store.publish("runs/r/stage", files, {"stage": "s", "version": 2})
    assert store.read_manifest("runs/r/stage") is None
    with pytest.raises(StoreError, match="reserved"):
        store.publish("runs/r/stage", {"manifest.json": good}, {})


def test_large_file_streams(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(20):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    info = store.put_file(big, "big/big.bin")
    assert (info.size, info.sha256) == (20 * MiB, digest.hexdigest())
    out = tmp_path / "big-copy.bin"
    if isinstance(store, S3Store):
        # A multipart object's ETag ends in -<parts>: the 20 MiB went up in 5 MiB parts.
        etag = store.client.stat_object(store.bucket, "big/big.bin").etag
        assert etag.strip('"').endswith("-4")
        store.get_file("big/big.bin", out, sha256=info.sha256)
    else:
        # moto runs in this process and holds objects in memory, so only the local backend
        # can show with tracemalloc that a transfer never holds the file.
        tracemalloc.start()
        try:
            store.put_file(big, "big/again.bin")
            store.get_file("big/big.bin", out, sha256=info.sha256)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB
    assert out.stat().st_size == 20 * MiB
    with open(out, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == info.sha256


# --- local backend -----------------------------------------------------------------------


def test_local_store_hides_temp_files_and_fetches_in_place(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("d/a", b"1")
    (store.root / "d" / ".a.tmp-0123456789ab").write_bytes(b"half")  # a writer mid-way
    assert store.list() == ["d/a"]
    assert store.fetch("d/a") == store.root / "d" / "a"
    assert str(store.root) in store.describe()


# --- S3 backend: cache, errors, retries, credentials -------------------------------------


def test_s3_fetch_caches_and_notices_changes(s3_server: str, s3_bucket: str, tmp_path: Path):
    store = S3Store(s3_server, s3_bucket, cache_dir=tmp_path / "cache")
    v1 = store.put_bytes("c/obj", b"version 1")
    path = store.fetch("c/obj")
    assert path.read_bytes() == b"version 1" and tmp_path / "cache" in path.parents
    store.delete("c/obj")
    # With the expected sha256 a valid cached copy is used without asking the server.
    assert store.fetch("c/obj", sha256=v1.sha256).read_bytes() == b"version 1"
    store.put_bytes("c/obj", b"version 2")
    assert store.fetch("c/obj").read_bytes() == b"version 2"  # the ETag changed
    path.write_bytes(b"tampered")  # a changed cache file is not trusted
    assert store.fetch("c/obj", sha256=_sha(b"version 2")).read_bytes() == b"version 2"


def test_s3_cache_notices_a_same_size_same_mtime_tamper(
    s3_server: str, s3_bucket: str, tmp_path: Path
):
    store = S3Store(s3_server, s3_bucket, cache_dir=tmp_path / "cache")
    info = store.put_bytes("c/weights", b"0123456789" * 100)
    path = store.fetch("c/weights", sha256=info.sha256)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01  # one flipped bit: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert store.fetch("c/weights", sha256=info.sha256).read_bytes() == b"0123456789" * 100
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.fetch("c/weights").read_bytes() == b"0123456789" * 100  # the ETag path too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast_with_a_clear_error() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    store = open_store(StorageSpec(endpoint=endpoint, bucket="ttt-runs"))
    start = time.monotonic()
    with pytest.raises(StoreUnreachable) as e:
        store.put_bytes("k", b"x")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "cannot connect" in msg and endpoint in msg and "ttt-runs" in msg


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        store = S3Store(endpoint, "ttt", region="us-east-1", read_timeout=0.3, attempts=2)
        start = time.monotonic()
        with pytest.raises(StoreUnreachable, match="timed out"):
            store.get_bytes("k")
        assert time.monotonic() - start < 5


def test_tls_against_plain_http_says_so(s3_server: str) -> None:
    store = S3Store(s3_server, "ttt", secure=True, region="us-east-1", attempts=3, backoff=5)
    with pytest.raises(StoreUnreachable, match="TLS"):
        store.exists("k")  # not retried: a TLS mismatch is no transient failure


class FaultProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy to the S3 server that first answers with scripted faults:
    (status, S3 error code) pairs, or "truncate" to cut a response body in half."""

    daemon_threads = True

    def __init__(self, upstream: str, faults: list):
        self.upstream, self.faults, self.requests = upstream, list(faults), []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        server: FaultProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.requests.append((self.command, self.path, self.headers.get("Range")))
            fault = server.faults.pop(0) if server.faults else None
        if isinstance(fault, tuple):
            status, code = fault
            err = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        conn = http.client.HTTPConnection(server.upstream, timeout=10)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate":  # promise the whole body, send half, hang up
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    server = FaultProxy(s3_server, [])
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _via(proxy: FaultProxy, bucket: str, tmp_path: Path, **kw) -> S3Store:
    # A fixed region skips the bucket-location lookup, so request counts are exact.
    kw = {"attempts": 5, "backoff": 0.01, **kw}
    return S3Store(proxy.endpoint, bucket, region="us-east-1", cache_dir=tmp_path, **kw)


def test_transient_errors_are_retried(proxy: FaultProxy, s3_bucket: str, tmp_path: Path):
    store = _via(proxy, s3_bucket, tmp_path)
    proxy.faults[:] = [(503, "SlowDown"), (500, "InternalError")]
    assert store.put_bytes("r/x", b"data").size == 4
    assert len(proxy.requests) == 3 and proxy.faults == []
    proxy.faults[:] = [(503, "ServiceUnavailable")]
    assert store.get_bytes("r/x") == b"data"


def test_retries_are_bounded(proxy: FaultProxy, s3_bucket: str, tmp_path: Path) -> None:
    store = _via(proxy, s3_bucket, tmp_path, attempts=3)
    proxy.faults[:] = [(503, "SlowDown")] * 10
    with pytest.raises(StoreError, match="after 3 attempts") as e:
        store.put_bytes("r/x", b"data")
    assert not isinstance(e.value, StoreUnreachable)
    assert len(proxy.requests) == 3


def test_access_denied_is_not_retried(proxy: FaultProxy, s3_bucket: str, tmp_path: Path):
    store = _via(proxy, s3_bucket, tmp_path)
    proxy.faults[:] = [(403, "AccessDenied")] * 5
    with pytest.raises(StoreAccessDenied, match=proxy.endpoint):
        store.get_bytes("r/x")
    assert len(proxy.requests) == 1


def test_broken_download_resumes(proxy: FaultProxy, s3_bucket: str, tmp_path: Path) -> None:
    store = _via(proxy, s3_bucket, tmp_path)
    data = os.urandom(3 * MiB)
    info = store.put_bytes("r/blob", data)
    proxy.requests.clear()
    proxy.faults[:] = ["truncate"]
    out = store.get_file("r/blob", tmp_path / "blob", sha256=info.sha256)
    assert out.read_bytes() == data
    # The second request asked only for the rest: a Range from the last whole chunk written.
    first, second = (r[2] for r in proxy.requests)
    assert first is None and second.startswith("bytes=") and second.endswith("-")
    assert 0 < int(second[len("bytes=") : -1]) <= len(data) // 2


# --- credentials ---------------------------------------------------------------------------


def test_credentials_file_formats(tmp_path: Path) -> None:
    minio_dir = tmp_path / "minio"
    (minio_dir / "..2024_data").mkdir(parents=True)  # what a Secret volume also holds
    (minio_dir / "accesskey").write_text("AK1\n")
    (minio_dir / "secretkey").write_text("SK1\n")
    assert read_credentials_file(minio_dir) == ("AK1", "SK1")
    aws_dir = tmp_path / "aws"
    aws_dir.mkdir()
    (aws_dir / "AWS_ACCESS_KEY_ID").write_text("AK2")
    (aws_dir / "AWS_SECRET_ACCESS_KEY").write_text("SK2")
    assert read_credentials_file(aws_dir) == ("AK2", "SK2")
    env_file = tmp_path / "creds.env"
    env_file.write_text("# s3\nexport TTT_S3_ACCESS_KEY=AK3\nTTT_S3_SECRET_KEY='S=K3'\n")
    assert read_credentials_file(env_file) == ("AK3", "S=K3")
    ini = tmp_path / "credentials"
    ini.write_text("[default]\naws_access_key_id = AK4\naws_secret_access_key = SK4\n")
    assert read_credentials_file(ini) == ("AK4", "SK4")
    bad = tmp_path / "bad.env"
    bad.write_text("accesskey=AK\nnot a pair\n")
    with pytest.raises(StoreError, match=r"bad.env:2: expected KEY=VALUE"):
        read_credentials_file(bad)
    half = tmp_path / "half.env"
    half.write_text("accesskey=AK\n")
    with pytest.raises(StoreError, match="half.env: no secret key"):
        read_credentials_file(half)
    with pytest.raises(StoreError, match="does not exist"):
        read_credentials_file(tmp_path / "nowhere")


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TTT_S3_ACCESS_KEY", "TTT_S3_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-sk")
    creds = S3Credentials()
    assert creds.access_key.get_secret_value() == "aws-ak"
    assert "aws-sk" not in repr(creds)
    monkeypatch.setenv("TTT_S3_ACCESS_KEY", "ttt-ak")
    monkeypatch.setenv("TTT_S3_SECRET_KEY", "ttt-sk")
    creds = S3Credentials()  # ours win over the AWS names
    assert (creds.access_key.get_secret_value(), creds.secret_key.get_secret_value()) == (
        "ttt-ak",
        "ttt-sk",
    )


@pytest.fixture
def s3_auth(s3_server: str, s3_bucket: str) -> Iterator[tuple[str, str, str]]:
    """Switch on moto's authentication: only an IAM user's real key pair gets in.

    moto checks SigV4 signatures against IAM access keys once its no-auth allowance is
    used up (POST /moto-api/reset-auth sets it; 0 = enforce now). The setting is global
    to the moto process, so it is restored afterwards. Yields (bucket, access, secret).
    """
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=f"http://{s3_server}", region_name="us-east-1",
        aws_access_key_id="setup", aws_secret_access_key="setup",
    )  # fmt: skip
    user = f"u-{s3_bucket}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                      "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(value: str) -> None:
        conn = http.client.HTTPConnection(s3_server, timeout=10)
        conn.request("POST", "/moto-api/reset-auth", body=value.encode())
        assert conn.getresponse().status == 200

    set_auth("0")
    try:
        yield s3_bucket, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        set_auth("inf")


def test_wrong_credentials_are_rejected_clearly(
    s3_server: str, s3_auth: tuple[str, str, str], tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    bucket, access, secret = s3_auth
    good = S3Store(s3_server, bucket, access_key=access, secret_key=secret, cache_dir=tmp_path)
    good.put_bytes("auth/x", b"ok")  # the real key pair is accepted ...
    assert good.get_bytes("auth/x") == b"ok"
    for wrong in [(access, "not-the-secret"), ("AKIAUNKNOWN000000000", secret)]:
        store = S3Store(s3_server, bucket, access_key=wrong[0], secret_key=wrong[1], backoff=5)
        start = time.monotonic()
        with pytest.raises(StoreAccessDenied) as e:  # ... a wrong one is not, and fast
            store.get_bytes("auth/x")
        assert time.monotonic() - start < 3  # no retries
        msg = str(e.value)
        assert s3_server in msg and bucket in msg and "rejected the credentials" in msg
        assert wrong[1] not in msg
    assert secret not in caplog.text and "not-the-secret" not in caplog.text


def test_store_takes_keys_from_secret_and_env(
    s3_server: str, s3_auth: tuple[str, str, str], tmp_path: Path, monkeypatch
) -> None:
    bucket, access, secret = s3_auth
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "accesskey").write_text(access)
    (secret_dir / "secretkey").write_text(secret)
    spec = StorageSpec(endpoint=s3_server, bucket=bucket, credentials_file=str(secret_dir))
    open_store(spec).put_bytes("auth/from-secret", b"1")  # the session env keys would fail
    with pytest.raises(StoreAccessDenied):
        open_store(StorageSpec(endpoint=s3_server, bucket=bucket)).get_bytes("auth/from-secret")
    monkeypatch.setenv("TTT_S3_ACCESS_KEY", access)
    monkeypatch.setenv("TTT_S3_SECRET_KEY", secret)
    assert open_store(StorageSpec(endpoint=s3_server, bucket=bucket)).list("auth/") == [
        "auth/from-secret"
    ]


# --- open_store ----------------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    local = open_store(StorageSpec(root=str(tmp_path / "s")))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"
    s3 = open_store(StorageSpec(endpoint="https://minio.example:9000", bucket="runs"))
    assert isinstance(s3, S3Store) and s3.secure and s3.bucket == "runs"
    assert s3.describe() == "s3://runs at https://minio.example:9000"
    assert open_store(endpoint="minio:9000").describe() == "s3://ttt at http://minio:9000"
    with pytest.raises(StoreError, match="storage.bucket"):
        open_store(endpoint="minio:9000", bucket="x")
    with pytest.raises(TypeError, match="unknown storage fields"):
        open_store(endpoint_url="minio:9000")
