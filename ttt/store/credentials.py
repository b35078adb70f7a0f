"""S3 credentials: from the environment or a mounted Kubernetes Secret, never logged."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ttt.store.base import StoreError


class S3Credentials(BaseSettings):
    """S3 keys from the environment: TTT_S3_* first, then the AWS names."""

    model_config = SettingsConfigDict(extra="ignore")

    access_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("TTT_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    )
    secret_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("TTT_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
    )


# Names a mounted Secret may use, compared lower-case without punctuation: MinIO's
# accesskey/secretkey, the AWS variables, ours, and the MinIO chart's rootUser/rootPassword.
_ACCESS_NAMES = ("accesskey", "ttts3accesskey", "awsaccesskeyid", "accesskeyid", "rootuser")
_SECRET_NAMES = ("secretkey", "ttts3secretkey", "awssecretaccesskey", "secretaccesskey",
                 "rootpassword")  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_credentials_file(path: str | Path) -> tuple[str, str]:
    """(access key, secret key) from a mounted Secret: a directory of key files, or one
    file of KEY=VALUE lines (an AWS credentials file's `[section]` lines are skipped)."""
    path = Path(path).expanduser()
    entries: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and not f.name.startswith("."):  # skips Kubernetes' ..data
                entries[_norm(f.name)] = f.read_text().strip()
    elif path.is_file():
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            name, eq, value = line.removeprefix("export ").partition("=")
            if not eq:
                raise StoreError(f"{path}:{lineno}: expected KEY=VALUE")
            entries[_norm(name)] = value.strip().strip("'\"")
    else:
        raise StoreError(f"credentials file {path} does not exist")
    found = []
    for names, what in ((_ACCESS_NAMES, "access key"), (_SECRET_NAMES, "secret key")):
        value = next((entries[n] for n in names if entries.get(n)), None)
        if value is None:
            raise StoreError(f"credentials file {path}: no {what} (looked for {', '.join(names)})")
        found.append(value)
    return found[0], found[1]
