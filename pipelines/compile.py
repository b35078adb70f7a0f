"""Compile the pipelines to the YAML users submit: `python -m pipelines.compile [OUT_DIR]`."""

import sys
from pathlib import Path

from kfp import compiler

from pipelines.full import full
from pipelines.smoke import smoke

PIPELINES = {"full.yaml": full, "smoke.yaml": smoke}


def compile_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = out_dir / name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for path in compile_all(target):
        print(path)
