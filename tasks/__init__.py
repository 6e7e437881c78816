"""Prefect tasks of the influence pipeline (importable as ``prefect_influence.tasks``)."""

from .influence_tasks import *  # noqa: F403  (the tasks, one per stage, and their retry policy)
from .influence_tasks import __all__  # noqa: F401
