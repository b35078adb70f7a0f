"""What the rehearsal sets up around the chart: the object store, the Secrets as the docs make them."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ttt.errors import TTTError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"
READ_ONLY = ["s3:Get*", "s3:List*", "s3:HeadBucket"]  # read and list, never write


class StandInError(TTTError, RuntimeError):
    """The docs or the store stand-in are not as the rehearsal needs them."""


@dataclass
class Keys:
    """The store's key pairs (read-write and read-only) and the index auth token."""

    access: str
    secret: str
    ro_access: str
    ro_secret: str
    token: str


class ObjectStore:
    """An S3 server (moto) at KFP's object store address, answering only to real key pairs:
    the docs' read-write pair, and a read-only pair allowed to read and list only."""

    def __init__(self, address: str, port: int, buckets: list[str]) -> None:
        # Path-style only, as MinIO: moto would read "minio-service" in the Host header
        # minio-service.kubeflow:9000 as a virtual-hosted bucket name.
        os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"
        import boto3
        import moto.s3.utils
        from moto.server import ThreadedMotoServer

        moto.s3.utils.S3_IGNORE_SUBDOMAIN_BUCKETNAME = "true"

        self.server = ThreadedMotoServer(ip_address=address, port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://{address}:{port}"
        setup = {"endpoint_url": self.endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}  # fmt: skip # nosec B105
        iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
        pairs = []
        for user, actions in (("ttt-store", ["s3:*"]), ("ttt-store-readonly", READ_ONLY)):
            iam.create_user(UserName=user)
            policy = {"Version": "2012-10-17",
                      "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}  # fmt: skip
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            pairs += [key["AccessKeyId"], key["SecretAccessKey"]]
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        self.keys = Keys(*pairs, token=secrets.token_hex(32))
        conn = http.client.HTTPConnection(address, port, timeout=10)
        conn.request("POST", "/moto-api/reset-auth", body=b"0")  # from now on: keys only
        if conn.getresponse().status != 200:
            raise StandInError("the S3 stand-in did not switch authentication on")

    def client(self, read_only: bool = False):
        import boto3

        k = self.keys
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=k.ro_access if read_only else k.access,
            aws_secret_access_key=k.ro_secret if read_only else k.secret,
        )  # fmt: skip

    def close(self) -> None:
        self.server.stop()


def documented_secrets(keys: Keys, docs: Path = DOCS) -> dict[tuple[str, str], dict[str, bytes]]:
    """The Secrets as docs/getting-started.md tells a user to create them (every
    `kubectl create secret generic` line, in the namespaces of its `for ns in ...` loop),
    filled with the rehearsal's keys: {(namespace, name): {key: value}}."""
    files = {"accesskey": keys.access, "secretkey": keys.secret,
             "ro-accesskey": keys.ro_access, "ro-secretkey": keys.ro_secret}  # fmt: skip
    variables = {"token": keys.token}
    out: dict[tuple[str, str], dict[str, bytes]] = {}
    loop: list[str] = []
    for n, line in enumerate(docs.read_text().splitlines(), 1):
        m = re.match(r"\s*for ns in ([\w\s-]+); do", line)
        if m:
            loop = m[1].split()
            continue
        if re.match(r"\s*done\b", line):
            loop = []
            continue
        m = re.search(r"kubectl -n (\S+) create secret generic (\S+)(.*)", line)
        if not m:
            continue
        ns = m[1].strip('"')
        namespaces = loop if ns == "$ns" else [ns]
        data: dict[str, bytes] = {}
        for kind, key, value in re.findall(r"--from-(file|literal)=([\w.-]+)=(\S+)", m[3]):
            value = value.strip('"')
            if kind == "file":
                name = Path(value).name
                if name not in files:
                    raise StandInError(f"{docs}:{n}: secret {m[2]} reads {value}, a file the "
                                       f"rehearsal does not fill ({', '.join(files)})")  # fmt: skip
                data[key] = files[name].encode()
            else:
                var = re.fullmatch(r"\$\{?(\w+)\}?", value)
                data[key] = (variables[var[1]] if var and var[1] in variables else value).encode()
        for namespace in namespaces:
            out[(namespace, m[2])] = data
    if not out:
        raise StandInError(f"{docs}: no `kubectl create secret generic` line to follow")
    return out
