"""The whole flow on a real Prefect API (``prefect_test_harness``) and a real ``LocalCluster``;
resume after SIGKILL of the flow process is bit-identical and recomputes nothing done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from jobs import job_config, read_outputs, write_inputs
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from prefect_influence.flows import influence_pipeline
from prefect_influence.storage import InfluenceStore

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def api_url():
    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as client:
            yield str(client.api_url).rstrip("/")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("flow-inputs"))


@pytest.fixture(scope="module")
def uninterrupted(api_url, inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("flow-ref") / "out")
    config = job_config(inputs, out, train_chunk_size=10)  # 2 × 24 blocks
    result = influence_pipeline(config)
    return config, result, read_outputs(out)


def test_flow_on_local_cluster_matches_tasks(uninterrupted, inputs, tmp_path):
    config, result, got = uninterrupted
    assert result["grid"] == [2, 24]
    assert (result["blocks_computed"], result["blocks_reused"]) == (48, 0)
    assert not np.isnan(got["influences"]).any()
    # the same job through the tasks' functions in this process gives the same bytes
    from test_stages import run_tasks

    local = job_config(inputs, str(tmp_path / "out"), train_chunk_size=10)
    run_tasks(local)
    for name, values in read_outputs(local.output).items():
        assert np.array_equal(values, got[name]), name


def test_flow_publishes_artifacts(uninterrupted):
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    by_key = {a.key: a for a in artifacts if a.key}
    assert "influence-top-k" in by_key and "influence-summary" in by_key
    table = by_key["influence-top-k"].data
    assert "most_helpful" in str(table)
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress and max(float(a.data) for a in progress) == 100.0


def test_query_flow_returns_the_grid_top_k_with_artifacts(uninterrupted, inputs, tmp_path):
    from prefect_influence.config import QuerySpec
    from prefect_influence.flows import influence_query

    config, _, grid = uninterrupted
    rows = tmp_path / "rows.npy"
    query = QuerySpec(output=config.output, test=inputs["test"], top_k=4, rows_output=str(rows))
    result = influence_query(query)
    got = np.array([[e["train_index"] for e in point["helpful"]] for point in result["top"]])
    np.testing.assert_array_equal(got, grid["top_helpful"][:, :4])
    assert np.load(rows).shape == grid["influences"].shape
    with get_client(sync_client=True) as client:
        by_key = {a.key: a for a in client.read_artifacts() if a.key}
    table = by_key["influence-query"].data
    assert "helpful_train_index" in str(table)
    assert "data:image/png;base64," in by_key["influence-query-picture"].data


def test_rerun_reuses_every_block(uninterrupted):
    config, _, before = uninterrupted
    result = influence_pipeline(config)
    assert (result["blocks_computed"], result["blocks_reused"], result["fit_reused"]) == (
        0,
        48,
        True,
    )
    for name, values in read_outputs(config.output).items():
        assert np.array_equal(values, before[name]), name


def _block_records(out: Path) -> dict[str, int]:
    folder = out / "records" / "influences"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.exists() else {}


def test_sigkill_then_rerun_is_bit_identical(api_url, uninterrupted, inputs, tmp_path):
    _, _, expected = uninterrupted
    out = tmp_path / "out"
    config = job_config(inputs, str(out), train_chunk_size=10)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": api_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_influence.cli", "run", str(config_file)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_block_records(out)) < 6:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no blocks were finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask workers
        proc.wait()
    store = InfluenceStore(str(out))
    grid = store.planned_manifest().grid
    done = {ix for ix in store.recorded("influences") if store.chunk_done("influences", grid, ix)}
    assert 6 <= len(done) < 48
    records_before = _block_records(out)

    result = influence_pipeline(config)
    assert result["blocks_reused"] == len(done)
    assert result["blocks_computed"] == 48 - len(done)
    after = _block_records(out)
    for ix in done:  # finished blocks were not rewritten
        name = f"{ix[0]}.{ix[1]}.json"
        assert after[name] == records_before[name]
    for name, values in read_outputs(str(out)).items():
        assert np.array_equal(values, expected[name]), name


def test_second_run_on_a_leased_output_is_refused(uninterrupted):
    from prefect_influence.errors import LeaseHeldError

    config, _, before = uninterrupted
    store = InfluenceStore(config.output)
    token = store.lease.acquire(ttl_seconds=60)  # a live run elsewhere holds the output
    try:
        with pytest.raises(LeaseHeldError, match="in use by another run"):
            influence_pipeline(config)
        # a forced takeover runs (and reuses everything)
        result = influence_pipeline(config.model_copy(update={"force": True}))
        assert result["blocks_reused"] == 48
    finally:
        store.lease.release(token)
    for name, values in read_outputs(config.output).items():
        assert np.array_equal(values, before[name]), name


def test_a_flow_returns_before_its_cluster_has_stopped_and_the_next_one_waits_for_it():
    """The flow hands its local cluster to a closing thread and returns; a local cluster
    started afterwards in the same process first waits until the earlier one is gone."""
    import psutil

    from prefect_influence.config import PipelineConfig
    from prefect_influence.flows.cluster import LocalClusterStart

    first = LocalClusterStart(PipelineConfig(n_workers=1))
    environ = _worker_environ(first.cluster())
    # torch workers: glibc's mmap threshold fixed at 4 MiB (whatever trim setting a cluster
    # started earlier in this process left in its environment, this one decides the threshold)
    assert all(e.get("MALLOC_MMAP_THRESHOLD_") == str(4 * 2**20) for e in environ.values())
    workers = [psutil.Process(int(e["pid"])) for e in environ.values()]
    assert workers
    closing = first.close_in_background()
    assert not closing.daemon  # a process ending right after the flow still stops its workers
    second = LocalClusterStart(PipelineConfig(n_workers=1))
    try:
        assert not closing.is_alive()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert second.cluster().scheduler_address
    finally:
        second.close()


def _worker_environ(cluster) -> dict[str, dict[str, str]]:
    """Each worker's environment, with its process id under ``"pid"``."""
    from distributed import Client

    def environ() -> dict[str, str]:
        return {**os.environ, "pid": str(os.getpid())}

    with Client(cluster.scheduler_address) as client:
        return client.run(environ)


def test_an_external_cluster_is_planned_for_its_workers(tmp_path, monkeypatch):
    """With dask_address, auto chunks are planned for the scheduler's workers (it used to be
    one, which left most workers of a large cluster idle), or for n_workers when given."""
    from distributed import LocalCluster

    from prefect_influence.errors import ConfigurationError
    from prefect_influence.flows.cluster import planned_workers

    monkeypatch.setitem(planned_workers.__globals__, "SCHEDULER_CONNECT_S", 2)
    paths = {"train": "t", "test": "t", "checkpoint": "c"}
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        assert (
            planned_workers(
                job_config(
                    paths, str(tmp_path), dask_address=cluster.scheduler_address, n_workers=None
                )
            )
            == 3
        )
        assert (
            planned_workers(
                job_config(
                    paths, str(tmp_path), dask_address=cluster.scheduler_address, n_workers=5
                )
            )
            == 5
        )
    with pytest.raises(ConfigurationError, match="cannot be reached"):
        planned_workers(
            job_config(paths, str(tmp_path), dask_address="tcp://127.0.0.1:9", n_workers=None)
        )


def test_bad_input_is_logged_in_the_flow_run_as_on_the_command_line(api_url, inputs, tmp_path):
    """A deployment's run tells its logs what the command line tells a terminal: one line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    config = job_config(inputs, str(tmp_path / "out"), data={"train": str(tmp_path / "nope.npz")})
    state = influence_pipeline(config, return_state=True)
    assert state.is_failed()
    APILogHandler().flush()
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        messages = [log.message for log in client.read_logs(log_filter=run_filter)]
    assert any(
        m.startswith("prefect-influence: error: data") and "does not exist" in m for m in messages
    ), messages
