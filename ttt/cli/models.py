"""`ttt models push` and `ttt models show`: models into the store (for pods with no egress to a model hub), and what a pushed one is."""

from __future__ import annotations

import argparse
import json
from typing import Any

MINIMAL_SPEC = "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: models}\n"


def _storage(args: argparse.Namespace) -> Any:
    """The store: the spec's `storage` section, else the TTT_STORAGE__* environment (as in
    a pod: TTT_STORAGE__ENDPOINT, TTT_S3_ACCESS_KEY, ...), else the local ttt-store."""
    from ttt.spec import load_spec, loads_spec

    if args.spec:
        return load_spec(args.spec).spec.storage
    return loads_spec(MINIMAL_SPEC, "<environment>").spec.storage


def _push(args: argparse.Namespace) -> int:
    from ttt.assets import resolve_model
    from ttt.models import describe_identity, parse_model_path, push_model
    from ttt.store import open_store

    storage = _storage(args)
    dest = parse_model_path(args.dest, storage.bucket)
    body = push_model(
        resolve_model(args.src),
        open_store(storage),
        dest,
        hub_id=args.hub_id,
        revision=args.revision,
        alias=args.src,
        replace=args.replace,
    )
    print(f"{dest.uri}: {len(body['files'])} file(s), {body['bytes']} bytes")
    print(f"identity: {describe_identity(body)}")
    if not body["identity"].get("hubId"):
        print("  (no hub id: give --hub-id for `ttt validate --paper` to know the model)")
    print(f"use it in a spec: model: {dest.uri}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ttt.models import check_model_manifest, parse_model_path
    from ttt.store import open_store

    storage = _storage(args)
    where = parse_model_path(args.path, storage.bucket)
    body = check_model_manifest(open_store(storage).read_manifest(where.prefix), where.uri)
    print(json.dumps(body, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="put models into the store so that pods load them with no network",
        description="Models reach pods through the run's store: push a Hugging Face model "
        "directory or a GGUF file once (from a machine with hub access), then name it in "
        "the spec as s3://BUCKET/PREFIX (spec.ttt.model, spec.embedding.model).",
        epilog="example: ttt models push smollm2-135m s3://ttt/models/smollm2 --spec examples/demo.yaml",
    )
    cmds = p.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    push = cmds.add_parser(
        "push",
        help="upload a model directory or GGUF file with a manifest (sha256, identity)",
        description="Upload every file of SRC under DEST and write DEST/manifest.json last "
        "(each file's size and sha256, and the model's identity: hub id and revision). A "
        "re-push skips files whose sha256 matches, so an interrupted push resumes.",
        epilog="example: ttt models push gpt2-large s3://ttt/models/gpt2-large --hub-id "
        "gpt2-large --spec run.yaml  (gpt2-large: the directory `huggingface-cli download "
        "gpt2-large --local-dir gpt2-large` wrote)",
    )
    push.add_argument(
        "src", help="a Hugging Face model directory, a .gguf file, or an offline name"
    )
    push.add_argument("dest", help="s3://BUCKET/PREFIX in the run's store (its bucket)")
    push.add_argument(
        "--hub-id",
        help="the hub id the files came from, recorded as the model's identity (default: "
        "unknown, but for the offline packages)",
    )
    push.add_argument(
        "--revision", help="the hub commit it came from (default: huggingface-cli's records)"
    )
    push.add_argument(
        "--replace",
        action="store_true",
        help="overwrite another model already at DEST (runs that named it keep the stages "
        "they finished with the old one: prefer a new path)",
    )
    push.add_argument("--spec", help="a run spec whose storage is the store (default: TTT_ env)")
    push.set_defaults(func=_push)
    show = cmds.add_parser(
        "show",
        help="print a pushed model's manifest",
        epilog="example: ttt models show s3://ttt/models/smollm2 --spec examples/demo.yaml",
    )
    show.add_argument("path", help="s3://BUCKET/PREFIX")
    show.add_argument("--spec", help="a run spec whose storage is the store (default: TTT_ env)")
    show.set_defaults(func=_show)
