"""Queries against a stored job: new points' top-k from the fitted model without touching the
grid, with gradients computed now or stored train features (exact or projected), equal to the
grid's rows for the job's own test points; bad input is refused and writes nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr
from jobs import job_config, read_outputs, write_inputs
from test_bad_config import tree_digest
from test_cli import cli
from test_stages import run_tasks

from prefect_influence import pipeline
from prefect_influence.errors import (
    ConfigurationError,
    NotFittedError,
    ShapeMismatchError,
)
from prefect_influence.pipeline import query_output
from prefect_influence.storage import InfluenceStore

PROJECTION_DIM = 256


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def outputs(inputs, tmp_path_factory):
    """The same job three times: without stored features, with exact and projected ones."""
    root = tmp_path_factory.mktemp("outputs")
    out = {}
    for kind in ("none", "exact", "projected"):
        config = job_config(
            inputs,
            str(root / kind),
            train_features=kind,
            projection_dim=PROJECTION_DIM,
            method={"name": "direct"},
        )
        run_tasks(config)
        out[kind] = config.output
    return out


def _assert_matches_grid(result, grid: dict, k: int) -> None:
    np.testing.assert_array_equal(result.arrays["top_helpful"], grid["top_helpful"][:, :k])
    np.testing.assert_array_equal(result.arrays["top_harmful"], grid["top_harmful"][:, :k])
    # float32: the query's products and the grid's blocks may round differently; 1e-5 of the
    # largest influence is ~100 ulps, far below any ranking-relevant difference
    scale = np.abs(grid["influences"]).max()
    for name in ("top_helpful_values", "top_harmful_values"):
        np.testing.assert_allclose(result.arrays[name], grid[name][:, :k], atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["none", "exact", "projected"])
def test_a_query_of_the_test_points_equals_the_grid(outputs, inputs, kind):
    out = outputs[kind]
    grid = read_outputs(out)
    before = tree_digest_of(out)
    result = query_output(out, inputs["test"], top_k=5, full_rows=kind != "projected")
    assert result.features == {"none": "gradients"}.get(kind, kind) and result.exact
    _assert_matches_grid(result, grid, 5)
    if result.rows is not None:
        scale = np.abs(grid["influences"]).max()
        np.testing.assert_allclose(result.rows, grid["influences"], atol=1e-5 * scale)
    assert tree_digest_of(out) == before  # the output is not touched


def tree_digest_of(url: str) -> dict:
    from pathlib import Path

    return tree_digest(Path(url))


def test_features_are_stored_once_per_train_chunk(outputs):
    for kind, width in (("exact", None), ("projected", PROJECTION_DIM)):
        status = InfluenceStore(outputs[kind]).status()
        features = status["train_features"]
        assert features["kind"] == kind and features["recorded"] == features["total"] == 6
        array = zarr.open_group(outputs[kind], mode="r")["train_features"]
        assert array.shape == (240, width or status["manifest"].grid.n_parameters)
    assert "train_features" not in InfluenceStore(outputs["none"]).status()


def test_projected_scores_meet_the_documented_error(outputs, inputs):
    """A count sketch of dimension d estimates ⟨f, g⟩ with a standard deviation of at most
    √(2/d)·‖f‖‖g‖ (docs/pipeline.md#queries); over 9,600 pairs the measured RMS of the
    normalised error stays within 1.2× that bound (the bound is loose: sampling noise of the
    RMS over this many pairs is a few per cent)."""
    exact = query_output(outputs["exact"], inputs["test"], full_rows=True)
    estimated = query_output(outputs["projected"], inputs["test"], full_rows=True, refine=False)
    assert estimated.features == "projected" and not estimated.exact
    store = InfluenceStore(outputs["exact"])
    grid = store.planned_manifest().grid
    grads = np.vstack([store.read_chunk("train_features", grid, (j,)) for j in range(6)])
    factors = np.asarray(zarr.open_group(outputs["exact"], mode="r")["factors"][...])
    norms = np.outer(np.linalg.norm(factors, axis=1), np.linalg.norm(grads, axis=1))
    error = (estimated.rows - exact.rows) / norms
    rms = float(np.sqrt(np.mean(error**2)))
    assert rms <= 1.2 * math.sqrt(2 / PROJECTION_DIM), rms


def test_another_projection_dimension_replaces_the_stored_features(outputs, inputs, tmp_path):
    out = str(tmp_path / "out")
    config = job_config(inputs, out, train_features="projected", projection_dim=64)
    run_tasks(config)
    counts = run_tasks(config.model_copy(update={"projection_dim": 32}))
    assert counts == {"computed": 0, "reused": 12}  # the blocks stay
    features = InfluenceStore(out).status()["train_features"]
    assert (features["width"], features["recorded"]) == (32, 6)


def test_bad_queries_are_refused_and_write_nothing(outputs, inputs, tmp_path):
    out = outputs["exact"]
    before = tree_digest_of(out)
    with pytest.raises(ConfigurationError, match="top_k must be a positive integer"):
        query_output(out, inputs["test"], top_k=0)
    wide = tmp_path / "wide.zarr"
    group = zarr.open_group(str(wide), mode="w")
    group.create_array("x", data=np.zeros((3, 65), dtype=np.float32))
    group.create_array("y", data=np.zeros(3, dtype=np.int64))
    with pytest.raises(ShapeMismatchError, match=r"\(65,\).*\(64,\)"):
        query_output(out, str(wide))
    with pytest.raises(ConfigurationError, match="holds no prefect-influence output"):
        query_output(str(tmp_path / "nothing"), inputs["test"])
    assert tree_digest_of(out) == before
    planned = str(tmp_path / "planned")  # planned, never fitted
    pipeline.plan_job(job_config(inputs, planned))
    planned_before = tree_digest_of(planned)
    with pytest.raises(NotFittedError, match="no fitted influence model"):
        query_output(planned, inputs["test"])
    assert tree_digest_of(planned) == planned_before


def test_query_from_the_command_line(outputs, inputs, tmp_path):
    out = outputs["projected"]
    rows = tmp_path / "rows.npy"
    proc, _ = cli(
        "query", out, "--test", inputs["test"], "--top-k", "4", "--json", "--rows-out", str(rows)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["features"] == "projected" and result["exact"] and result["k"] == 4
    grid = read_outputs(out)
    got = [[e["train_index"] for e in point["harmful"]] for point in result["top"]]
    np.testing.assert_array_equal(np.array(got), grid["top_harmful"][:, :4])
    assert np.load(rows).shape == (40, 240)
    picture = tmp_path / "query.png"
    text, _ = cli("query", out, "--test", inputs["test"], "--picture", str(picture))
    assert text.returncode == 0 and "most helpful" in text.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad, _ = cli("query", out, "--test", inputs["test"], "--top-k", "-1")
    assert bad.returncode == 2 and bad.stderr.count("\n") <= 2, bad.stderr
    assert "top_k must be a positive integer" in bad.stderr and "Traceback" not in bad.stderr
