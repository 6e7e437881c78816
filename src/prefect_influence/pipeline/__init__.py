"""An influence job as plain functions, below the orchestration layer (no Prefect here).

* :mod:`.network` and :mod:`.data` — the job's inputs, from the configuration.
* :mod:`.planning` — the grid, the fingerprint and the overwrite policy: :func:`plan_job`.
* :mod:`.context` — what a job's stages share within one process.
* :mod:`.stages` — fit, factors, one column of blocks, summary: what the Prefect tasks run.
* :mod:`.ranking` — top-k per test point; :mod:`.resources` — threads, memory, writes.
* :mod:`.estimate` — a job's time and memory, from a short probe.
* :mod:`.features` — stored train features; :mod:`.query` — a few new test points against
  an output's fitted model: :func:`query_output`.

Names load on first use, so checking a job file starts without importing torch.
"""

import importlib

_NAMES = {
    "PlannedJob": "planning",
    "plan_job": "planning",
    "survey_job": "planning",
    "auto_chunk_sizes": "planning",
    "fit_stage": "stages",
    "factors_stage": "stages",
    "column_stage": "stages",
    "summary_stage": "stages",
    "query_output": "query",
    "QueryResult": "query",
}
_MODULES = (
    "context",
    "data",
    "estimate",
    "features",
    "inputs",
    "network",
    "planning",
    "query",
    "ranking",
    "resources",
    "stages",
)

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES) | set(_MODULES))
