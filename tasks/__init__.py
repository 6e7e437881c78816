"""Prefect tasks of the influence pipeline (importable as ``prefect_influence.tasks``)."""
