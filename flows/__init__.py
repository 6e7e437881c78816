"""Prefect flows composing the influence tasks (importable as ``prefect_influence.flows``)."""

from .cluster import make_task_runner
from .influence_pipeline import compute_grid, influence_pipeline
from .influence_query import influence_query

__all__ = ["influence_pipeline", "compute_grid", "influence_query", "make_task_runner"]
