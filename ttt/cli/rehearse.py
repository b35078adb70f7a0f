"""`ttt rehearse`: will these values and this spec work on a cluster? Run them as one would, here."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Set in the re-executed process: it already runs in its own network and mount namespaces.
INSIDE = "TTT_REHEARSAL_NODE"


def _isolated(argv: list[str]) -> int:
    """Re-run this command in fresh network and mount namespaces: the rehearsal's node, with
    no route anywhere (no hub, no internet, not the host's own services)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        print("ttt rehearse: needs root, unshare and ip (iproute2): it gives each pod its own "
              "network and mount namespaces", file=sys.stderr)  # fmt: skip
        return 2
    env = {**os.environ, INSIDE: "1"}
    cmd = [shutil.which("unshare") or "/usr/bin/unshare", "--net", "--mount", "--propagation", "private", "--",
           sys.executable, "-m", "ttt", *argv]  # fmt: skip
    with subprocess.Popen(cmd, env=env) as child:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the node's cleanup runs in the child: wait for it
            child.terminate()
            return child.wait()


def _stop_with_the_parent() -> None:
    """Leave through the rehearsal's cleanup (pods stopped, namespaces and mounts removed) on
    SIGTERM, and get SIGTERM when the parent dies (a test's timeout SIGKILLs the parent only)."""
    import ctypes
    import signal

    def _term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took
        raise SystemExit(143)


def _rehearse(args: argparse.Namespace) -> int:
    if os.environ.get(INSIDE) != "1":
        return _isolated(sys.argv[1:])
    _stop_with_the_parent()
    from ttt.rehearse import rehearse

    result = rehearse(
        Path(args.spec), [Path(v) for v in args.values], pipeline=args.pipeline and Path(args.pipeline),
        slice_lines=args.slice, workdir=args.workdir and Path(args.workdir),
        reference=not args.skip_reference, store_service=args.store_service,
        push_models=args.push_models,
    )  # fmt: skip
    for note in result.notes:
        print(f"# {note}")
    if not result.ok:
        for name, text in result.logs.items():
            print(f"\n===== {name} =====\n{text}")
        for failure in result.failures:
            print(f"FAILED: {failure}")
        for diff in result.differences:
            print(f"DIFFERS: {diff}")
        print("ttt rehearse: FAILED")
        return 1
    print(result.table)
    print("\nttt rehearse: passed (the report equals `ttt run`'s, task by task)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rehearse",
        help="run the compiled pipeline and the rendered chart here, as a cluster would",
        description="Render the chart with the values through Helm's engine, run its pods as "
        "processes (each in its own network and mount namespaces, with only what its manifest "
        "gives it), run the compiled pipeline through kfp's local orchestrator with each task "
        "a pod as KFP makes it, the store an S3 server at KFP's in-cluster address, and check "
        "that the report equals `ttt run` of the same spec. Needs root. The one stand-in is "
        "the Kubernetes API (the calls deploy-index makes).",
        epilog="example: ttt rehearse --values charts/ttt/values-cpu.yaml --spec examples/demo.yaml",
    )
    p.add_argument("--spec", required=True, help="TTTRun YAML with local corpus files")
    p.add_argument(
        "--values", action="append", required=True, help="chart values file (repeat: -f order)"
    )
    p.add_argument("--pipeline", help="compiled pipeline (default pipelines/full-cpu.yaml)")
    p.add_argument("--slice", type=int, help="only the first N documents of each corpus file")
    p.add_argument("--workdir", help="where logs, the kfp root and the stores go (kept)")
    p.add_argument("--store-service", default="minio-service.kubeflow:9000",
                   help="where the S3 stand-in serves (KFP's object store Service)")  # fmt: skip
    p.add_argument("--push-models", action="store_true",
                   help="push the spec's models into the store (ttt models push) and run the "
                   "cluster's spec with them by store path, as values-gpu.yaml names its models")  # fmt: skip
    p.add_argument("--skip-reference", action="store_true",
                   help="only the cluster path: do not run `ttt run` to compare with")  # fmt: skip
    p.set_defaults(func=_rehearse)
