"""What `ttt validate --paper` reads beyond the spec: the training files behind an s3:// glob and the identity in a pushed model's manifest, from the run's store when it can be reached."""

from __future__ import annotations

import fnmatch
import glob
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Evidence:
    """Facts about a run found in its store; what could not be read is a note instead."""

    train_files: int | None = None  # None: not counted (a remote glob, store not reached)
    models: dict[str, dict] = field(default_factory=dict)  # uri -> its model manifest
    bad_models: dict[str, str] = field(default_factory=dict)  # uri -> why it is no model
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why


def _remote_globs(patterns: list[str]) -> list[str]:
    return [p for p in patterns if "://" in p and glob.has_magic(p)]


def count_train_files(patterns: list[str], store: Any = None, bucket: str | None = None) -> int:
    """Listed files count one each, local globs are expanded; an s3:// glob is listed in
    `store` (whose bucket must be the glob's). Raises LookupError when a glob is remote and
    no store is given."""
    count = 0
    for pattern in patterns:
        if not glob.has_magic(pattern):
            count += 1
        elif pattern.startswith("s3://"):
            if store is None:
                raise LookupError(pattern)
            found, _, key = pattern[len("s3://") :].partition("/")
            if bucket is not None and found != bucket:
                raise ValueError(f"{pattern}: bucket {found!r} is not the store's ({bucket!r})")
            cut = min(key.index(c) for c in "*?[" if c in key)
            count += sum(1 for k in store.list(key[:cut]) if fnmatch.fnmatchcase(k, key))
        elif "://" in pattern:
            raise LookupError(pattern)
        else:
            count += len(glob.glob(pattern))
    return count


def open_quick(storage: Any) -> Any:
    """The run's store, failing at once instead of retrying: validate is asked a question,
    it does not wait for an endpoint to come back."""
    from ttt.store import open_store

    store = open_store(storage)
    if hasattr(store, "attempts"):
        store.attempts = 1
    return store


def gather(run: Any, store: Any = None) -> Evidence:
    """Count the training files and read the pushed models' manifests of `run`; `store`
    defaults to the run's own (opened only when something needs it)."""
    from ttt.models import check_model_manifest, is_store_path, parse_model_path
    from ttt.store import StoreAccessDenied, StoreError, StoreUnreachable

    s = run.spec
    facts = Evidence()
    remote = _remote_globs(list(s.corpus.train))
    models = []
    for uri in dict.fromkeys((s.ttt.model, s.embedding.model)):
        if is_store_path(uri):
            try:  # a path outside the run's bucket departs without asking the store
                parse_model_path(uri, s.storage.bucket)
                models.append(uri)
            except ValueError as exc:
                facts.bad_models[uri] = str(exc)
    if not remote and not models:
        facts.train_files = count_train_files(list(s.corpus.train))
        return facts
    why = ""
    try:
        store = store if store is not None else open_quick(s.storage)
    except (StoreError, OSError, ValueError) as exc:
        store, why = None, str(exc)
    where = store.describe() if store is not None else "the run's store"
    try:
        facts.train_files = count_train_files(list(s.corpus.train), store, s.storage.bucket)
    except LookupError:
        facts.notes.append(
            f"spec.corpus.train: {', '.join(remote)} not counted ({where} not reachable"
            f"{': ' + why if why else ''}); the paper indexed the Pile's 30 training files"
        )
    except (StoreError, OSError, ValueError) as exc:
        facts.notes.append(f"spec.corpus.train: {', '.join(remote)} not counted: {exc}")
        if isinstance(exc, (StoreUnreachable, StoreAccessDenied)):
            store, where = None, f"{where}, as above,"  # one failed connection says it
    for uri in models:
        if store is None:
            facts.notes.append(f"model {uri}: its identity not read ({where} not reachable)")
            continue
        try:
            where_model = parse_model_path(uri, s.storage.bucket)
            body = store.read_manifest(where_model.prefix)
            facts.models[uri] = check_model_manifest(body, where_model.uri)
        except (StoreUnreachable, StoreAccessDenied, OSError) as exc:
            facts.notes.append(f"model {uri}: its identity not read: {exc}")
        except (StoreError, ValueError) as exc:  # no model there, a bad manifest or path
            facts.bad_models[uri] = str(exc)
    return facts
