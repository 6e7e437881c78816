"""The influence pipeline flow: plan → fit → factors per test chunk → one column of blocks per
train chunk (on a DaskTaskRunner) → summary; resumable from its own storage.

Run it again with the same configuration and output after any interruption: every chunk whose
completion record validates is reused, everything else is computed, and the result is
bit-identical to an uninterrupted run.

Deployments load this file by path (``flows/influence_pipeline.py:influence_pipeline``), so its
imports are absolute: a relative one would not resolve there, nor on the Dask workers.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from prefect import flow
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from prefect_influence.config import PipelineConfig
from prefect_influence.flows.cluster import (
    LocalClusterStart,
    make_task_runner,
    planned_workers,
    workers_share_api,
)
from prefect_influence.flows.reports import Progress, publish, run_result
from prefect_influence.flows.reruns import announce_rerun, automatic_reruns, max_reruns
from prefect_influence.pipeline import plan_job
from prefect_influence.storage import InfluenceStore, storage_options
from prefect_influence.tasks import (
    compute_factors,
    fit_model,
    influences_from_factors,
    write_summary,
)
from prefect_influence.user_errors import explain

__all__ = ["influence_pipeline", "compute_grid"]


@flow(name="influence-grid", log_prints=False)
def compute_grid(config: PipelineConfig, progress_bar: bool = False) -> dict[str, int]:
    """Factors, then blocks and self-influences, as Dask-parallel tasks with live progress
    (``progress_bar``: also drawn on the terminal that runs the flow)."""
    logger = get_run_logger()
    grid = InfluenceStore(config.output, storage_options(config)).planned_manifest().grid
    n_rows, n_cols = grid.shape
    progress = Progress(
        n_rows + n_cols,
        f"{n_rows} factor chunks, {n_cols} columns of {n_rows} blocks",
        progress_bar,
    )
    factors = [compute_factors.submit(config, i) for i in range(n_rows)]
    # every column reads all factor chunks: submitted now, Dask starts them when the factors
    # are done (no round trip through this process between the two phases)
    columns = [influences_from_factors.submit(config, j, wait_for=factors) for j in range(n_cols)]
    factors_reused = 0
    for future in as_completed(factors):  # a failed solve fails the flow with its own error
        factors_reused += bool(future.result())
        progress.advance()
    counts = {"computed": 0, "reused": 0}
    for future in as_completed(columns):
        result = future.result()
        counts["computed"] += result["computed"]
        counts["reused"] += result["reused"]
        progress.advance()
    logger.info(
        "factors: %d of %d chunks reused; blocks: %d computed, %d reused",
        factors_reused,
        n_rows,
        counts["computed"],
        counts["reused"],
    )
    return {
        "factors_computed": n_rows - factors_reused,
        "factors_reused": factors_reused,
        "blocks_computed": counts["computed"],
        "blocks_reused": counts["reused"],
    }


@flow(name="influence-pipeline", log_prints=False)
def influence_pipeline(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 (the run form's defaults)
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Compute influence factors and every test × train influence for ``config``, storing them
    as zarr under ``config.output``. Rerunning with the same configuration resumes.
    ``progress_bar`` draws the grid's progress on the terminal that runs the flow."""
    logger = get_run_logger()
    logger.info("configuration: %s", json.dumps(config.redacted()))
    attempt = _Attempt(config)
    try:
        reruns = automatic_reruns()
        if reruns:
            announce_rerun(reruns, max_reruns(), logger)  # raises beyond the limit
        store = InfluenceStore(config.output, storage_options(config))
        with store.lease.hold(force=config.force, owner=_flow_run_id()):
            result = _run(config, progress_bar, logger, attempt.started(store, reruns))
    except Exception as exc:
        told = explain(exc, started=True)  # the run's log says what the command line says
        for line in told.lines() if told else ():
            logger.error(line)
        attempt.ended(f"failed: {told.lines()[0] if told else type(exc).__name__}")
        raise
    attempt.ended("completed", result)
    logger.info("done: %s", json.dumps(result))
    return result


class _Attempt:
    """This attempt of the flow run in the output's run log (``prefect-influence status``):
    when it started, whether it is an automatic rerun, how it ended. A crashed attempt keeps
    "started" alone."""

    def __init__(self, config: PipelineConfig):
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        self.run_id = _flow_run_id() or "local"
        self.number = int(ctx.flow_run.run_count or 1) if ctx and ctx.flow_run else 1
        self.store: Optional[InfluenceStore] = None

    def started(self, store: InfluenceStore, reruns: int):
        """A callback for after planning (the output is this job's by then)."""

        def log() -> None:
            self.store = store
            store.log_attempt(
                self.run_id, {"attempt": self.number, "started": _now(), "automatic_rerun": reruns}
            )

        return log

    def ended(self, outcome: str, result: Optional[dict] = None) -> None:
        if self.store is None:
            return
        entry = {"attempt": self.number, "ended": _now(), "outcome": outcome}
        if result:
            entry["blocks"] = [result["blocks_computed"], result["blocks_reused"]]
        try:
            self.store.log_attempt(self.run_id, entry)
        except Exception:  # the log is a report: it never fails a run
            pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _flow_run_id() -> Optional[str]:
    """The flow run's id: a retry of the same run may take back the lease it left behind."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _run(
    config: PipelineConfig, progress_bar: bool, logger, planned_callback=None
) -> dict[str, Any]:
    start = time.perf_counter()
    with workers_share_api():
        starting = LocalClusterStart(config)  # overlaps planning and the fit
        try:
            planned = plan_job(config, n_workers=planned_workers(config))
            _log_plan(logger, config, planned)
            if planned_callback is not None:
                planned_callback()
            fit_reused = fit_model(config)
            t_fit = time.perf_counter()
            runner = make_task_runner(config, starting.cluster())
            counts = compute_grid.with_options(task_runner=runner)(config, progress_bar)
        except BaseException:
            starting.close()
            raise
    t_grid = time.perf_counter()
    # the workers stop while the summary is written and after the flow returns: every result
    # is stored by now, and the closing thread keeps the process alive until they are gone
    starting.close_in_background()
    info = write_summary(config) if config.summary else {"summary": False}
    end = time.perf_counter()
    result = run_result(config, planned.grid, fit_reused, counts, start, t_fit, t_grid, end)
    publish(config, planned.grid, result, info)
    return result


def _log_plan(logger, config: PipelineConfig, planned) -> None:
    grid = planned.grid
    logger.info(
        "grid %d × %d blocks (test chunk %d, train chunk %d, p = %d) at %s%s",
        *grid.shape,
        grid.test_chunk,
        grid.train_chunk,
        grid.n_parameters,
        config.output,
        {"resume": " (resuming)", "append": " (test rows appended: computing those)"}.get(
            planned.action, ""
        ),
    )
