"""The influence pipeline flow: plan → fit → factors per test chunk → one column of blocks per
train chunk (on a DaskTaskRunner) → summary; resumable from its own storage.

Run it again with the same configuration and output after any interruption: every chunk whose
completion record validates is reused, everything else is computed, and the result is
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional

import dask
from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect_dask import DaskTaskRunner

from prefect_influence import TORCH_WORKER_DASK_CONFIG, stages
from prefect_influence.config import PipelineConfig
from prefect_influence.sources import ConfigurationError
from prefect_influence.storage import InfluenceStore
from prefect_influence.tasks import (
    compute_factors,
    fit_model,
    influences_from_factors,
    write_summary,
)
from prefect_influence.tasks.influence_tasks import with_secret_storage_options

__all__ = ["influence_pipeline", "compute_grid", "make_task_runner"]

#: set by the CLI to draw a progress bar on the terminal
PROGRESS_ENV = "PREFECT_INFLUENCE_PROGRESS"


def n_local_workers(config: PipelineConfig) -> int:
    return config.n_workers or os.cpu_count() or 1


#: seconds to reach an external scheduler (``dask_address``) when planning
SCHEDULER_CONNECT_S = 30


def planned_workers(config: PipelineConfig) -> int:
    """Workers the grid's auto chunks are planned for: the local cluster's, or on an external
    scheduler (``dask_address``) ``n_workers`` if given, else its workers at planning time."""
    if not config.dask_address:
        return n_local_workers(config)
    if config.n_workers:
        return config.n_workers
    from distributed import Client

    try:
        with Client(config.dask_address, timeout=SCHEDULER_CONNECT_S) as client:
            return max(1, len(client.nthreads()))
    except OSError as exc:  # before anything is written to the output
        raise ConfigurationError(
            f"dask_address {config.dask_address!r} cannot be reached: {exc}"
        ) from exc


def local_cluster_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """The local cluster: single-threaded worker processes (influence models are not
    thread-safe), one per core unless ``n_workers``, with torch and the tasks imported at start."""
    return {
        "n_workers": n_local_workers(config),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.WARNING,
        # imported while the workers start (during the fit), not by their first task
        "preload": ["prefect_influence.tasks"],
    }


def torch_local_cluster(**kwargs: Any):
    """A ``distributed.LocalCluster`` whose workers get glibc's default allocator
    (``TORCH_WORKER_DASK_CONFIG``: distributed's trim setting slows torch many-fold)."""
    from distributed import LocalCluster

    with dask.config.set(TORCH_WORKER_DASK_CONFIG):
        return LocalCluster(**kwargs)


def make_task_runner(config: PipelineConfig, cluster=None) -> DaskTaskRunner:
    """A runner on an existing Dask scheduler (``dask_address``), on ``cluster`` (started by
    :class:`LocalClusterStart`), or on a local cluster it starts itself."""
    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    if cluster is not None:  # by address: the flow engine duplicates its runner (settings only)
        return DaskTaskRunner(address=cluster.scheduler_address)
    return DaskTaskRunner(
        cluster_class=torch_local_cluster, cluster_kwargs=local_cluster_kwargs(config)
    )


#: threads still stopping the local clusters of earlier flows in this process
_closing: list[threading.Thread] = []


def wait_for_closing_clusters() -> None:
    """Wait until the local clusters of earlier flows in this process have stopped. A flow
    calls it before starting its own, so flows run back to back never hold two sets of workers
    (memory) or two schedulers (ports) at once."""
    for thread in list(_closing):
        thread.join()
        with contextlib.suppress(ValueError):
            _closing.remove(thread)


class LocalClusterStart:
    """Starts the local Dask cluster in a background thread, so that spawning the workers and
    their imports (seconds) overlap the fit; ``cluster()`` waits for it. Nothing is started
    for an external cluster (``dask_address``); ``close()`` stops what was started."""

    def __init__(self, config: PipelineConfig):
        self._cluster = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if not config.dask_address:
            wait_for_closing_clusters()
            self._thread = threading.Thread(
                target=self._start,
                args=(local_cluster_kwargs(config),),
                daemon=True,
                name="prefect-influence-cluster-start",
            )
            self._thread.start()

    def _start(self, kwargs: dict[str, Any]) -> None:
        try:
            self._cluster = torch_local_cluster(**kwargs)
        except BaseException as exc:  # raised to the flow by cluster()
            self._error = exc

    def cluster(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._cluster

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def close_in_background(self) -> threading.Thread:
        """``close()`` in a background thread: stopping the workers (1.5–1.8 s measured) then
        overlaps the work that follows, and the flow need not wait for it. The thread is not
        a daemon: a process that ends right after the flow still closes the cluster first."""

        def close() -> None:
            try:
                self.close()
            except Exception:  # the run's results are written; a slow shutdown is not fatal
                logging.getLogger("prefect_influence").exception("closing the local cluster failed")

        thread = threading.Thread(
            target=close, daemon=False, name="prefect-influence-cluster-close"
        )
        _closing.append(thread)
        thread.start()
        return thread


@contextlib.contextmanager
def workers_share_api() -> Iterator[None]:
    """Point local Dask worker processes at this flow's Prefect API while the block is open.

    Without ``PREFECT_API_URL`` in the environment the flow talks to a temporary local server
    (or a test harness's); worker processes would each start their own (slow, and their task
    runs would land elsewhere). Exporting the URL before the cluster starts makes the workers
    inherit it; the variable is restored afterwards.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _progress_bar(done: int, total: int) -> None:
    if os.environ.get(PROGRESS_ENV):
        width = 40
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@flow(name="influence-grid", log_prints=False)
def compute_grid(config: PipelineConfig) -> dict[str, int]:
    """Factors, then blocks and self-influences, as Dask-parallel tasks with live progress."""
    logger = get_run_logger()
    resolved = with_secret_storage_options(config)
    grid = InfluenceStore(resolved.output, resolved.storage_options).grid()
    n_rows, n_cols = grid.shape
    total = n_rows + n_cols
    artifact = create_progress_artifact(
        0.0, description=f"{n_rows} factor chunks, {n_cols} columns of {n_rows} blocks"
    )
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        update_progress_artifact(artifact, 100.0 * done / total)
        _progress_bar(done, total)

    factors = [compute_factors.submit(config, i) for i in range(n_rows)]
    # every column reads all factor chunks: submitted now, Dask starts them when the factors
    # are done (no round trip through this process between the two phases)
    columns = [influences_from_factors.submit(config, j, wait_for=factors) for j in range(n_cols)]
    factors_reused = 0
    for future in as_completed(factors):  # a failed solve fails the flow with its own error
        factors_reused += bool(future.result())
        advance()
    counts = {"computed": 0, "reused": 0}
    for future in as_completed(columns):
        result = future.result()
        counts["computed"] += result["computed"]
        counts["reused"] += result["reused"]
        advance()
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
) -> dict[str, Any]:
    """Compute influence factors and every test × train influence for ``config``, storing them
    as zarr under ``config.output``. Rerunning with the same configuration resumes."""
    logger = get_run_logger()
    logger.info("configuration: %s", json.dumps(config.redacted()))
    resolved = with_secret_storage_options(config)
    store = InfluenceStore(resolved.output, resolved.storage_options)
    with store.hold_lease(force=config.force, owner=_flow_run_id()):
        result, info = _run(config, resolved, logger)
    logger.info("done: %s", json.dumps(result))
    return result


def _flow_run_id() -> Optional[str]:
    """The flow run's id: a retry of the same run may take back the lease it left behind."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _run(
    config: PipelineConfig, resolved: PipelineConfig, logger
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` travels to the tasks (no secrets); ``resolved`` has the secret's storage
    options for the flow process's own storage access."""
    start = time.perf_counter()
    plan = stages.plan_job(resolved, n_workers=planned_workers(config), recorded=config)
    grid = plan.grid
    logger.info(
        "grid %d × %d blocks (test chunk %d, train chunk %d, p = %d) at %s%s",
        *grid.shape,
        grid.test_chunk,
        grid.train_chunk,
        grid.n_parameters,
        config.output,
        " (resuming)" if plan.reused_output else "",
    )
    with workers_share_api():
        starting = LocalClusterStart(config)  # overlaps the fit
        try:
            fit_reused = fit_model(config)
            t_fit = time.perf_counter()
            runner = make_task_runner(config, starting.cluster())
            counts = compute_grid.with_options(task_runner=runner)(config)
        except BaseException:
            starting.close()
            raise
    t_grid = time.perf_counter()
    # the workers stop while the summary is written and after the flow returns: every result
    # is stored by now, and the closing thread keeps the process alive until they are gone
    starting.close_in_background()
    info = write_summary(config) if config.summary else {"summary": False}
    end = time.perf_counter()
    result = _result(config, grid, fit_reused, counts, start, t_fit, t_grid, end)
    _publish(config, resolved, grid, result, info)
    return result, info


def _result(
    config: PipelineConfig,
    grid,
    fit_reused: bool,
    counts: dict[str, int],
    start: float,
    t_fit: float,
    t_grid: float,
    end: float,
) -> dict[str, Any]:
    return {
        "output": config.output,
        "grid": list(grid.shape),
        "n_test": grid.n_test,
        "n_train": grid.n_train,
        "fit_reused": fit_reused,
        **counts,
        "seconds": {
            "fit": round(t_fit - start, 3),
            "grid": round(t_grid - t_fit, 3),
            "summary": round(end - t_grid, 3),
            "total": round(end - start, 3),
        },
    }


def _publish(
    config: PipelineConfig,
    resolved: PipelineConfig,
    grid,
    result: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """Artifacts show ``config`` (redacted; no secret block values); ``resolved`` reads storage."""
    store = InfluenceStore(resolved.output, resolved.storage_options)
    summary = store.read_summary()
    if config.summary and summary is not None and "top_helpful" in summary[0]:
        arrays = summary[0]
        rows = [
            {
                "test_index": i,
                "most_helpful": ", ".join(map(str, arrays["top_helpful"][i].tolist())),
                "most_harmful": ", ".join(map(str, arrays["top_harmful"][i].tolist())),
            }
            for i in range(min(10, grid.n_test))
        ]
        create_table_artifact(
            rows,
            key="influence-top-k",
            description=f"Top {info['top_k']} training indices of the first test points",
        )
    cfg = json.dumps(config.redacted(), indent=1)
    seconds = result["seconds"]
    create_markdown_artifact(
        key="influence-summary",
        markdown=(
            f"# Influence run\n\n"
            f"* output: `{config.output}` (arrays `factors`, `influences`, `self_influence`, `summary/*`)\n"
            f"* grid: {grid.shape[0]} × {grid.shape[1]} blocks of {grid.test_chunk} × {grid.train_chunk} "
            f"({grid.n_test} test × {grid.n_train} train, p = {grid.n_parameters}, mode {grid.mode})\n"
            f"* fitted state: {'reused' if result['fit_reused'] else 'computed'}\n"
            f"* factor chunks: {result['factors_computed']} computed, {result['factors_reused']} reused\n"
            f"* blocks: {result['blocks_computed']} computed, {result['blocks_reused']} reused\n"
            f"* timings (s): fit {seconds['fit']}, grid {seconds['grid']}, summary {seconds['summary']}, "
            f"total {seconds['total']}\n\n"
            f"## Configuration\n\n```json\n{cfg}\n```\n"
        ),
    )
