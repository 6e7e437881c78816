"""A Dask worker process killed during a block: the flow run still ends in a terminal state
(never left Running), and a rerun completes to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from distributed import LocalCluster
from jobs import job_config, read_outputs, write_inputs
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from test_stages import run_tasks

from prefect_influence.flows import influence_pipeline

pytestmark = pytest.mark.timeout(900)


def test_killed_worker_leaves_a_terminal_state_and_a_clean_rerun(tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path / "inputs")
    reference = job_config(inputs, str(tmp_path / "ref"), train_chunk_size=10)
    run_tasks(reference)
    expected = read_outputs(reference.output)
    out = tmp_path / "out"
    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as client:
            monkeypatch.setenv("PREFECT_API_URL", str(client.api_url).rstrip("/"))
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            victim = next(iter(cluster.workers.values())).process.pid
            config = job_config(
                inputs, str(out), train_chunk_size=10, dask_address=cluster.scheduler_address
            )
            records = out / "records" / "influences"

            def kill_when_busy():
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    if records.exists() and len(list(records.glob("*.json"))) >= 4:
                        os.kill(victim, signal.SIGKILL)
                        return
                    time.sleep(0.01)

            killer = threading.Thread(target=kill_when_busy, daemon=True)
            killer.start()
            state = influence_pipeline(config, return_state=True)
            killer.join()
            assert state.is_final(), state
            with get_client(sync_client=True) as client:
                runs = client.read_task_runs()
            stuck = [r.name for r in runs if r.state is not None and not r.state.is_final()]
            assert stuck == [], f"task runs left non-terminal: {stuck}"

            rerun = influence_pipeline(config)
            assert rerun["blocks_computed"] + rerun["blocks_reused"] == 48
    for name, values in read_outputs(str(out)).items():
        assert np.array_equal(values, expected[name]), name
