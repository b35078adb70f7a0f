"""Reading a run spec: YAML text, a file or an s3:// URI, TTT_ environment overrides, errors naming every bad field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ttt.spec.run import TTTRun
from ttt.spec.sections import ENV_PREFIX, Metadata, RunSpec, SpecError, StorageSpec


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> list[str]:
    """Overlay TTT_<SECTION>__<FIELD>=value variables onto the raw spec; returns errors."""
    errors: list[str] = []
    sections = {_normalise(n): n for n in RunSpec.model_fields}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        head = _normalise(parts[0])
        if head == "metadata":
            target, model, path = raw.setdefault("metadata", {}), Metadata, ["metadata"]
        elif head in sections:
            spec = raw.setdefault("spec", {})
            if not isinstance(spec, dict):
                continue
            section = sections[head]
            alias = RunSpec.model_fields[section].alias or section
            target = spec.setdefault(alias, {})
            model = RunSpec.model_fields[section].annotation
            path = ["spec", alias]
        else:
            continue  # other TTT_ variables (credentials, log level) are not spec fields
        if len(parts) < 2 or not isinstance(target, dict):
            errors.append(f"{var}: expected {ENV_PREFIX}<SECTION>__<FIELD>")
            continue
        # a nested section's field: TTT_TRACKING__MLFLOW__TRACKING_URI
        for i, part in enumerate(parts[1:], 1):
            fields = {_normalise(n): (n, f) for n, f in model.model_fields.items()}
            name, info = fields.get(_normalise(part), (None, None))
            if info is None:
                errors.append(f"{var}: {'.'.join(path)} has no field '{part}'")
                break
            key = info.alias or name
            if i == len(parts) - 1:
                target[key] = yaml.safe_load(value) if value != "" else None
                break
            inner = _section_of(info.annotation)
            if inner is None or not isinstance(target.setdefault(key, {}), dict):
                errors.append(f"{var}: {'.'.join([*path, key])} is not a section")
                break
            target, model, path = target[key], inner, [*path, key]
    return errors


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The model class of a nested section field (`MlflowSpec | None` -> MlflowSpec)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} error(s) in the run spec"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(document)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_spec(raw: Any, source: str = "<spec>", environ: dict[str, str] | None = None) -> TTTRun:
    """Validate a parsed YAML document, with TTT_ environment overrides applied first."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a run spec must be a mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # a deep copy that env overrides may change
    env_errors = _apply_env(raw, dict(os.environ if environ is None else environ))
    if env_errors:
        raise SpecError(f"{source}: bad environment overrides\n  " + "\n  ".join(env_errors))
    try:
        return TTTRun.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(source, exc)) from None


def load_spec(path: str | Path, environ: dict[str, str] | None = None) -> TTTRun:
    """Read, override from the environment and validate a run spec YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read run spec: {exc.strerror}") from None
    return loads_spec(text, str(path), environ)


def loads_spec(text: str, source: str = "<spec>", environ: dict[str, str] | None = None) -> TTTRun:
    """Like load_spec, from YAML text (the KFP components pass the spec as a string)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SpecError(f"{source}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(raw, source, environ)


def resolve_spec(value: str, environ: dict[str, str] | None = None) -> TTTRun:
    """A spec given as YAML text, a file path, or an s3:// URI (how pipelines pass it).

    For an s3:// URI the store's endpoint and credentials come from the environment
    (TTT_STORAGE__ENDPOINT, TTT_STORAGE__SECURE, TTT_S3_ACCESS_KEY, ...), as in a pod.
    """
    text = value.strip()
    if "\n" in text or text.startswith(("apiVersion", "{")):
        return loads_spec(text, "<spec parameter>", environ)
    if text.startswith("s3://"):
        from ttt.store import open_store

        bucket, _, key = text[len("s3://") :].partition("/")
        raw: dict[str, Any] = {"metadata": {"name": "spec-fetch"}}
        _apply_env(raw, dict(os.environ if environ is None else environ))
        storage = StorageSpec.model_validate(
            {**raw.get("spec", {}).get("storage", {}), "bucket": bucket}
        )
        if not storage.endpoint:
            raise SpecError(f"{text}: set TTT_STORAGE__ENDPOINT to read a spec from S3")
        data = open_store(storage).get_bytes(key)
        return loads_spec(data.decode("utf-8"), text, environ)
    return load_spec(text, environ)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a TTTRun document (camelCase, as users write it)."""
    schema = TTTRun.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "TTTRun"
    return schema
