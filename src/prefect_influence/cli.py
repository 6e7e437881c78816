"""The ``prefect-influence`` command line (top layer: may import flows and everything below).

An error a person can fix is printed as one line (``prefect-influence: error: ...``) with exit
status 2 (bad input) or 1 (a failed run); a bug keeps its traceback, and ``--debug`` shows
every one. A run checks everything it can before the Prefect server and the Dask cluster start.

Commands: ``run CONFIG.yaml`` (``--dry-run``), ``plan CONFIG.yaml``, ``demo``,
``status OUTPUT_URL``, ``top-k OUTPUT_URL --test-index I``, ``query OUTPUT_URL --test DATA``,
``serve`` (the deployments from one process), ``setup-automations`` (crash detection and
automatic reruns on a Prefect server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    from .errors import JobRefusedError

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise JobRefusedError(
            f"configuration file {path!r} cannot be read: {exc.strerror}"
        ) from exc
    except yaml.YAMLError as exc:
        raise JobRefusedError(
            f"configuration file {path!r} is not valid YAML or JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise JobRefusedError(
            f"configuration file {path!r}: expected a mapping of configuration fields"
        )
    data.update(overrides or {})
    return PipelineConfig.model_validate(data)


def _run_flow(config) -> dict:
    from .flows import influence_pipeline

    return influence_pipeline(config, progress_bar=True)


def _job_config(args: argparse.Namespace):
    overrides: dict[str, Any] = {}
    if args.overwrite:
        overrides["overwrite"] = True
    if args.force:
        overrides["force"] = True
    if args.output:
        overrides["output"] = args.output
    return load_config(args.config, overrides)


def _survey(config, check_lease: bool):
    """Every check of the job that needs no Prefect and no Dask cluster (see
    :func:`~prefect_influence.pipeline.planning.survey_job`)."""
    from .errors import JobRefusedError
    from .pipeline.planning import planned_workers, survey_job

    n_workers = planned_workers(config)
    try:
        return survey_job(config, n_workers, check_lease=check_lease), n_workers
    except NotImplementedError as exc:  # e.g. a layer the method does not support
        raise JobRefusedError(str(exc)) from exc


def cmd_run(args: argparse.Namespace) -> int:
    config = _job_config(args)
    if args.dry_run:
        return _plan(config, args)
    _survey(config, check_lease=True)  # bad input is refused before Prefect or Dask start
    try:
        result = _run_flow(config)
    except Exception as exc:
        return _report(exc, args, started=True)
    print(json.dumps(result, indent=1))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    return _plan(_job_config(args), args)


def _plan(config, args: argparse.Namespace) -> int:
    import warnings

    from .errors import LeaseHeldError
    from .pipeline.estimate import estimate_job, stored_progress
    from .storage import InfluenceStore, storage_options

    notes: list[str] = []
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        survey, n_workers = _survey(config, check_lease=False)
    notes += [str(w.message) for w in caught]
    try:  # a held lease is reported, not refused: the plan is still worth seeing
        InfluenceStore(config.output, storage_options(config)).lease.check_free(config.force)
    except LeaseHeldError as exc:
        notes.append(f"the run would be refused now: {exc}")
    if survey.action == "replace":
        notes.append("overwrite: the output's stored results are cleared before the run")
    if survey.action == "append":
        old = survey.existing.grid.n_test
        notes.append(
            f"append: {survey.test_rows - old} test rows follow the {old} stored ones; only "
            "their factors and blocks are computed"
        )
    checks_s = time.perf_counter() - started
    progress = stored_progress(survey)
    api_running = bool(os.environ.get("PREFECT_API_URL"))
    estimate = estimate_job(survey, n_workers, api_running, checks_s, progress)
    plan = _plan_json(survey, n_workers, progress, estimate, notes)
    print(json.dumps(plan, indent=1) if args.json else _plan_text(plan))
    return 0


def _plan_json(survey, n_workers: int, progress: dict, estimate, notes: list[str]) -> dict:
    grid, config = survey.grid, survey.config
    return {
        "output": config.output,
        "action": survey.action,
        "method": config.method.name.value,
        "mode": grid.mode,
        "dtype": grid.dtype,
        "n_parameters": grid.n_parameters,
        "n_test": grid.n_test,
        "n_train": grid.n_train,
        "chunks": [grid.test_chunk, grid.train_chunk],
        "grid": list(grid.shape),
        "blocks": grid.n_blocks,
        "workers": n_workers,
        "stored": progress,
        "estimate": estimate.to_json(),
        "warnings": notes,
    }


def _plan_text(plan: dict) -> str:
    stored, est = plan["stored"], plan["estimate"]
    seconds = est["seconds"]
    phases = ", ".join(f"{k} {v:g}" for k, v in seconds.items() if k != "total" and v)
    reused = (
        f"{stored['blocks'][0]} of {stored['blocks'][1]} blocks, "
        f"{stored['factors'][0]} of {stored['factors'][1]} factor chunks, fitted state "
        f"{'yes' if stored['fitted'] else 'no'} (reused if their checksums verify)"
    )
    lines = [
        f"output:    {plan['output']} ({plan['action']})",
        f"job:       {plan['method']}, mode {plan['mode']}, {plan['dtype']}, "
        f"p = {plan['n_parameters']:,}",
        f"grid:      {plan['n_test']:,} test × {plan['n_train']:,} train in chunks of "
        f"{plan['chunks'][0]} × {plan['chunks'][1]}: {plan['grid'][0]} × {plan['grid'][1]} = "
        f"{plan['blocks']} blocks on {plan['workers']} worker(s)",
        f"stored:    {reused}",
        f"memory:    about {est['worker_bytes'] / 2**20:,.0f} MiB per worker (estimate; "
        f"fitted state {est['fitted_state_bytes'] / 2**20:,.1f} MiB)",
        f"time:      about {seconds['total']:g} s (estimate from a probe on this machine: "
        f"{phases})",
    ]
    lines += [f"warning:   {note}" for note in plan["warnings"]]
    return "\n".join(lines)


def _report(exc: BaseException, args: argparse.Namespace, started: bool = False) -> int:
    """Print a person's error in one line (and a hint), or re-raise a bug or under --debug."""
    from .user_errors import explain

    told = explain(exc, started=started)
    if told is None or _debug(args):
        raise exc
    for line in told.lines():
        print(line, file=sys.stderr)
    return told.status


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(
        "PREFECT_INFLUENCE_DEBUG", ""
    ).lower() not in ("", "0", "false", "no")


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
    store = InfluenceStore(args.output, _options(args))
    lease = store.lease.read()
    if lease:
        left = lease.get("expires", 0) - time.time()
        state = f"expires in {left:.0f} s" if left > 0 else "expired: its run is gone"
        print(f"lease:    held by {lease.get('owner')} on {lease.get('host')} ({state})")
    for line in _run_log_lines(store.run_log()[-5:], lease):
        print(line)
    return 0


def _run_log_lines(runs: list[dict], lease: Optional[dict]) -> list[str]:
    """The output's last runs, an attempt a line: automatic reruns, crashes, outcomes."""
    lines = []
    holder = lease.get("owner") if lease and lease.get("expires", 0) > time.time() else None
    for run in runs:
        attempts = run["attempts"]
        for a in attempts:
            what = f"attempt {a.get('attempt')}"
            if a.get("automatic_rerun"):
                what += f" (automatic rerun {a['automatic_rerun']} after a crash)"
            if "outcome" in a:
                end = f"{a['outcome']} at {a.get('ended')}"
                if "blocks" in a:
                    end += f" ({a['blocks'][0]} blocks computed, {a['blocks'][1]} reused)"
            elif a is attempts[-1] and run["flow_run"] == holder:
                end = "running"
            else:
                end = "never finished: crashed"
            lines.append(f"run {run['flow_run']}: {what} started {a.get('started')}, {end}")
    return lines


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


def cmd_query(args: argparse.Namespace) -> int:
    from .pipeline.query import draw_query, query_output

    options = _options(args) if args.storage_options else None
    result = query_output(
        args.output,
        args.test,
        top_k=args.top_k,
        storage_options=options,
        full_rows=bool(args.rows_out),
        use_features=not args.no_features,
        refine=not args.no_refine,
    )
    if args.rows_out:
        import numpy as np

        np.save(args.rows_out, result.rows)
    picture = None
    if args.picture and draw_query(args.output, args.test, result, args.picture, options):
        picture = args.picture
    if args.json:
        print(json.dumps({**result.to_json(), "picture": picture}, indent=1))
        return 0
    how = {"gradients": "gradients computed now", "exact": "stored exact features"}.get(
        result.features, "stored projected features, candidates scored exactly"
    )
    print(
        f"{len(result.arrays['top_helpful'])} query point(s) against {result.n_train:,} training "
        f"points ({how}{'' if result.exact else ', estimates'}) in {result.seconds:.2f} s"
    )
    for q, entry in enumerate(result.to_json()["top"]):
        print(f"query {q}")
        for kind in ("helpful", "harmful"):
            ranked = ", ".join(f"{e['train_index']} ({e['influence']:.4g})" for e in entry[kind])
            print(f"  most {kind}: {ranked}")
    if picture:
        print(f"picture: {picture}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import deployment_env, serve_deployments

    # before Prefect reads its settings: the served runs' heartbeats and rerun limit, as the
    # deployments' job variables give them to a worker's runs
    for key, value in deployment_env(args.prefect_file).items():
        os.environ.setdefault(key, value)
    serve_deployments(args.prefect_file)
    return 0


def cmd_setup_automations(args: argparse.Namespace) -> int:
    from .automations import setup_automations

    if not os.environ.get("PREFECT_API_URL"):
        from .errors import JobRefusedError

        raise JobRefusedError(
            "setup-automations needs the Prefect server the deployments run on: set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)."
        )
    done = setup_automations(timeout_s=args.timeout, enabled=not args.disable)
    for name, what in done.items():
        print(f"{what:<9} {name}")
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
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (as `plan` does) and stop"
    )
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser(
        "plan", help="what a run would do, cost and reuse, without starting Prefect or Dask"
    )
    plan.add_argument("config", help="configuration file (fields of PipelineConfig)")
    plan.add_argument("--output", help="override the output URL")
    plan.add_argument("--overwrite", action="store_true", help="plan replacing an existing output")
    plan.add_argument("--force", action="store_true", help="plan taking over a held lease")
    plan.set_defaults(func=cmd_plan)
    for p in (run, plan):
        p.add_argument("--json", action="store_true", help="the plan as JSON (with --dry-run)")
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
    query = sub.add_parser(
        "query",
        help="most helpful/harmful training points of new test points, from an output's "
        "fitted model (the stored grid is not touched)",
    )
    query.add_argument("output", help="output URL of a run (fitted at least)")
    query.add_argument("--test", required=True, help="the query points: any data location")
    query.add_argument("--top-k", type=int, default=10, help="training points per direction")
    query.add_argument("--json", action="store_true", help="the result as JSON")
    query.add_argument("--rows-out", help="also save every influence (n_query × n_train) as .npy")
    query.add_argument("--picture", help="save a picture (.png) when the samples are images")
    query.add_argument("--no-features", action="store_true", help="ignore stored train features")
    query.add_argument(
        "--no-refine",
        action="store_true",
        help="with projected features, return their estimates without exact scoring",
    )
    query.add_argument("--storage-options", help="fsspec options as JSON")
    query.set_defaults(func=cmd_query)
    setup = sub.add_parser(
        "setup-automations",
        help="create or update the automations that mark runs whose heartbeats stopped as "
        "crashed and schedule crashed runs again (on the server of PREFECT_API_URL)",
    )
    setup.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds without a heartbeat before a run is marked crashed (> 30; default 90)",
    )
    setup.add_argument(
        "--disable", action="store_true", help="keep the automations, but switched off"
    )
    setup.set_defaults(func=cmd_setup_automations)
    serve = sub.add_parser("serve", help="serve the deployments of deployments/prefect.yaml")
    serve.add_argument(
        "--prefect-file",
        default=None,
        help="the prefect.yaml to serve (default: the checkout's deployments/prefect.yaml, "
        "else ./deployments/prefect.yaml)",
    )
    serve.set_defaults(func=cmd_serve)
    for p in sub.choices.values():
        p.add_argument(
            "--debug",
            action="store_true",
            help="show the full traceback of an error (or set PREFECT_INFLUENCE_DEBUG=1)",
        )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_defaults()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        return _report(exc, args)


if __name__ == "__main__":
    sys.exit(main())
