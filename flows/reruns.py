"""Automatic reruns after a crash, as the flow sees them: how many times the automation has
scheduled this flow run again (the ``AutoRerun`` states in its history), the bound on them,
and what a rerun shows in the UI (a log line, an event, an artifact).

The automations themselves live in :mod:`prefect_influence.automations` (the top layer); a
rerun is the same flow run scheduled again, so it has the run's parameters and takes back the
lease the crashed attempt left on the output.
"""

from __future__ import annotations

import os
from typing import Optional

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.events import emit_event

__all__ = [
    "RERUN_STATE_NAME",
    "MAX_RERUNS_ENV",
    "DEFAULT_MAX_RERUNS",
    "RerunLimitError",
    "automatic_reruns",
    "max_reruns",
    "announce_rerun",
]

#: the name of the Scheduled state the automation gives a crashed run
RERUN_STATE_NAME = "AutoRerun"
#: automatic reruns allowed per flow run (a nightly run is one flow run), from the environment
#: of the process running the flow (the deployment's job variables, or ``serve``'s)
MAX_RERUNS_ENV = "PREFECT_INFLUENCE_MAX_RERUNS"
DEFAULT_MAX_RERUNS = 2


class RerunLimitError(RuntimeError):
    """The run crashed more often than its automatic reruns allow: it fails instead."""


def max_reruns() -> int:
    value = os.environ.get(MAX_RERUNS_ENV, "").strip()
    try:
        return max(0, int(value)) if value else DEFAULT_MAX_RERUNS
    except ValueError:
        return DEFAULT_MAX_RERUNS


def _flow_run_id() -> Optional[str]:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def automatic_reruns() -> int:
    """How many attempts of this flow run crashed and were scheduled again by the rerun
    automation (0 outside a deployment's run, or without the automation)."""
    ctx = FlowRunContext.get()
    if not ctx or not ctx.flow_run or not ctx.flow_run.deployment_id:
        return 0
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(ctx.flow_run.id)
    states = sorted(states, key=lambda s: s.timestamp)
    # a worker that outlives the run's process may report its crash twice; the second report
    # comes after the rerun was scheduled and gets it scheduled again, without an attempt
    # having run in between: crashes of attempts that ran are counted once
    reruns, ran = 0, False
    for state in states:
        if state.type.value == "RUNNING":
            ran = True
        elif state.type.value == "SCHEDULED" and state.name == RERUN_STATE_NAME and ran:
            reruns, ran = reruns + 1, False
    return reruns


def announce_rerun(reruns: int, limit: int, logger) -> None:
    """Refuse a rerun beyond ``limit``; otherwise say in the log, the event feed and an
    artifact that this attempt is an automatic rerun that resumes from storage."""
    run_id = _flow_run_id()
    resource = {"prefect.resource.id": f"prefect.flow-run.{run_id}"}
    if reruns > limit:
        emit_event(
            "prefect-influence.rerun.refused", resource, payload={"reruns": reruns, "limit": limit}
        )
        raise RerunLimitError(
            f"this run was scheduled again automatically after {reruns} crash(es); at most "
            f"{limit} automatic reruns are allowed ({MAX_RERUNS_ENV}), so it stops here. Its output keeps every finished chunk: retry it by hand once the cause is "
            "fixed, and it resumes."
        )
    logger.warning(
        "automatic rerun %d of at most %d after a crash: resuming from the output's storage",
        reruns,
        limit,
    )
    emit_event("prefect-influence.rerun", resource, payload={"rerun": reruns, "limit": limit})
    create_markdown_artifact(
        key="influence-rerun",
        markdown=(
            f"# Automatic rerun {reruns} of at most {limit}\n\n"
            "The previous attempt of this run crashed (its process died or stopped sending "
            "heartbeats). This attempt resumes from the output's storage: finished chunks are "
            "reused; the run's `influence-summary` counts them.\n"
        ),
        description="This attempt is an automatic rerun after a crash",
    )
