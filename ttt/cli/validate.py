"""`ttt validate` and `ttt schema`: check a run spec, print the JSON Schema."""

from __future__ import annotations

import argparse
import json
import sys

from ttt.spec import json_schema, load_spec


def _validate(args: argparse.Namespace) -> int:
    run = load_spec(args.file)  # a SpecError lists every bad field: `ttt` prints it, exit 1
    from ttt.engine.explain import explain_spec, spec_line

    # which engine and path the spec trains on, and why (device auto: on a GPU and a CPU)
    plans = explain_spec(run.spec.ttt)
    line = spec_line(plans)
    if args.paper:
        from ttt.spec.evidence import gather
        from ttt.spec.parity import departures, exit_status, format_departures

        facts = gather(run)  # the store's answers, asked once: training files, models
        if args.json:
            from ttt.spec.parity import departures_json

            found = departures_json(run, args.file, facts)
            engine = {"line": line, "devices": [p.as_json() for p in plans]}
            print(json.dumps({**found, "engine": engine}, indent=2, default=str))
            return int(found["exit"])
        print(format_departures(run, args.file, facts), end="")
        print(f"# {line}")
        return exit_status(departures(run, facts), facts.notes)
    if args.json:
        # stdout stays a spec that `ttt run` reads back: the engine's line goes to stderr
        print(json.dumps(run.model_dump(mode="json", by_alias=True), indent=2))
        print(line, file=sys.stderr)
    else:
        print(f"# {line}")  # a YAML comment: the output stays a spec
        print(run.to_yaml(), end="")
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="validate a run spec and print it resolved (defaults and TTT_ overrides applied)",
        epilog="example: TTT_TTT__LEARNING_RATE=1e-5 ttt validate examples/demo.yaml",
    )
    p.add_argument("file", help="TTTRun YAML file")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.add_argument(
        "--paper",
        action="store_true",
        help="list every setting that departs from the paper's reference code, with the value "
        "that restores parity (--json: for machines). Reads the run's store for what the "
        "spec alone cannot settle: the training files behind an s3:// glob, the identity in "
        "a pushed model's manifest. Exit status: 0 at parity; 1 a setting departs; 3 nothing "
        "departs but something could not be checked (the store not reachable: a '# not "
        "checked:' line says what)",
    )
    p.set_defaults(func=_validate)
    s = sub.add_parser(
        "schema",
        help="print the JSON Schema of a TTTRun document",
        epilog="example: ttt schema > ttt-run.schema.json",
    )
    s.set_defaults(func=_schema)
