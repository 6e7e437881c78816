"""Prefect tasks of the influence pipeline, one per stage: thin wrappers around
:mod:`prefect_influence.pipeline.stages` that add retries, logging and small, serializable arguments
(the configuration and chunk indices, never arrays).

Each task is usable alone: ``fit_model.fn(config)`` runs it in-process without Prefect's engine.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from prefect_influence import pipeline
from prefect_influence.config import PipelineConfig, QuerySpec
from prefect_influence.errors import ConfigMismatchError, InfluenceInputError, NotFittedError
from prefect_influence.storage import set_secret_loader

__all__ = [
    "fit_model",
    "compute_factors",
    "influences_from_factors",
    "write_summary",
    "query_influences",
    "retry_transient",
    "load_secret",
]


def retry_transient(task, task_run, state) -> bool:
    """Retry storage and worker errors; never bad input, configuration errors or an output
    that now holds another configuration (they would fail the same way again), unless a
    network failure caused them (data or checkpoint unreachable for a moment)."""
    try:
        state.result()
    except ConfigMismatchError:
        return False
    except (InfluenceInputError, NotFittedError, NotImplementedError, TypeError) as exc:
        return _network_failure(exc)
    except Exception:
        return True
    return False


def _network_failure(exc: BaseException) -> bool:
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 16:
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


_RETRY = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)


def load_secret(name: str):
    """The value of the Prefect Secret block ``name`` (storage options for a job's storage)."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


# storage opened in this process (the flow's, a Dask worker's) reads secrets from Prefect
set_secret_loader(load_secret)


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called via .fn outside a run
        import logging

        return logging.getLogger("prefect_influence")


@task(name="fit-model", **_RETRY)
def fit_model(config: PipelineConfig) -> bool:
    """Fit the influence model on the training data and store its state (skipped if stored)."""
    reused = pipeline.fit_stage(config)
    _logger().info("fitted state %s", "reused from storage" if reused else "computed and stored")
    return reused


@task(name="compute-factors", task_run_name="factors-{i}", **_RETRY)
def compute_factors(config: PipelineConfig, i: int) -> bool:
    """Write H⁻¹∇ℓ of test chunk ``i`` into the ``factors`` array (skipped if stored)."""
    return pipeline.factors_stage(config, i)


@task(name="influences-from-factors", task_run_name="column-{j}", **_RETRY)
def influences_from_factors(
    config: PipelineConfig, j: int, test_chunks: Optional[list[int]] = None
) -> dict[str, int]:
    """Blocks (i, j) for the test chunks (default all) from train chunk ``j``'s gradients,
    computed once; plus the chunk's self-influence when configured."""
    counts = pipeline.column_stage(config, j, test_chunks)
    _logger().debug("column %d: %s", j, counts)
    return counts


@task(name="write-summary", **_RETRY)
def write_summary(config: PipelineConfig) -> dict[str, Any]:
    """Top-k most helpful and most harmful training indices per test point, streamed."""
    return pipeline.summary_stage(config)


@task(name="query-influences", **_RETRY)
def query_influences(query: QuerySpec):
    """The top-k training points of the query points, from the output's fitted model and
    stored train features (see :func:`prefect_influence.pipeline.query_output`)."""
    result = pipeline.query_output(
        query.output,
        query.test,
        top_k=query.top_k,
        storage_options=query.storage_options or None,
        full_rows=query.rows_output is not None,
        use_features=query.use_features,
        refine=query.refine,
        storage_secret=query.storage_secret,
    )
    _logger().info(
        "%d query point(s) against %d training points (%s) in %.2f s",
        len(result.arrays["top_helpful"]),
        result.n_train,
        result.features,
        result.seconds,
    )
    return result
