"""Unattended operation against a real ``prefect server start`` of this module's own (its
automations act on every influence run of the server): ``prefect-influence setup-automations``
(idempotent), then a deployment run on a real process worker whose whole process tree is
SIGKILLed mid-grid, as when the machine dies. The heartbeat automation marks the run
``Crashed``, the rerun automation schedules it again, a restarted worker runs it, and it
finishes with every block done before the kill reused and outputs bit-identical to an
uninterrupted run. A run that crashes more often than its rerun limit fails instead of looping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
from jobs import job_config, read_outputs, write_inputs
from test_deployments import (
    BIN,
    JOB,
    N_BLOCKS,
    PREFECT_FILE,
    REPO,
    _flow_run_process,
    _started,
    _wait,
    prefect,  # noqa: F401  (this module's own server)
)
from test_stages import run_tasks

from prefect_influence.automations import CRASH_SILENT_RUNS, HEARTBEAT_S, RERUN_CRASHED_RUNS
from prefect_influence.storage import InfluenceStore

pytestmark = pytest.mark.timeout(900)

#: seconds without a heartbeat before the automation marks a run crashed (the smallest useful:
#: Prefect's heartbeats come every 30 s at the most)
TIMEOUT_S = 40
#: the automation's evaluation and the state change itself take a few seconds more
SLACK_S = 30


def _kill_tree(root_pid: int) -> None:
    """SIGKILL a process and every descendant, each process group at once: what a dying
    machine does to the worker, the flow run it started and that run's Dask workers."""
    family = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    groups = {os.getpgid(p.pid) for p in family} - {os.getpgid(0)}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive


def _states(server, run_id: str) -> list[dict]:
    return server.get(f"/flow_run_states/?flow_run_id={run_id}")


@pytest.fixture(scope="module")
def automated(prefect):  # noqa: F811
    """``prefect-influence setup-automations`` run twice on the module's server."""
    cli = [str(BIN / "prefect-influence"), "setup-automations", "--timeout", str(TIMEOUT_S)]
    return [
        subprocess.run(cli, env=prefect.env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]


def test_setup_automations_twice_changes_nothing(prefect, automated):  # noqa: F811
    first, second = automated
    assert first.returncode == 0, first.stderr
    assert f"created   {CRASH_SILENT_RUNS}" in first.stdout
    assert second.returncode == 0 and second.stdout.count("unchanged") == 2, second.stdout
    automations = prefect.post("/automations/filter", {})
    names = sorted(a["name"] for a in automations)
    assert names == sorted([CRASH_SILENT_RUNS, RERUN_CRASHED_RUNS])
    assert all(a["enabled"] for a in automations)


def test_a_dead_machine_run_is_marked_crashed_and_rerun_to_the_same_bytes(
    prefect,  # noqa: F811
    automated,
    tmp_path,
):
    inputs = write_inputs(tmp_path / "inputs")
    reference = job_config(inputs, str(tmp_path / "reference"), **JOB)
    run_tasks(reference)
    config = job_config(inputs, str(tmp_path / "out"), **JOB)
    prefect.cli("work-pool", "create", "influence-process", "--type", "process")
    prefect.cli("deploy", "--all", "--prefect-file", str(PREFECT_FILE.relative_to(REPO)))
    deployment = prefect.deployment("influence-adhoc")
    env = deployment["job_variables"]["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)

    worker = [str(BIN / "prefect"), "worker", "start", "--pool", "influence-process"]
    with _started(worker, prefect.env, tmp_path / "worker-1.log") as first:
        run_id = prefect.create_run_with(
            "influence-adhoc", {"config": config.model_dump(mode="json")}
        )
        records = tmp_path / "out" / "records" / "influences"
        _wait(
            "blocks of the run before the machine dies",
            lambda: records.is_dir() and len(list(records.glob("*.json"))) >= 2,
            timeout=400,
            interval=0.05,
            proc=first,
            log=tmp_path / "worker-1.log",
        )
        assert _flow_run_process(first.pid, run_id) is not None
        _kill_tree(first.pid)
        killed_at = time.monotonic()
    store = InfluenceStore(config.output)
    grid = store.planned_manifest().grid
    done = {ix for ix in store.recorded("influences") if store.chunk_done("influences", grid, ix)}
    assert 2 <= len(done) < N_BLOCKS

    # nobody reports the crash: the heartbeat automation does
    crashed = _wait(
        "the run marked crashed by the heartbeat automation",
        lambda: any(s["type"] == "CRASHED" for s in _states(prefect, run_id)),
        timeout=HEARTBEAT_S + TIMEOUT_S + SLACK_S,
        interval=1,
    )
    assert crashed
    detected_s = time.monotonic() - killed_at
    assert detected_s <= HEARTBEAT_S + TIMEOUT_S + SLACK_S
    print(f"crash detected {detected_s:.0f} s after the kill")
    # the rerun automation schedules the same run again; a restarted worker takes it
    _wait(
        "the crashed run scheduled again",
        lambda: any(s["name"] == "AutoRerun" for s in _states(prefect, run_id)),
        timeout=60,
        interval=1,
    )
    with _started(worker, prefect.env, tmp_path / "worker-2.log") as second:
        prefect.wait_state(
            run_id, {"COMPLETED"}, timeout=400, worker=(second, tmp_path / "worker-2.log")
        )
        result = prefect.run_result(run_id)
        assert (result["blocks_reused"], result["blocks_computed"]) == (
            len(done),
            N_BLOCKS - len(done),
        )
        expected = read_outputs(reference.output)
        for name, values in read_outputs(config.output).items():
            assert np.array_equal(values, expected[name], equal_nan=True), name
        keys = {a["key"] for a in prefect.artifacts(run_id)}
        assert "influence-rerun" in keys
        status = subprocess.run(
            [str(BIN / "prefect-influence"), "status", config.output, "--fast"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "attempt 1 started" in status.stdout and "never finished: crashed" in status.stdout
        assert "(automatic rerun 1 after a crash)" in status.stdout
        assert "completed at" in status.stdout, status.stdout

        # a run allowed no automatic rerun: its flow process killed (the worker lives and
        # reports the crash), scheduled again once, then refused: Failed, not a loop
        limited = job_config(inputs, str(tmp_path / "limited"), **JOB)
        again = prefect.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            {
                "parameters": {"config": limited.model_dump(mode="json")},
                "job_variables": {"env": {**env, "PREFECT_INFLUENCE_MAX_RERUNS": "0"}},
            },
        )["id"]
        limited_records = tmp_path / "limited" / "records" / "influences"
        _wait(
            "a block of the limited run",
            lambda: limited_records.is_dir() and any(limited_records.glob("*.json")),
            timeout=400,
            interval=0.05,
            proc=second,
        )
        engine = _flow_run_process(second.pid, again)
        os.killpg(engine.pid, signal.SIGKILL)
        # Crashed first (the worker reports it), then scheduled again and refused
        final = prefect.wait_state(
            again, {"FAILED"}, timeout=240, worker=(second, None), passing={"CRASHED"}
        )
        assert "after 1 crash(es)" in final["state"]["message"], final["state"]["message"]
        assert "at most 0 automatic reruns" in final["state"]["message"]
        time.sleep(15)  # nothing schedules it again
        states = sorted(_states(prefect, again), key=lambda s: s["timestamp"])
        after = [s["type"] for s in states[[s["type"] for s in states].index("FAILED") :]]
        assert set(after) <= {"FAILED", "RUNNING"}, states  # no AutoRerun after the refusal
        assert prefect.flow_run(again)["state_type"] == "FAILED"
