"""SIGKILL of the flow process at 10 points (fit, factors, blocks, self-influence, summary;
before, during and right after a write), and while appending test rows: every rerun
completes, bit-identical to an uninterrupted run, and no block that was done is recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import killer_fs  # noqa: F401  (registers killer:// in this process too, disarmed)
import numpy as np
import pytest
from distributed import LocalCluster
from jobs import job_config, read_outputs, write_inputs, write_test_head
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from test_stages import run_tasks

from prefect_influence.flows import influence_pipeline
from prefect_influence.storage import InfluenceStore

pytestmark = pytest.mark.timeout(1200)

KILL_POINTS = [
    ("fit-state-torn", "/fitted/", 2, "torn"),
    ("fit-before-record", "records/fitted.json", 1, "before"),
    ("factors-torn", "/factors/c/", 1, "torn"),
    ("factors-before-record", "records/factors/", 2, "before"),
    ("block-torn", "/influences/c/", 1, "torn"),
    ("block-data-without-record", "records/influences/", 3, "before"),
    ("block-after-write", "/influences/c/", 7, "after"),
    ("self-influence-torn", "/self_influence/c/", 2, "torn"),
    ("summary-torn", "/summary/", 1, "torn"),
    ("summary-before-record", "records/summary.json", 1, "before"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    inputs = write_inputs(root / "inputs")
    reference = job_config(inputs, str(root / "reference"))
    run_tasks(reference)
    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as client:
            api = str(client.api_url).rstrip("/")
        with LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster:
            yield root, inputs, read_outputs(reference.output), api, cluster.scheduler_address


@pytest.mark.parametrize("name, pattern, at, when", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_sigkill_at_point_then_rerun(env, name, pattern, at, when):
    root, inputs, expected, api, address = env
    _kill_then_rerun(env, name, job_config(inputs, f"killer://{root / name}"), pattern, at, when)


def test_sigkill_while_appending_test_rows_then_rerun(env):
    """A finished job on the first 30 test rows, then a run on all 40 killed in the middle of
    its new blocks: the rerun finishes the append, bit-identical to the job run at once."""
    root, inputs, expected, api, address = env
    out = f"killer://{root / 'append'}"
    head = write_test_head(inputs, 30, root)
    run_tasks(job_config({**inputs, "test": head}, out))
    _kill_then_rerun(env, "append", job_config(inputs, out), "/influences/c/", 3, "torn")


def _kill_then_rerun(env, name, config, pattern, at, when):
    root, inputs, expected, api, address = env
    out = root / name
    config_file = root / f"{name}.json"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "kill_run.py"), str(config_file)],
        env={
            **os.environ,
            "PREFECT_API_URL": api,
            "KILL_PATTERN": pattern,
            "KILL_AT": str(at),
            "KILL_WHEN": when,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    store = InfluenceStore(str(out))
    grid = store.planned_manifest().grid
    done = {ix for ix in store.recorded("influences") if store.chunk_done("influences", grid, ix)}
    fitted_done = store.read_fitted_state() is not None

    result = influence_pipeline(config.model_copy(update={"dask_address": address}))
    assert result["blocks_reused"] == len(done)
    assert result["blocks_computed"] == grid.n_blocks - len(done)
    assert result["fit_reused"] == fitted_done
    got = read_outputs(str(out))
    for key, values in expected.items():
        assert np.array_equal(got[key], values, equal_nan=True), key
