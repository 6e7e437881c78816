"""Transient storage faults: errors and torn writes injected by an fsspec filesystem registered
for the test. Tasks retry with backoff, no corrupt chunk is ever accepted, and when retries run
out the run fails clearly and a later run resumes cleanly to the same bytes."""

from __future__ import annotations

import threading

import fsspec
import numpy as np
import pytest
from distributed import LocalCluster
from fsspec.implementations.local import LocalFileSystem
from jobs import job_config, read_outputs, write_inputs
from prefect.testing.utilities import prefect_test_harness
from test_stages import run_tasks

from prefect_influence.errors import ConfigMismatchError, ConfigurationError, InfluenceInputError
from prefect_influence.flows import influence_pipeline
from prefect_influence.storage import InfluenceStore

pytestmark = pytest.mark.timeout(900)


class FlakyFileSystem(LocalFileSystem):
    """Local files behind ``flaky://``; injected faults:

    * the first write of every influence chunk of test row 0 is torn: half its bytes land,
      then ``OSError``;
    * the first read of factors chunk 1 (whole, or a range of it) times out;
    * paths listed in ``always_fail`` fail on every write.
    """

    protocol = ("flaky",)
    lock = threading.Lock()
    seen_writes: set = set()
    seen_reads: set = set()
    always_fail: set = set()
    injected = 0

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)  # like an object store: no directories to make
        super().__init__(*args, **kwargs)

    @classmethod
    def reset(cls):
        cls.seen_writes, cls.seen_reads, cls.always_fail, cls.injected = set(), set(), set(), 0

    @classmethod
    def _strip_protocol(cls, path):
        path = (
            path[len("flaky://") :]
            if isinstance(path, str) and path.startswith("flaky://")
            else path
        )
        return super()._strip_protocol(path)

    def pipe_file(self, path, value, **kwargs):
        path = self._strip_protocol(path)
        with self.lock:
            first = "/influences/c/0/" in path and path not in self.seen_writes
            self.seen_writes.add(path)
            doomed = any(key in path for key in self.always_fail)
            if first or doomed:
                type(self).injected += 1
        if first or doomed:
            super().pipe_file(path, value[: len(value) // 2], **kwargs)
            raise OSError(f"injected fault: connection reset while writing {path}")
        return super().pipe_file(path, value, **kwargs)

    def _first_factor_read_times_out(self, path):
        with self.lock:
            first = "/factors/c/1/" in path and path not in self.seen_reads
            self.seen_reads.add(path)
            if first:
                type(self).injected += 1
        if first:
            raise TimeoutError(f"injected fault: read timeout on {path}")

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        self._first_factor_read_times_out(path)
        return super().cat_file(path, start, end, **kwargs)

    def _open(self, path, mode="rb", *args, **kwargs):
        # a column that scores layer by layer reads ranges of factor chunks through open()
        if "r" in mode:
            self._first_factor_read_times_out(self._strip_protocol(path))
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    inputs = write_inputs(root / "inputs")
    reference = job_config(inputs, str(root / "reference"))
    run_tasks(reference)
    # one in-process worker thread: the workers share this process and its registered
    # filesystem (one thread, since influence models are not thread-safe)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        with prefect_test_harness(server_startup_timeout=180):
            yield root, inputs, read_outputs(reference.output), cluster.scheduler_address


def test_transient_faults_are_retried_and_never_accepted(env):
    root, inputs, expected, address = env
    FlakyFileSystem.reset()
    config = job_config(inputs, f"flaky://{root}/transient", dask_address=address)
    result = influence_pipeline(config)
    assert FlakyFileSystem.injected >= 7  # 6 torn block writes, ≥ 1 read timeout
    # counts come from each column's final (successful) attempt, which may reuse a block an
    # earlier, failed attempt of the same column had finished
    assert result["blocks_computed"] + result["blocks_reused"] == 12
    got = read_outputs(str(root / "transient"))
    for name, values in expected.items():
        assert np.array_equal(got[name], values, equal_nan=True), name
    assert (
        InfluenceStore(str(root / "transient")).status(verify=True)["influences"]["corrupt"] == []
    )


def test_persistent_fault_fails_clearly_then_resumes(env):
    root, inputs, expected, address = env
    FlakyFileSystem.reset()
    FlakyFileSystem.always_fail = {"/influences/c/1/3"}
    config = job_config(inputs, f"flaky://{root}/persistent", dask_address=address)
    with pytest.raises(OSError, match="injected fault"):
        influence_pipeline(config)
    store = InfluenceStore(str(root / "persistent"))
    grid = store.planned_manifest().grid
    assert not store.chunk_done("influences", grid, (1, 3))  # the torn chunk is not accepted
    assert store._read_json("lease.json") is None  # a failed run releases its lease

    FlakyFileSystem.reset()  # the store is healthy again
    result = influence_pipeline(config)
    assert result["blocks_computed"] >= 1 and result["blocks_reused"] >= 1
    got = read_outputs(str(root / "persistent"))
    for name, values in expected.items():
        assert np.array_equal(got[name], values, equal_nan=True), name


def test_storage_credentials_from_a_secret_block(env, s3_server):
    """S3 credentials in a Prefect Secret block: resolved inside the tasks, so they appear in
    neither the run's parameters nor the manifest nor the artifacts, whatever their keys are
    called (the secret's value is never recorded, not only credential-like keys)."""
    import json

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    root, inputs, expected, address = env
    _, options = s3_server
    sentinel = "sentinel-not-a-credential-name"  # under a key that redaction would not mask
    Secret(
        value={
            "key": options["key"],
            "secret": options["secret"],
            "config_kwargs": {"user_agent_extra": sentinel},
        }
    ).save("influence-s3", overwrite=True)
    config = job_config(
        inputs,
        "s3://influence/secret-job/out",
        dask_address=address,
        storage_options={"endpoint_url": options["endpoint_url"]},
        storage_secret="influence-s3",
    )
    state = influence_pipeline(config, return_state=True)
    assert state.is_completed(), state
    got = read_outputs(config.output, options)
    for name, values in expected.items():
        assert np.array_equal(got[name], values, equal_nan=True), name
    manifest = json.dumps(InfluenceStore(config.output, options).read_manifest().to_json())
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        params = json.dumps(client.read_flow_run(run_id).parameters)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    published = json.dumps([a.data for a in artifacts])
    assert "influence-summary" in {a.key for a in artifacts}
    for secret in (options["key"], options["secret"], sentinel):
        assert secret not in manifest and secret not in params and secret not in published


def test_a_secret_block_holding_a_plain_string_is_refused_clearly(env):
    from prefect.blocks.system import Secret

    from prefect_influence.storage import storage_options

    root, inputs, _, _ = env
    Secret(value="not-json-at-all").save("influence-plain", overwrite=True)
    config = job_config(inputs, str(root / "plain"), storage_secret="influence-plain")
    with pytest.raises(InfluenceInputError, match="must hold a JSON object") as info:
        storage_options(config)
    assert "not-json-at-all" not in str(info.value)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc, retried",
    [
        (OSError("connection reset"), True),
        (
            _caused(
                ConfigurationError("data 's3://b/x' cannot be reached"), ConnectionRefusedError()
            ),
            True,
        ),
        (ConfigurationError("data 'x' does not exist"), False),
        (ConfigMismatchError("now holds another configuration's job"), False),
        (InfluenceInputError("NaN in x"), False),
    ],
)
def test_retry_rule_retries_transient_failures_only(exc, retried):
    from prefect_influence.tasks.influence_tasks import retry_transient

    assert retry_transient(None, None, _Failed(exc)) is retried
