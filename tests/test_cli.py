"""The command line as a person meets it: typical mistakes in a job file are refused in one
line (exit status 2, no traceback) before Prefect or Dask start, and leave a finished output
byte-identical; ``--debug`` and genuine bugs show tracebacks; ``plan`` and ``run --dry-run``
say what a run would do without doing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from jobs import job_config, write_inputs
from test_bad_config import tree_digest
from test_stages import run_tasks

TESTS = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "prefect-influence")
#: a refusal is measured at well under 2 s by benchmarks/cli_errors.py; here only bounded
#: loosely, since a loaded 2-core machine runs the same commands several times slower
LOOSE_SECONDS = 20


def cli(*args: str, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("PREFECT_API_URL", None)  # a refusal must come before any server would start
    env.pop("PREFECT_INFLUENCE_DEBUG", None)
    env.update(env_extra or {})
    start = time.perf_counter()
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    inputs = write_inputs(root / "inputs")
    out = root / "out"
    config = job_config(inputs, str(out))
    run_tasks(config)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return root, inputs, out, config


def _zarr(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("x", data=x)
    if y is not None:
        group.create_array("y", data=y)
    return str(path)


def _x(n=10, d=64):
    return np.random.default_rng(1).random((n, d), dtype=np.float32)


def _labels(n=10, value=0, dtype=np.int64):
    return np.full(n, value, dtype)


def _nan_x():
    x = _x()
    x[3, 5] = np.nan
    return x


def _not_a_checkpoint(root: Path) -> str:
    (root / "model.txt").write_text("these are not weights")
    return str(root / "model.txt")


#: (name, overrides of the finished job's configuration as a function of a scratch folder,
#: what the one error line must say)
MISTAKES = [
    (
        "test_63_features",
        lambda r: {"data": {"test": _zarr(r / "t.zarr", _x(10, 63), _labels())}},
        "shape",
    ),
    (
        "float_labels",
        lambda r: {"data": {"train": _zarr(r / "f.zarr", _x(), _labels(dtype=np.float32))}},
        "integer class labels",
    ),
    (
        "nan_in_train",
        lambda r: {"data": {"train": _zarr(r / "n.zarr", _nan_x(), _labels())}},
        "NaN or Inf",
    ),
    (
        "negative_regularization",
        lambda r: {"method": {"regularization": -1.0}},
        "method.regularization",
    ),
    ("misspelt_method", lambda r: {"method": {"name": "arnoldy"}}, "method.name"),
    ("chunk_size_zero", lambda r: {"test_chunk_size": 0}, "test_chunk_size"),
    (
        "not_a_checkpoint",
        lambda r: {"model": {"checkpoint": _not_a_checkpoint(r)}},
        "cannot be loaded|not a plain state_dict",
    ),
    (
        "empty_test_set",
        lambda r: {"data": {"test": _zarr(r / "e.zarr", _x(0), _labels(0))}},
        "empty",
    ),
    (
        "data_without_y",
        lambda r: {"data": {"train": _zarr(r / "noy.zarr", _x(), None)}},
        "lacks arrays \\['y'\\]",
    ),
    (
        "labels_out_of_range",
        lambda r: {"data": {"train": _zarr(r / "l.zarr", _x(), _labels(value=12))}},
        "outside \\[0, 10\\)",
    ),
    ("another_configuration", lambda r: {"method": {"regularization": 0.5}}, "differs in: method"),
    ("missing_file", lambda r: {"data": {"train": str(r / "nope.npz")}}, "does not exist"),
]


def _job_file(finished, tmp_path: Path, overrides: dict) -> Path:
    root, inputs, out, _ = finished
    data = job_config(inputs, str(out)).model_dump(mode="json")
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name, make, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_with_status_2_and_the_output_untouched(
    finished, tmp_path, name, make, message
):
    import re

    out = finished[2]
    before = tree_digest(out)
    proc, seconds = cli("run", str(_job_file(finished, tmp_path, make(tmp_path))))
    errors = [
        line for line in proc.stderr.splitlines() if line.startswith("prefect-influence: error:")
    ]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) <= 2  # the error and at most a hint
    assert seconds < LOOSE_SECONDS
    assert tree_digest(out) == before


def test_a_missing_job_file_is_one_line(tmp_path):
    proc, _ = cli("run", str(tmp_path / "no-such-job.yaml"))
    assert proc.returncode == 2 and "cannot be read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(finished, tmp_path):
    job = _job_file(finished, tmp_path, {"method": {"name": "arnoldy"}})
    proc, _ = cli("run", str(job), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc, _ = cli("run", str(job), env_extra={"PREFECT_INFLUENCE_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_genuine_bug_keeps_its_traceback(finished, tmp_path):
    job = _job_file(finished, tmp_path, {"model": {"factory": "jobs_models:broken"}})
    proc, _ = cli("run", str(job))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr


def test_plan_on_a_finished_output_reuses_every_block(finished):
    root, _, out, config = finished
    before = tree_digest(out)
    proc, _ = cli("plan", str(root / "job.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["action"] == "resume" and plan["grid"] == [2, 6] and plan["blocks"] == 12
    stored = plan["stored"]
    assert stored["blocks"] == [12, 12] and stored["factors"] == [2, 2] and stored["fitted"]
    assert plan["estimate"]["seconds"]["total"] > 0 and plan["estimate"]["worker_bytes"] > 0
    assert tree_digest(out) == before
    text, _ = cli("plan", str(root / "job.yaml"))
    assert "12 of 12 blocks" in text.stdout and "estimate" in text.stdout


def test_a_dry_run_on_a_new_output_writes_nothing(finished, tmp_path):
    root = finished[0]
    out = tmp_path / "new-out"
    proc, _ = cli("run", str(root / "job.yaml"), "--output", str(out), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["action"] == "new" and plan["stored"]["blocks"] == [0, 12]
    assert not out.exists()


def _catalogue():
    from test_bad_config import CASES

    return CASES


@pytest.mark.parametrize(
    "make, error, message", _catalogue(), ids=[c[0].__name__[5:] for c in _catalogue()]
)
def test_the_bad_input_catalogue_is_one_line_from_the_command_line(
    finished, tmp_path, make, error, message
):
    """Every case of the bad-input catalogue, as a job file: status 2, the catalogue's message
    in one line, no traceback, the finished output untouched."""
    import re

    root, inputs, out, _ = finished
    before = tree_digest(out)
    overrides = make(tmp_path, inputs)
    output = overrides.pop("output", str(out))
    config = job_config(inputs, output, **overrides).model_dump(mode="json")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    proc, _ = cli("run", str(job))
    errors = [
        line for line in proc.stderr.splitlines() if line.startswith("prefect-influence: error:")
    ]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert tree_digest(out) == before
