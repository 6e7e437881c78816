"""The Dask side of a flow: where its tasks run and for how many workers a job is planned.

A local cluster starts in a background thread while the fit runs (:class:`LocalClusterStart`)
and stops in one after the grid (``close_in_background``); an external scheduler
(``dask_address``) is used as it is. Local workers are pointed at the flow's Prefect API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Iterator, Optional

import dask
from prefect_dask import DaskTaskRunner

from prefect_influence import TORCH_WORKER_DASK_CONFIG
from prefect_influence.config import PipelineConfig
from prefect_influence.pipeline.planning import n_local_workers, planned_workers

__all__ = [
    "planned_workers",
    "make_task_runner",
    "LocalClusterStart",
    "wait_for_closing_clusters",
    "workers_share_api",
]


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
        """``close()`` in a background thread: stopping the workers (seconds) then
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
