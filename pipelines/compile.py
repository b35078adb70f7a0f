"""Compile the pipelines to the YAML users submit:
`python -m pipelines.compile [--registry REGISTRY] [--tag TAG] [--digests FILE]
[--pull-secret NAME]... [OUT_DIR]`."""

import argparse
import os
from pathlib import Path

NAMES = ("full.yaml", "full-cpu.yaml", "smoke.yaml")


def pipelines() -> dict:
    # Imported here: the components read the image registry and tag when they are imported.
    from pipelines.full import full, full_cpu
    from pipelines.smoke import smoke

    return dict(zip(NAMES, (full, full_cpu, smoke), strict=True))


def compile_all(out_dir: Path) -> list[Path]:
    from kfp import compiler

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in pipelines().items():
        path = out_dir / name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).parent)
    parser.add_argument("--registry", help="image registry, e.g. ghcr.io/me (default: none)")
    parser.add_argument("--tag", help="image tag (default: the package version)")
    parser.add_argument(
        "--digests", type=Path, help='JSON {"cpu": "sha256:...", ...}: pin these images by digest'
    )
    parser.add_argument(
        "--pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="an image pull Secret (in the KFP namespace) every pod gets; repeatable",
    )
    args = parser.parse_args(argv)
    if args.registry is not None:
        os.environ["TTT_IMAGE_REGISTRY"] = args.registry
    if args.tag is not None:
        os.environ["TTT_IMAGE_TAG"] = args.tag
    if args.digests is not None:
        os.environ["TTT_IMAGE_DIGESTS"] = args.digests.read_text(encoding="utf-8")
    if args.pull_secret:
        bad = [n for n in args.pull_secret if not n or "," in n]
        if bad:
            parser.error(f"--pull-secret: not a Secret name: {bad}")
        os.environ["TTT_IMAGE_PULL_SECRETS"] = ",".join(args.pull_secret)
    for path in compile_all(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
