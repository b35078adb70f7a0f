"""The `run` part of charts/ttt/values.schema.json, generated from the TTTRun models.

`python tests/chart_schema.py` rewrites it after a change to ttt/spec/; test_chart.py
fails while the committed schema and the models disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttt.spec import json_schema

SCHEMA = Path(__file__).resolve().parents[1] / "charts" / "ttt" / "values.schema.json"


def run_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of `run`, the `$defs` it refers to), for embedding at the values root."""
    schema = json_schema()
    defs = schema.pop("$defs")
    for key in ("$schema", "title"):
        schema.pop(key, None)
    schema["description"] = "The TTTRun specification (ttt.dev/v1alpha1); see `ttt validate`."
    return schema, defs


def with_run_schema(values_schema: dict[str, Any]) -> dict[str, Any]:
    """`values_schema` with its `run` property and `$defs` replaced by the generated ones."""
    run, defs = run_schema()
    out = dict(values_schema)
    out["properties"] = {**values_schema["properties"], "run": run}
    out["$defs"] = defs
    return out


def main() -> None:
    current = json.loads(SCHEMA.read_text(encoding="utf-8"))
    SCHEMA.write_text(json.dumps(with_run_schema(current), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {SCHEMA}")


if __name__ == "__main__":
    main()
