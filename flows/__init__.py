"""Prefect flows composing the influence tasks (importable as ``prefect_influence.flows``)."""

from .influence_pipeline import compute_grid, influence_pipeline, make_task_runner

__all__ = ["influence_pipeline", "compute_grid", "make_task_runner"]
