"""An influence job as plain functions, below the orchestration layer (no Prefect here).

* :mod:`.network` and :mod:`.data` — the job's inputs, from the configuration.
* :mod:`.planning` — the grid, the fingerprint and the overwrite policy: :func:`plan_job`.
* :mod:`.context` — what a job's stages share within one process.
* :mod:`.stages` — fit, factors, one column of blocks, summary: what the Prefect tasks run.
* :mod:`.ranking` — top-k per test point; :mod:`.resources` — threads, memory, writes.
"""

from .planning import PlannedJob, auto_chunk_sizes, plan_job
from .stages import column_stage, factors_stage, fit_stage, summary_stage

__all__ = [
    "PlannedJob",
    "plan_job",
    "auto_chunk_sizes",
    "fit_stage",
    "factors_stage",
    "column_stage",
    "summary_stage",
]
