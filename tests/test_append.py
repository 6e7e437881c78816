"""Test rows appended to a finished job: only the new rows' factors and blocks are computed,
and the output is byte for byte the output of the job run on the whole test set at once."""

from __future__ import annotations

import numpy as np
import pytest
from jobs import N_TEST, job_config, read_outputs, write_inputs, write_test_head
from test_stages import run_tasks

from prefect_influence import pipeline
from prefect_influence.errors import ConfigMismatchError
from prefect_influence.storage import InfluenceStore


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    paths = write_inputs(root)
    # 30 rows end in a partial test chunk (chunks of 20), 20 rows in a whole one
    paths["head-30"] = write_test_head(paths, 30, root)
    paths["head-20"] = write_test_head(paths, 20, root)
    return paths


@pytest.fixture(scope="module")
def from_scratch(inputs, tmp_path_factory):
    """The job on all test rows at once."""
    config = job_config(inputs, str(tmp_path_factory.mktemp("scratch") / "out"))
    run_tasks(config)
    return read_outputs(config.output)


def _with_test(inputs, test, output, **overrides):
    return job_config({**inputs, "test": inputs[test]}, output, **overrides)


def assert_same_bytes(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert got[name].shape == values.shape, name
        assert np.array_equal(got[name], values, equal_nan=True), name


@pytest.mark.parametrize(
    "head, rows_recomputed",
    [("head-30", 1), ("head-20", 1)],  # a grown partial chunk is computed again, whole
    ids=["partial-last-chunk", "whole-chunks"],
)
def test_append_computes_only_new_rows_and_equals_a_full_run(
    inputs, from_scratch, tmp_path, head, rows_recomputed
):
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, head, out))
    store = InfluenceStore(out)
    before = store.planned_manifest()
    full = _with_test(inputs, "test", out)
    assert pipeline.survey_job(full).action == "append"
    planned = pipeline.plan_job(full)
    assert planned.action == "append" and planned.grid.n_test == N_TEST
    assert planned.manifest.inherits == (before.id,)
    assert pipeline.fit_stage(full) is True  # the fitted state is reused
    reused_factors = [pipeline.factors_stage(full, i) for i in range(planned.grid.shape[0])]
    assert reused_factors == [True, False]
    counts = run_tasks(full)
    n_cols = planned.grid.shape[1]
    assert counts == {"computed": rows_recomputed * n_cols, "reused": n_cols}
    assert_same_bytes(read_outputs(out), from_scratch)
    # an independent count of what the append computed: blocks under the new manifest
    new_records = [
        ix
        for ix in store.recorded("influences")
        if store._read_json(store._record_path("influences", ix))["plan"] == planned.manifest.id
    ]
    assert len(new_records) == rows_recomputed * n_cols
    assert all(i == 1 for i, _ in new_records)
    assert run_tasks(full) == {"computed": 0, "reused": 2 * n_cols}


def test_an_interrupted_append_resumes_to_the_same_bytes(inputs, from_scratch, tmp_path):
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    full = _with_test(inputs, "test", out)
    planned = pipeline.plan_job(full)
    pipeline.fit_stage(full)
    for i in range(planned.grid.shape[0]):
        pipeline.factors_stage(full, i)
    pipeline.column_stage(full, 0)  # then the run stops
    assert read_outputs(out).keys() >= {"top_helpful"}  # the old summary is still there
    counts = run_tasks(full)
    assert counts == {"computed": 5, "reused": 7}
    assert_same_bytes(read_outputs(out), from_scratch)


def test_append_after_the_arrays_grew_but_before_anything_else(inputs, from_scratch, tmp_path):
    """A run stopped right after planning the append resumes it (the manifest is the commit)."""
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    full = _with_test(inputs, "test", out)
    pipeline.plan_job(full)
    assert pipeline.survey_job(full).action == "resume"
    assert run_tasks(full)["computed"] == 6
    assert_same_bytes(read_outputs(out), from_scratch)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"method": {"regularization": 0.5}}, "method"),
        ({"test_chunk_size": 10}, "test_chunk"),
    ],
)
def test_append_with_anything_else_changed_is_refused(inputs, tmp_path, change, match):
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    before = read_outputs(out)
    with pytest.raises(ConfigMismatchError, match=match):
        pipeline.plan_job(_with_test(inputs, "test", out, **change))
    assert_same_bytes(read_outputs(out), before)


def test_a_changed_training_set_or_model_is_refused(inputs, tmp_path):
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    before = read_outputs(out)
    other = write_inputs(tmp_path / "other", seed=1)
    with pytest.raises(ConfigMismatchError, match="train"):
        pipeline.plan_job(_with_test({**inputs, "train": other["train"]}, "test", out))
    with pytest.raises(ConfigMismatchError, match="model"):
        pipeline.plan_job(_with_test({**inputs, "checkpoint": other["checkpoint"]}, "test", out))
    assert_same_bytes(read_outputs(out), before)


def test_a_test_set_that_does_not_start_with_the_stored_one_is_refused(inputs, tmp_path):
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    before = read_outputs(out)
    other = write_inputs(tmp_path / "other", seed=1)  # 40 other rows
    with pytest.raises(ConfigMismatchError, match="nor starts with it"):
        pipeline.plan_job(_with_test({**inputs, "test": other["test"]}, "test", out))
    # fewer rows than stored: not an append either
    full = str(tmp_path / "full")
    run_tasks(_with_test(inputs, "test", full))
    with pytest.raises(ConfigMismatchError, match="nor starts with it"):
        pipeline.plan_job(_with_test(inputs, "head-30", full))
    assert_same_bytes(read_outputs(out), before)


def test_overwrite_with_appended_rows_still_appends(inputs, from_scratch, tmp_path):
    """Replacing would compute the same bytes again: a nightly job with ``overwrite`` (to
    replace its results after a retrain) appends the day's new test rows."""
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out))
    full = _with_test(inputs, "test", out, overwrite=True)
    assert pipeline.survey_job(full).action == "append"
    assert run_tasks(full) == {"computed": 6, "reused": 6}
    assert_same_bytes(read_outputs(out), from_scratch)


def test_plan_says_append_and_counts_what_is_kept(inputs, tmp_path):
    import json

    import yaml
    from test_bad_config import tree_digest
    from test_cli import cli

    out = tmp_path / "out"
    run_tasks(_with_test(inputs, "head-30", str(out)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with_test(inputs, "test", str(out)).model_dump(mode="json")))
    before = tree_digest(out)
    proc, _ = cli("plan", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["action"] == "append" and plan["n_test"] == N_TEST
    assert plan["stored"]["blocks"] == [6, 12] and plan["stored"]["factors"] == [1, 2]
    assert any("10 test rows follow the 30 stored ones" in w for w in plan["warnings"])
    assert tree_digest(out) == before  # planning an append writes nothing


def test_an_append_reads_stored_gradients_instead_of_computing_them(inputs, tmp_path, monkeypatch):
    # columns with stored features score from gradients, columns without from layer terms: the
    # same job on all test rows at once is the reference
    scratch = str(tmp_path / "scratch")
    run_tasks(_with_test(inputs, "test", scratch, train_features="exact"))
    out = str(tmp_path / "out")
    run_tasks(_with_test(inputs, "head-30", out, train_features="exact"))
    from prefect_influence.pipeline import stages

    def no_gradient_pass(*args, **kwargs):
        raise AssertionError("the train chunk's gradients were computed again")

    monkeypatch.setattr(stages, "train_operand", no_gradient_pass)
    counts = run_tasks(_with_test(inputs, "test", out, train_features="exact"))
    assert counts == {"computed": 6, "reused": 6}
    assert_same_bytes(read_outputs(out), read_outputs(scratch))
