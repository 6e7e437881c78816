"""Prefect tasks of the influence pipeline, one per stage: thin wrappers around
:mod:`prefect_influence.stages` that add retries, logging and small, serializable arguments
(the configuration and chunk indices, never arrays).

Each task is usable alone: ``fit_model.fn(config)`` runs it in-process without Prefect's engine.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from prefect_influence import stages
from prefect_influence.config import PipelineConfig
from prefect_influence.errors import InfluenceInputError, NotFittedError
from prefect_influence.storage import ConfigMismatchError

__all__ = [
    "fit_model",
    "compute_factors",
    "influences_from_factors",
    "write_summary",
    "retry_transient",
    "with_secret_storage_options",
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


def with_secret_storage_options(config: PipelineConfig) -> PipelineConfig:
    """The configuration with the ``storage_secret`` block's value merged into its storage
    options (resolved where it is used, so the credentials never travel as parameters)."""
    if not config.storage_secret:
        return config
    from prefect.blocks.system import Secret

    value = Secret.load(config.storage_secret).get()
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            value = None  # a plain string: refused below, without echoing it
    if not isinstance(value, dict):
        raise InfluenceInputError(
            f"Secret block {config.storage_secret!r} must hold a JSON object of storage options."
        )
    return config.model_copy(update={"storage_options": {**config.storage_options, **value}})


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called via .fn outside a run
        import logging

        return logging.getLogger("prefect_influence")


@task(name="fit-model", **_RETRY)
def fit_model(config: PipelineConfig) -> bool:
    """Fit the influence model on the training data and store its state (skipped if stored)."""
    reused = stages.fit_stage(with_secret_storage_options(config))
    _logger().info("fitted state %s", "reused from storage" if reused else "computed and stored")
    return reused


@task(name="compute-factors", task_run_name="factors-{i}", **_RETRY)
def compute_factors(config: PipelineConfig, i: int) -> bool:
    """Write H⁻¹∇ℓ of test chunk ``i`` into the ``factors`` array (skipped if stored)."""
    return stages.factors_stage(with_secret_storage_options(config), i)


@task(name="influences-from-factors", task_run_name="column-{j}", **_RETRY)
def influences_from_factors(
    config: PipelineConfig, j: int, test_chunks: Optional[list[int]] = None
) -> dict[str, int]:
    """Blocks (i, j) for the test chunks (default all) from train chunk ``j``'s gradients,
    computed once; plus the chunk's self-influence when configured."""
    counts = stages.column_stage(with_secret_storage_options(config), j, test_chunks)
    _logger().debug("column %d: %s", j, counts)
    return counts


@task(name="write-summary", **_RETRY)
def write_summary(config: PipelineConfig) -> dict[str, Any]:
    """Top-k most helpful and most harmful training indices per test point, streamed."""
    return stages.summary_stage(with_secret_storage_options(config))
