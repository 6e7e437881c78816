"""deployments/prefect.yaml and ``prefect-influence serve`` against a real Prefect server.

Without a server: every parameter of the run form has a title and a description, and serving
builds the deployments prefect.yaml describes. With one server for the module (temporary
PREFECT_HOME, loopback, analytics off): ``prefect deploy`` of the deployments onto a process
work pool, a query run, a worker, a run started from the CLI (zarr outputs and artifacts checked through the
API), a run SIGKILLed mid-way and retried with ``prefect flow-run retry`` (resumes, equal to the
uninterrupted run), the parameter schema and its enforcement, the UI's run form in headless
Chromium, and ``prefect-influence serve``. Every process started here runs in a session of its
own and is killed with all its descendants, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import psutil
import pytest
import yaml
from jobs import job_config, read_outputs, write_inputs
from pydantic import BaseModel

from prefect_influence.config import Method, PipelineConfig, SecondOrderName
from prefect_influence.serving import build_deployments, load_deployment_specs
from prefect_influence.storage import InfluenceStore

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
BIN = Path(sys.executable).parent
FLOW = "influence-pipeline"
MODULE_ENTRYPOINT = "prefect_influence.flows.influence_pipeline.influence_pipeline"
#: each deployment's flow, and the module path serving imports it from
FLOWS = {
    "influence-adhoc": (FLOW, MODULE_ENTRYPOINT),
    "influence-nightly": (FLOW, MODULE_ENTRYPOINT),
    "influence-query": (
        "influence-query",
        "prefect_influence.flows.influence_query.influence_query",
    ),
}
#: 2 × 12 blocks, one Dask worker: columns finish one after another, so a kill lands mid-way
JOB = {"train_chunk_size": 20, "n_workers": 1}
N_BLOCKS = 24


def _specs() -> dict[str, dict]:
    return {spec["name"]: spec for spec in load_deployment_specs(PREFECT_FILE)}


# -- without a server ------------------------------------------------------------------------------
def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")


def test_every_parameter_has_title_and_description():
    missing = [
        name for name, field in _fields(PipelineConfig) if not field.title or not field.description
    ]
    assert not missing, f"fields without a title or description in the run form: {missing}"


def test_prefect_yaml_deployments():
    specs = _specs()
    assert set(specs) == set(FLOWS)
    for name, spec in specs.items():
        module, function = FLOWS[name][1].rsplit(".", 2)[1:]
        assert spec["entrypoint"] == f"flows/{module}.py:{function}"
        assert spec["enforce_parameter_schema"] is True
        assert spec["work_pool"]["name"] == "influence-process"
        assert spec["tags"] and spec["description"]
    assert not specs["influence-adhoc"].get("schedules")
    (nightly,) = specs["influence-nightly"]["schedules"]
    assert nightly["cron"] and nightly["timezone"]
    # the nightly job is a complete, valid configuration: every field there for the user to edit
    config = specs["influence-nightly"]["parameters"]["config"]
    complete = PipelineConfig.model_validate(config).model_dump(mode="json")
    assert complete == config, f"write out in prefect.yaml: {yaml.safe_dump(complete)}"
    # the entrypoint workers load is the flow serving imports
    from prefect.flows import load_flow_from_entrypoint

    from prefect_influence.flows import influence_pipeline, influence_query

    assert not specs["influence-query"].get("schedules")
    for name, flow in (
        ("influence-adhoc", influence_pipeline),
        ("influence-query", influence_query),
    ):
        with contextlib.chdir(REPO):
            loaded = load_flow_from_entrypoint(specs[name]["entrypoint"])
        assert loaded.name == flow.name == FLOWS[name][0]
        assert loaded.fn.__code__.co_filename == flow.fn.__code__.co_filename


def test_serving_builds_what_prefect_yaml_describes():
    specs = _specs()
    built = {d.name: d for d in build_deployments(PREFECT_FILE)}
    assert set(built) == set(specs)
    for name, spec in specs.items():
        d = built[name]
        assert d.entrypoint == FLOWS[name][1]  # runs from any working directory
        assert (d.description, d.tags, d.parameters) == (
            spec["description"],
            spec["tags"],
            spec.get("parameters") or {},
        )
        assert d.enforce_parameter_schema is True
        got = [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules or []]
        assert got == [
            (s["cron"], s["timezone"], s.get("active", True)) for s in spec.get("schedules") or []
        ]


def test_serving_finds_prefect_yaml_without_a_checkout(tmp_path, monkeypatch):
    """Installed from a wheel, the package has no deployments/ beside it: serving then reads
    the working directory's deployments/prefect.yaml (or the path given)."""
    from prefect_influence import serving

    monkeypatch.setattr(
        serving, "PREFECT_FILE", tmp_path / "site-packages" / "deployments" / "prefect.yaml"
    )
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "prefect.yaml").write_text(PREFECT_FILE.read_text())
    monkeypatch.chdir(tmp_path)
    assert serving.default_prefect_file() == tmp_path / "deployments" / "prefect.yaml"
    assert {s["name"] for s in serving.load_deployment_specs()} == set(_specs())
    monkeypatch.chdir(tmp_path / "deployments")
    with pytest.raises(FileNotFoundError, match="--prefect-file"):
        serving.load_deployment_specs()
    assert serving.load_deployment_specs(tmp_path / "deployments" / "prefect.yaml")


def test_nightly_replaces_results_after_a_retrain():
    """The nightly job re-scores after retraining: new inputs at the same URLs must replace
    the previous results instead of being refused as another configuration."""
    assert _specs()["influence-nightly"]["parameters"]["config"]["overwrite"] is True


def test_serving_refuses_what_it_cannot_translate(tmp_path):
    data = yaml.safe_load(PREFECT_FILE.read_text())
    data["deployments"][0]["concurrency_limit"] = 1
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="concurrency_limit"):
        load_deployment_specs(path)


# -- processes -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the process's group and every descendant's group (a worker starts
    each flow run in a session of its own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    groups = {proc.pid}
    for p in family:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    groups.discard(os.getpgid(0))  # never this test's own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=grace)
        if not alive:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


@contextlib.contextmanager
def _started(cmd: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            _stop(proc)


def _wait(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    interval: float = 0.5,
    proc: Optional[subprocess.Popen] = None,
    log: Optional[Path] = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        failure = (
            f"process exited with {proc.returncode}"
            if proc is not None and proc.poll() is not None
            else f"not within {timeout:.0f} s"
            if time.monotonic() > deadline
            else None
        )
        if failure:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: {failure}\n{tail}")
        time.sleep(interval)


class Prefect:
    """The module's server: its environment, logs, CLI and REST API."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.ui = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",  # the flow's result is an INFO record
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up new runs within a second
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the same for prefect-influence serve
            "PYTHONUNBUFFERED": "1",
        }
        self.http = httpx.Client(base_url=self.api, timeout=30)

    def cli(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=REPO,
            env=self.env,
            timeout=timeout,
            capture_output=True,
            text=True,
            start_new_session=True,
        )
        if check and done.returncode:
            raise AssertionError(
                f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def request(self, method: str, path: str, body: Optional[dict] = None) -> httpx.Response:
        """One API call, retried like Prefect's client does while a busy server (SQLite on two
        cores) answers 429/502/503/504 or drops the connection."""
        for attempt in range(6):
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError:
                if attempt == 5:
                    raise
            else:
                if response.status_code not in (429, 502, 503, 504) or attempt == 5:
                    return response
            time.sleep(2**attempt / 4)
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> Any:
        response = self.request("POST", path, body)
        response.raise_for_status()
        return response.json()

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{FLOWS[name][0]}/{name}")

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def logs(self, run_id: str) -> list[str]:
        logs = self.post(
            "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        )
        return [entry["message"] for entry in logs]

    def run_result(self, run_id: str, timeout: float = 60) -> dict:
        """The flow's return value, from its 'done: {...}' log line (results are not persisted;
        logs reach the API in batches, possibly after the final state)."""

        def logged():
            return [m for m in self.logs(run_id) if m.startswith("done: ")]

        lines = _wait(f"the result of flow run {run_id} in its logs", logged, timeout, interval=1)
        return json.loads(lines[-1][len("done: ") :])

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def wait_state(
        self, run_id: str, states: set[str], timeout: float, worker=None, passing=frozenset()
    ) -> dict:
        """Wait for one of ``states``; another final state ends the wait too (and fails), except
        those in ``passing``, which the run is expected to go through on its way."""
        final = {"FAILED", "CRASHED", "CANCELLED"} - set(passing)

        def reached():
            run = self.flow_run(run_id)
            return run if run["state_type"] in set(states) | final else None

        run = _wait(
            f"flow run {run_id} reaching {states}",
            reached,
            timeout,
            interval=1,
            proc=worker and worker[0],
            log=worker and worker[1],
        )
        assert run["state_type"] in states, (run["state"], self.logs(run_id)[-20:])
        return run

    def create_run(self, deployment: str, config: PipelineConfig) -> str:
        """A flow run of the deployment through the REST API, as the UI creates one."""
        return self.create_run_with(deployment, {"config": config.model_dump(mode="json")})

    def create_run_with(self, deployment: str, parameters: dict) -> str:
        run = self.post(
            f"/deployments/{self.deployment(deployment)['id']}/create_flow_run",
            {"parameters": parameters},
        )
        return run["id"]

    def wait_event(self, name: str, run_id: str, timeout: float) -> dict:
        def emitted():
            page = self.post(
                "/events/filter",
                {
                    "filter": {
                        "event": {"name": [name]},
                        "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
                    },
                    "limit": 10,
                },
            )
            return page["events"]

        return _wait(f"event {name} of flow run {run_id}", emitted, timeout, interval=1)[0]

    def trigger(self, deployment: str, config: PipelineConfig) -> str:
        """A flow run of the deployment started with ``prefect deployment run``."""
        params = json.dumps({"config": config.model_dump(mode="json")})
        out = self.cli("deployment", "run", f"{FLOW}/{deployment}", "--params", params).stdout
        (line,) = [line for line in out.splitlines() if "UUID:" in line]
        return line.split("UUID:")[1].strip()


@pytest.fixture(scope="module")
def prefect(tmp_path_factory) -> Iterator[Prefect]:
    root = tmp_path_factory.mktemp("prefect-server")
    server = Prefect(root)
    log = root / "server.log"
    with _started(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(server.port),
        ],
        server.env,
        log,
    ) as proc:

        def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return server.http.get("/health", timeout=5).status_code == 200
            return False

        _wait("prefect server start", healthy, timeout=300, proc=proc, log=log)
        try:
            yield server
        finally:
            server.http.close()


@pytest.fixture(scope="module")
def worker(prefect):
    """The process work pool, both deployments from prefect.yaml, and a worker polling the pool."""
    pool = _specs()["influence-adhoc"]["work_pool"]["name"]
    prefect.cli("work-pool", "create", pool, "--type", "process")
    log = prefect.root / "worker.log"
    with _started(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool], prefect.env, log
    ) as proc:
        # as docs/deployments.md says: from the repository root (the entrypoints are relative to it)
        deployed = prefect.cli(
            "deploy", "--all", "--prefect-file", str(PREFECT_FILE.relative_to(REPO))
        )
        for name in _specs():
            flow = FLOWS[name][0]
            assert prefect.request("GET", f"/deployments/name/{flow}/{name}").status_code == 200, (
                deployed.stdout
            )
        yield proc, log


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return write_inputs(tmp_path_factory.mktemp("deploy-inputs"))


@dataclass
class Runs:
    reference: str  # flow run id, left alone
    reference_config: PipelineConfig
    killed: str  # flow run id, SIGKILLed mid-way
    killed_config: PipelineConfig
    done: set  # blocks the killed run had finished


def _flow_run_process(worker_pid: int, run_id: str) -> Optional[psutil.Process]:
    for child in psutil.Process(worker_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                return child
    return None


@pytest.fixture(scope="module")
def runs(prefect, worker, inputs, tmp_path_factory) -> Runs:
    """Two runs of the same job at once, on separate outputs: one started with ``prefect
    deployment run`` and left alone; one created through the API (as the UI's Run button does)
    and SIGKILLed, flow process and Dask workers, once some of its blocks are stored."""
    outputs = [
        tmp_path_factory.mktemp(name) / "out" for name in ("deploy-reference", "deploy-killed")
    ]
    reference_config, killed_config = (job_config(inputs, str(out), **JOB) for out in outputs)
    reference = prefect.trigger("influence-adhoc", reference_config)
    killed = prefect.create_run("influence-adhoc", killed_config)
    records = outputs[1] / "records" / "influences"

    def some_blocks_done():
        return records.is_dir() and len(list(records.glob("*.json"))) >= 2

    _wait(
        "blocks of the run to kill",
        some_blocks_done,
        timeout=400,
        interval=0.05,
        proc=worker[0],
        log=worker[1],
    )
    engine = _flow_run_process(worker[0].pid, killed)
    assert engine is not None, "the worker's flow-run process was not found"
    assert os.getpgid(engine.pid) == engine.pid  # a group of its own: the worker survives
    family = [engine, *engine.children(recursive=True)]
    os.killpg(engine.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive
    store = InfluenceStore(killed_config.output)
    grid = store.planned_manifest().grid
    done = {ix for ix in store.recorded("influences") if store.chunk_done("influences", grid, ix)}
    assert 2 <= len(done) < N_BLOCKS, f"{len(done)} blocks done: kill earlier"
    return Runs(reference, reference_config, killed, killed_config, done)


# -- against the server ----------------------------------------------------------------------------
def test_deployments_registered(prefect, worker):
    specs = _specs()
    for name, spec in specs.items():
        d = prefect.deployment(name)
        assert d["work_pool_name"] == spec["work_pool"]["name"]
        assert d["enforce_parameter_schema"] is True
        assert (d["description"], d["tags"], d["parameters"]) == (
            spec["description"],
            spec["tags"],
            spec.get("parameters") or {},
        )
        assert d["entrypoint"] == spec["entrypoint"]
        (pull,) = d["pull_steps"]  # the checkout prefect deploy ran in
        assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    (schedule,) = prefect.deployment("influence-nightly")["schedules"]
    cron = specs["influence-nightly"]["schedules"][0]
    assert schedule["active"] and (
        schedule["schedule"]["cron"],
        schedule["schedule"]["timezone"],
    ) == (cron["cron"], cron["timezone"])
    assert not prefect.deployment("influence-adhoc")["schedules"]

    # the scheduler plans the nightly runs at the wall-clock time of the deployment's time zone
    def planned():
        return prefect.post(
            "/flow_runs/filter",
            {
                "deployments": {"id": {"any_": [prefect.deployment("influence-nightly")["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            },
        )

    runs = _wait("nightly runs scheduled", planned, timeout=60)
    minute, hour = cron["cron"].split()[:2]
    for run in runs:
        local = datetime.fromisoformat(run["expected_start_time"]).astimezone(
            ZoneInfo(cron["timezone"])
        )
        assert (local.hour, local.minute) == (int(hour), int(minute))


def test_run_from_cli_completes_with_outputs_and_artifacts(prefect, worker, runs):
    run_id, config = runs.reference, runs.reference_config
    prefect.wait_state(run_id, {"COMPLETED"}, timeout=400, worker=worker)
    result = prefect.run_result(run_id)
    assert result["grid"] == [2, 12]
    assert (result["blocks_computed"], result["blocks_reused"]) == (N_BLOCKS, 0)
    got = read_outputs(config.output)
    assert got["influences"].shape == (40, 240) and not np.isnan(got["influences"]).any()
    assert got["top_helpful"].shape == (40, config.top_k)
    by_key = {a["key"]: a for a in prefect.artifacts(run_id) if a["key"]}
    assert {"influence-top-k", "influence-summary"} <= set(by_key)
    table = by_key["influence-top-k"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert table[0]["most_helpful"] == ", ".join(map(str, got["top_helpful"][0].tolist()))
    assert f"blocks: {N_BLOCKS} computed, 0 reused" in by_key["influence-summary"]["data"]
    grid_runs = prefect.post(
        "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
    )
    progress = [a for r in grid_runs for a in prefect.artifacts(r["id"]) if a["type"] == "progress"]
    assert progress and max(float(a["data"]) for a in progress) == 100.0


def test_query_deployment_ranks_like_the_finished_grid(prefect, worker, runs, inputs):
    """A run of influence-query, as the UI's form creates one, on the finished reference
    output: the job's own test points get the grid's top-k back, shown as a table artifact
    and (8 × 8 inputs) a picture; a top_k of 0 is refused before a run is created."""
    prefect.wait_state(runs.reference, {"COMPLETED"}, timeout=400, worker=worker)
    output = runs.reference_config.output
    query = {"output": output, "test": inputs["test"], "top_k": 3}
    run_id = prefect.create_run_with("influence-query", {"query": query})
    prefect.wait_state(run_id, {"COMPLETED"}, timeout=300, worker=worker)
    result = prefect.run_result(run_id)
    grid = read_outputs(output)
    assert result["features"] == "gradients" and result["n_query"] == 40
    got = np.array([[e["train_index"] for e in point["helpful"]] for point in result["top"]])
    np.testing.assert_array_equal(got, grid["top_helpful"][:, :3])
    by_key = {a["key"]: a for a in prefect.artifacts(run_id) if a["key"]}
    assert {"influence-query", "influence-query-picture"} <= set(by_key)
    assert "data:image/png;base64," in by_key["influence-query-picture"]["data"]
    deployment = prefect.deployment("influence-query")
    response = prefect.request(
        "POST",
        f"/deployments/{deployment['id']}/create_flow_run",
        {"parameters": {"query": {**query, "top_k": 0}}},
    )
    assert response.status_code in (409, 422), response.text


def test_killed_run_crashes(prefect, runs):
    run = prefect.wait_state(runs.killed, {"CRASHED"}, timeout=120)
    assert "SIGKILL" in run["state"]["message"] or "-9" in run["state"]["message"]


def test_parameter_schema_from_api(prefect, worker):
    schema = prefect.deployment("influence-adhoc")["parameter_openapi_schema"]
    defs = schema["definitions"]
    config = schema["properties"]["config"]
    assert config["default"] == PipelineConfig().model_dump(mode="json")
    assert defs["Method"]["enum"] == [m.value for m in Method]
    assert defs["SecondOrderName"]["enum"] == [m.value for m in SecondOrderName]
    blocks = defs["MethodSpec"]["properties"]["block_structure"]["anyOf"]
    assert {"$ref": "#/definitions/BlockModeName"} in blocks  # a drop-down, or a mapping
    for name in ("PipelineConfig", "ModelSpec", "DataSpec", "MethodSpec"):
        for field, prop in defs[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert defs["MethodSpec"]["properties"]["name"]["default"] == "arnoldi"
    assert defs["PipelineConfig"]["properties"]["output"]["title"] == "Output URL"


@pytest.mark.parametrize(
    "bad",
    [
        {"method": {"name": "nonsense"}},
        {"method": {"rank": 0}},
        {"top_k": "many"},
        {"unknown_field": 1},
        {"test_chunk_size": 0},
        {"train_chunk_size": -5},
        {"output": "/"},
        {"output": "memory://"},
        {"output": ""},
    ],
)
def test_invalid_parameters_are_rejected_before_a_run(prefect, worker, bad):
    deployment = prefect.deployment("influence-adhoc")
    response = prefect.request(
        "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": bad}}
    )
    assert response.status_code in (409, 422), response.text
    runs = prefect.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert all(r["parameters"].get("config") != bad for r in runs)


def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _browse(cmd: list[str], out: Path, timeout: float = 120) -> str:
    """Run headless Chromium to completion (or ``timeout``), then kill what it left behind."""
    with open(out, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(proc, grace=2)
    return out.read_text(errors="replace")


def test_ui_run_form_shows_the_parameters(prefect, worker, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium to render the UI (Debian: apt-get install -y chromium)")
    settings = httpx.get(f"{prefect.ui}/ui-settings", timeout=30).json()
    base = settings.get("v2_base_url") or settings.get("v1_base_url") or "/"
    deployment_id = prefect.deployment("influence-adhoc")["id"]
    url = f"{prefect.ui}{base.rstrip('/')}/deployments/deployment/{deployment_id}/run"
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,4000",
    ]
    titles = [field.title for _, field in _fields(PipelineConfig)]
    missing = titles

    def render() -> Optional[str]:
        nonlocal missing
        dom = _browse(
            [*flags, "--virtual-time-budget=20000", "--dump-dom", url], tmp_path / "dom.html"
        )
        missing = [title for title in titles if title not in dom]
        return None if missing else dom

    try:
        dom = _wait("the run form", render, timeout=240, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the run form at {url} lacks {missing}") from None
    assert 'aria-label="Select Method"' in dom or "<select" in dom  # an enum is a drop-down
    for text in (
        "builtin:digits",
        "arnoldi",
        "influence-output/run",
        "How the inverse Hessian is approximated.",
    ):
        assert text in dom
    shot = tmp_path / "run-form.png"
    _browse(
        [*flags, "--virtual-time-budget=20000", f"--screenshot={shot}", url],
        tmp_path / "screenshot.log",
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"screenshot of the run form: {shot}")


def test_retry_of_killed_run_resumes_and_equals_uninterrupted(prefect, worker, runs):
    run_id, config, done = runs.killed, runs.killed_config, runs.done
    prefect.wait_state(run_id, {"CRASHED"}, timeout=120)
    # The runner reports the crash at once; the worker reports it again when it is done with
    # the flow run, which can take a while (Prefect 3.9) and would overwrite an earlier retry.
    prefect.wait_event("prefect.worker.executed-flow-run", run_id, timeout=240)
    prefect.cli("flow-run", "retry", run_id)
    run = prefect.wait_state(run_id, {"COMPLETED"}, timeout=400, worker=worker)
    assert run["run_count"] >= 2
    result = prefect.run_result(run_id)
    assert result["fit_reused"] is True
    assert result["blocks_reused"] == len(done)
    assert result["blocks_computed"] == N_BLOCKS - len(done)
    summary = [a for a in prefect.artifacts(run_id) if a["key"] == "influence-summary"]
    assert f"blocks: {N_BLOCKS - len(done)} computed, {len(done)} reused" in summary[-1]["data"]
    prefect.wait_state(runs.reference, {"COMPLETED"}, timeout=400, worker=worker)
    expected = read_outputs(runs.reference_config.output)
    for name, values in read_outputs(config.output).items():
        assert np.array_equal(values, expected[name]), name


def test_serve_runs_both_deployments_from_one_process(prefect, worker, runs):
    """Last: serving registers the deployments prefect deploy made, under the same names. A
    deployment is either served or run by workers: the worker-run ones are deleted first."""
    prefect.wait_state(runs.reference, {"COMPLETED"}, timeout=400, worker=worker)
    registered = {name: prefect.deployment(name) for name in _specs()}
    for deployment in registered.values():
        prefect.request("DELETE", f"/deployments/{deployment['id']}").raise_for_status()
    log = prefect.root / "serve.log"
    with _started([str(BIN / "prefect-influence"), "serve"], prefect.env, log) as proc:

        def served():
            with contextlib.suppress(httpx.HTTPStatusError):  # 404 until registered
                return {name: prefect.deployment(name) for name in registered}
            return None

        now = _wait("prefect-influence serve registering", served, timeout=180, proc=proc, log=log)
        for name, before in registered.items():
            d = now[name]
            assert d["entrypoint"] == FLOWS[name][1]
            for key in (
                "description",
                "tags",
                "parameters",
                "enforce_parameter_schema",
                "parameter_openapi_schema",
            ):
                assert d[key] == before[key], key
            assert [s["schedule"] for s in d["schedules"]] == [
                s["schedule"] for s in before["schedules"]
            ]
            assert d["work_pool_name"] is None
        # a run of the served deployment: the same job again reuses every stored block
        run_id = prefect.create_run("influence-adhoc", runs.reference_config)
        prefect.wait_state(run_id, {"COMPLETED"}, timeout=400, worker=(proc, log))
        result = prefect.run_result(run_id)
        assert (result["blocks_computed"], result["blocks_reused"]) == (0, N_BLOCKS)
