"""Prefect tasks of the influence pipeline (importable as ``prefect_influence.tasks``)."""

from .influence_tasks import (
    compute_factors,
    fit_model,
    influences_from_factors,
    query_influences,
    write_summary,
)

__all__ = [
    "fit_model",
    "compute_factors",
    "influences_from_factors",
    "write_summary",
    "query_influences",
]
