"""The ``prefect-influence`` command line (top layer: may import flows and everything below).

Commands: ``run CONFIG.yaml``, ``demo``, ``status OUTPUT_URL``, ``top-k OUTPUT_URL --test-index I``,
``serve`` (both deployments from one process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

__all__ = ["main", "load_config"]


def _quiet_defaults() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary local server can take a while to boot on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def load_config(path: str, overrides: Optional[dict[str, Any]] = None):
    """A :class:`PipelineConfig` from a YAML or JSON file, with optional top-level overrides."""
    import yaml

    from .config import PipelineConfig

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of configuration fields")
    data.update(overrides or {})
    return PipelineConfig.model_validate(data)


def _run_flow(config) -> dict:
    from .flows import influence_pipeline

    return influence_pipeline(config, progress_bar=True)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {"overwrite": True} if args.overwrite else {}
    if args.force:
        overrides["force"] = True
    if args.output:
        overrides["output"] = args.output
    result = _run_flow(load_config(args.config, overrides))
    print(json.dumps(result, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output=args.output, run_flow=_run_flow)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .storage import InfluenceStore

    status = InfluenceStore(args.output, _options(args)).status(verify=not args.fast)
    if status.get("manifest") is None:
        print(
            f"{args.output}: no prefect-influence output here"
            + (" (the location is not empty)" if status.get("exists") else "")
        )
        return 1
    manifest = status["manifest"]
    grid, method = manifest.grid, manifest.config.get("method", {})
    print(f"output:   {args.output}")
    print(f"created:  {manifest.created} by prefect-influence {manifest.package_version}")
    print(
        f"method:   {method.get('name')} (regularization {method.get('regularization')}), "
        f"mode {grid.mode}, {grid.dtype}"
    )
    print(
        f"grid:     {grid.n_test} test × {grid.n_train} train, chunks "
        f"{grid.test_chunk} × {grid.train_chunk}, p = {grid.n_parameters}"
    )
    print(f"fitted:   {'yes' if status['fitted'] else 'no'}")
    for name in ("factors", "influences", "self_influence"):
        entry = status[name]
        done = entry.get("done", entry["recorded"])
        line = f"{name + ':':<16}{done}/{entry['total']} chunks done"
        if entry.get("corrupt"):
            line += (
                f", {len(entry['corrupt'])} corrupt (will be recomputed): {entry['corrupt'][:10]}"
            )
        print(line)
    print(f"summary:  {'yes' if status['summary'] else 'no'}")
    return 0


def cmd_top_k(args: argparse.Namespace) -> int:
    from .storage import InfluenceStore

    summary = InfluenceStore(args.output, _options(args)).read_summary()
    if summary is None or "top_helpful" not in summary[0]:
        print(f"{args.output}: no top-k summary (run the job to completion, in Up mode)")
        return 1
    arrays = summary[0]
    i = args.test_index
    n = arrays["top_helpful"].shape[0]
    if not 0 <= i < n:
        print(f"--test-index must be in [0, {n}), got {i}")
        return 2
    print(f"test point {i}")
    for kind in ("helpful", "harmful"):
        print(f"most {kind}:")
        for idx, val in zip(arrays[f"top_{kind}"][i], arrays[f"top_{kind}_values"][i]):
            print(f"  train {int(idx):>8}  influence {float(val): .6g}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import serve_deployments

    serve_deployments(args.prefect_file)
    return 0


def _options(args: argparse.Namespace) -> dict:
    return json.loads(args.storage_options) if args.storage_options else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-influence",
        description="Influence functions for PyTorch models, resumable on Prefect and Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline for a YAML/JSON configuration")
    run.add_argument("config", help="configuration file (fields of PipelineConfig)")
    run.add_argument("--output", help="override the output URL")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument(
        "--force",
        action="store_true",
        help="take the output over from another run holding its lease (known dead)",
    )
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run the built-in digits example end to end")
    demo.add_argument("--output", default="influence-output/demo", help="output directory or URL")
    demo.set_defaults(func=cmd_demo)
    for name, func, helptext in (
        ("status", cmd_status, "completion of an output"),
        ("top-k", cmd_top_k, "most helpful/harmful training points"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("output", help="output URL of a run")
        p.add_argument("--storage-options", help="fsspec options as JSON")
        if name == "status":
            p.add_argument(
                "--fast", action="store_true", help="count records without checksumming chunks"
            )
        else:
            p.add_argument("--test-index", type=int, required=True)
        p.set_defaults(func=func)
    serve = sub.add_parser(
        "serve", help="serve the influence-adhoc and influence-nightly deployments"
    )
    serve.add_argument(
        "--prefect-file",
        default=None,
        help="the prefect.yaml to serve (default: the checkout's deployments/prefect.yaml, "
        "else ./deployments/prefect.yaml)",
    )
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_defaults()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
