"""The rehearsal's models by store path: the spec's models pushed into the S3 stand-in as `ttt models push` does, the pods fetching them with no egress."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ttt.errors import TTTError

# The spec's model fields, as (section, field): the encoder and the language model.
MODEL_FIELDS = (("embedding", "model"), ("ttt", "model"))


class ModelPushError(TTTError, ValueError):
    """A spec model the rehearsal cannot push: not a local file, directory or offline name."""


def plan_pushes(spec: dict[str, Any], bucket: str, where: str) -> dict[str, tuple[str, str]]:
    """Rewrite `spec`'s model fields that are not store paths to s3://BUCKET/rehearse/models/
    NAME (in place), as a user does after `ttt models push`; returns {field: (source, uri)}.

    A model already named by store path is left alone (the rehearsal has no copy of it to
    push); a hub id cannot be pushed either: pods have no egress, and neither has this node.
    """
    from ttt.assets import resolve_model
    from ttt.models import is_store_path

    pushes = {}
    for section, key in MODEL_FIELDS:
        name = spec["spec"].get(section, {}).get(key)
        if not name or is_store_path(name):
            continue
        source = resolve_model(name)
        if not Path(source).exists():
            raise ModelPushError(
                f"{where}: spec.{section}.{key}: {name!r} is neither an offline model name nor "
                "a local file or directory, so the rehearsal cannot push it into the store"
            )
        slug = re.sub(r"[^a-z0-9._-]+", "-", Path(name.rstrip("/")).name.lower()).strip("-.")
        uri = f"s3://{bucket}/rehearse/models/{slug or section}"
        spec["spec"][section][key] = uri
        pushes[f"spec.{section}.{key}"] = (name, uri)
    return pushes


def push_all(pushes: dict[str, tuple[str, str]], store: Any) -> list[str]:
    """`ttt models push` of each planned model into `store`; a line per model."""
    from ttt.assets import resolve_model
    from ttt.models import parse_model_path, push_model

    lines = []
    for field, (name, uri) in pushes.items():
        body = push_model(resolve_model(name), store, parse_model_path(uri), alias=name)
        lines.append(f"{field}: {name} pushed to {uri} ({len(body['files'])} file(s), "
                     f"{body['bytes']} bytes)")  # fmt: skip
    return lines
