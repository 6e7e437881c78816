"""The automations that keep unattended runs going (top layer, like the CLI: Prefect's
automations API), created or updated on a server by ``prefect-influence setup-automations``.

* **Crash silent runs**: a run of an influence deployment (tag ``influence``) that stops
  sending heartbeats for ``timeout`` seconds is marked ``Crashed``: the machine or the process
  running it died, and nobody else would say so.
* **Rerun crashed runs**: a crashed run of an influence deployment is scheduled again: the same
  flow run, as ``prefect flow-run retry`` does, so it has the same parameters, takes back the
  lease its crashed attempt left on the output, and resumes from storage. The flow counts these
  reruns (their ``AutoRerun`` states) and fails instead of running once there were more than
  ``PREFECT_INFLUENCE_MAX_RERUNS`` (default 2), so a run that crashes every time stops.

The deployments send a heartbeat every :data:`HEARTBEAT_S` seconds
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in their job variables; ``serve`` sets it for its
runs). Setting the automations up twice changes nothing; ``enabled=False`` pauses them.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from .flows.reruns import RERUN_STATE_NAME

__all__ = [
    "TAG",
    "HEARTBEAT_S",
    "DEFAULT_TIMEOUT_S",
    "CRASH_SILENT_RUNS",
    "RERUN_CRASHED_RUNS",
    "automations",
    "setup_automations",
]

#: the tag every influence deployment carries (deployments/prefect.yaml); the automations act
#: on runs of those deployments only
TAG = "influence"
#: seconds between a run's heartbeats (Prefect's minimum)
HEARTBEAT_S = 30
#: seconds without a heartbeat before a run is marked crashed: three heartbeats missed
DEFAULT_TIMEOUT_S = 3 * HEARTBEAT_S
CRASH_SILENT_RUNS = "prefect-influence: crash runs whose heartbeats stopped"
RERUN_CRASHED_RUNS = "prefect-influence: rerun crashed runs"
_TERMINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def _runs_of_our_deployments() -> dict[str, Any]:
    return {
        "match": ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        "match_related": ResourceSpecification(
            {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
        ),
        "for_each": {"prefect.resource.id"},
    }


def automations(timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = True) -> list[AutomationCore]:
    """The two automations (see the module doc), with runs marked crashed after ``timeout_s``
    seconds without a heartbeat (more than :data:`HEARTBEAT_S`)."""
    if timeout_s <= HEARTBEAT_S:
        raise ValueError(
            f"timeout must exceed the heartbeat interval ({HEARTBEAT_S} s), got {timeout_s:g} s"
        )
    silent = AutomationCore(
        name=CRASH_SILENT_RUNS,
        description=f"A run of a deployment tagged '{TAG}' that sends no heartbeat for "
        f"{timeout_s:g} s is marked Crashed (its process or machine died).",
        enabled=enabled,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in _TERMINAL)},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=timeout_s),
            **_runs_of_our_deployments(),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {timeout_s:g} s: the process running this flow "
                "died (marked by the prefect-influence automation).",
            )
        ],
    )
    rerun = AutomationCore(
        name=RERUN_CRASHED_RUNS,
        description=f"A crashed run of a deployment tagged '{TAG}' is scheduled again (the same "
        "run: same parameters, it resumes from storage), as many times as the flow allows.",
        enabled=enabled,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
            **_runs_of_our_deployments(),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name=RERUN_STATE_NAME,
                message="Scheduled again after a crash by the prefect-influence automation; "
                "the run resumes from its output's storage.",
                force=True,
            )
        ],
    )
    return [silent, rerun]


def _canonical(value: Any) -> Any:
    """JSON data with lists of strings sorted (sets dumped in any order) and no ids."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if k not in ("id", "created", "updated")}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def _comparable(automation: Any) -> str:
    fields = {"name", "description", "enabled", "trigger", "actions"}
    data = json.loads(automation.model_dump_json(include=fields))
    return json.dumps(_canonical(data), sort_keys=True)


def setup_automations(timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = True) -> dict[str, str]:
    """Create or update the automations on the configured Prefect API; returns what happened
    to each (``created``, ``updated`` or ``unchanged``). Duplicates of one name left by
    earlier setups are removed."""
    from prefect.client.orchestration import get_client

    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for wanted in automations(timeout_s, enabled):
            existing = client.read_automations_by_name(wanted.name)
            for extra in existing[1:]:
                client.delete_automation(extra.id)
            if not existing:
                client.create_automation(wanted)
                out[wanted.name] = "created"
            elif _comparable(existing[0]) == _comparable(wanted):
                out[wanted.name] = "unchanged"
            else:
                client.update_automation(existing[0].id, wanted)
                out[wanted.name] = "updated"
    return out
