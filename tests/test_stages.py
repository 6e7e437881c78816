"""Each pipeline task alone (``.fn``, Dask's synchronous scheduler, no cluster): results equal an
independent in-memory computation; resume skips valid chunks and redoes corrupt ones."""

from __future__ import annotations

import dataclasses

import dask
import numpy as np
import pytest
import torch
import zarr
from jobs import job_config, read_outputs, write_inputs

from prefect_influence import pipeline
from prefect_influence.errors import ConfigMismatchError, StorageError
from prefect_influence.pipeline.data import open_source
from prefect_influence.pipeline.network import build_influence_model, load_network
from prefect_influence.storage import FACTORS, InfluenceStore
from prefect_influence.tasks import (
    compute_factors,
    fit_model,
    influences_from_factors,
    write_summary,
)


def run_tasks(config) -> dict:
    """The flow's task sequence, called in-process through ``.fn``."""
    plan = pipeline.plan_job(config, n_workers=1)
    with dask.config.set(scheduler="synchronous"):
        fit_model.fn(config)
        for i in range(plan.grid.shape[0]):
            compute_factors.fn(config, i)
        counts = [influences_from_factors.fn(config, j) for j in range(plan.grid.shape[1])]
        write_summary.fn(config)
    return {
        "computed": sum(c["computed"] for c in counts),
        "reused": sum(c["reused"] for c in counts),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted run and an independent in-memory computation of the same job."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    config = job_config(inputs, out)
    counts = run_tasks(config)
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    model.load_fitted_state(InfluenceStore(out).read_fitted_state())
    x, y = (torch.from_numpy(a) for a in open_source(inputs["train"]).rows(0, 10**9))
    xt, yt = (torch.from_numpy(a) for a in open_source(inputs["test"]).rows(0, 10**9))
    expected = {
        "factors": model.influence_factors(xt, yt).numpy(),
        "influences": model.influences(xt, yt, x, y).numpy(),
        "self_influence": model.self_influences(x, y).numpy(),
    }
    return config, counts, read_outputs(out), expected


def test_tasks_alone_match_in_memory_computation(reference):
    config, counts, got, expected = reference
    assert counts == {"computed": 12, "reused": 0}  # 2 test chunks × 6 train chunks
    # float32: chunked and whole-matrix products may round differently; 1e-5 relative to the
    # largest entry is ~100 ulps of float32, far below any meaningful influence difference
    for name in ("factors", "influences", "self_influence"):
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5 * scale)


def test_tasks_match_the_sequential_calculator(reference, inputs):
    """The pipeline's blocks equal the library calculator's for the same fitted model."""
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_influence import NestedTorchCatAggregator, SequentialInfluenceCalculator

    config, _, got, _ = reference
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    model.load_fitted_state(InfluenceStore(config.output).read_fitted_state())
    x, y = (torch.from_numpy(a) for a in open_source(inputs["train"]).rows(0, 10**9))
    xt, yt = (torch.from_numpy(a) for a in open_source(inputs["test"]).rows(0, 10**9))
    calc = SequentialInfluenceCalculator(model)
    values = (
        calc.influences(
            DataLoader(TensorDataset(xt, yt), batch_size=20),
            DataLoader(TensorDataset(x, y), batch_size=40),
        )
        .compute(aggregator=NestedTorchCatAggregator())
        .numpy()
    )
    # same chunking as the pipeline's grid: the same products, so equal up to float32 rounding
    np.testing.assert_allclose(
        got["influences"], values, rtol=1e-5, atol=1e-5 * np.abs(values).max()
    )


def test_summary_top_k_is_exact(reference):
    _, _, got, _ = reference
    values = got["influences"]
    order = np.argsort(-values, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got["top_helpful"], order)
    np.testing.assert_array_equal(got["top_helpful_values"], np.take_along_axis(values, order, 1))
    order = np.argsort(values, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got["top_harmful"], order)


def test_summary_from_column_parts_equals_summary_from_blocks(reference, tmp_path):
    """The columns' own top-k lists merge to exactly the ranking of whole rows: with every
    part, with none (the summary reads the blocks), with one corrupt part, with ties."""
    import shutil

    config, _, got, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(config.output, out)
    copy = config.model_copy(update={"output": str(out)})
    store = InfluenceStore(str(out))
    grid = store.planned_manifest().grid
    assert all(store.read_summary_part(j, 5) is not None for j in range(grid.shape[1]))
    assert store.read_summary_part(0, 4) is None  # another k is not reused

    def summary_again() -> dict:
        store._remove("records/summary.json")
        pipeline.summary_stage(copy)
        return read_outputs(str(out))

    shutil.rmtree(out / "summary_parts" / "2")  # a lost part (its record stays) and a lost record
    (out / "records" / "summary_parts" / "4.json").unlink(missing_ok=True)
    again = summary_again()
    for name in ("top_helpful", "top_helpful_values", "top_harmful", "top_harmful_values"):
        np.testing.assert_array_equal(again[name], got[name])

    # ties across columns: equal values everywhere, the smaller training index must win
    for j in range(grid.shape[1]):
        for i in range(grid.shape[0]):
            t0, t1 = grid.test_ranges[i]
            s0, s1 = grid.train_ranges[j]
            store.write_chunk("influences", grid, (i, j), np.ones((t1 - t0, s1 - s0), np.float32))
        store._remove(f"records/summary_parts/{j}.json")
        pipeline.column_stage(copy, j)  # blocks reused, the part rebuilt from them
    tied = summary_again()
    np.testing.assert_array_equal(tied["top_helpful"], np.tile(np.arange(5), (grid.n_test, 1)))
    np.testing.assert_array_equal(tied["top_harmful"], np.tile(np.arange(5), (grid.n_test, 1)))


def test_without_summary_no_top_k_is_kept(inputs, reference, tmp_path):
    _, _, expected, _ = reference
    config = job_config(inputs, str(tmp_path / "out")).model_copy(update={"summary": False})
    plan = pipeline.plan_job(config, n_workers=1)
    fit_model.fn(config)
    for i in range(plan.grid.shape[0]):
        compute_factors.fn(config, i)
    for j in range(plan.grid.shape[1]):
        influences_from_factors.fn(config, j)
    store = InfluenceStore(config.output)
    assert all(store.read_summary_part(j, 5) is None for j in range(plan.grid.shape[1]))
    assert store.read_summary() is None
    np.testing.assert_array_equal(read_outputs(config.output)["influences"], expected["influences"])


def test_rerun_reuses_everything(reference):
    config, _, before, _ = reference
    assert run_tasks(config) == {"computed": 0, "reused": 12}
    after = read_outputs(config.output)
    for name in before:
        assert np.array_equal(before[name], after[name], equal_nan=True), name


def test_missing_and_corrupt_chunks_are_recomputed_bit_identically(inputs, reference, tmp_path):
    _, _, expected, _ = reference
    config = job_config(inputs, str(tmp_path / "out"))
    run_tasks(config)
    store = InfluenceStore(config.output)
    grid = store.planned_manifest().grid
    # a half-finished block: data written, record never made
    store._remove(store._record_path("influences", (1, 2)))
    # a truncated chunk file after completion
    chunk_file = tmp_path / "out" / "influences" / "c" / "0" / "4"
    assert chunk_file.exists()
    chunk_file.write_bytes(chunk_file.read_bytes()[:7])
    # a bit flip in a factors chunk
    factors_file = tmp_path / "out" / "factors" / "c" / "1" / "0"
    raw = bytearray(factors_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    factors_file.write_bytes(bytes(raw))
    status = store.status(verify=True)
    assert status["influences"]["corrupt"] == [[0, 4]]
    assert status["influences"]["recorded"] == 11
    assert status["factors"]["corrupt"] == [[1]]
    assert not store.chunk_done("factors", grid, (1,))
    counts = run_tasks(config)
    assert counts == {"computed": 2, "reused": 10}
    got = read_outputs(config.output)
    for name in expected:
        assert np.array_equal(got[name], expected[name], equal_nan=True), name


def test_changed_configuration_is_refused(inputs, reference):
    config, _, before, _ = reference
    changed = job_config(inputs, config.output, method={"regularization": 0.5})
    with pytest.raises(ConfigMismatchError, match="method"):
        pipeline.plan_job(changed)
    assert np.array_equal(read_outputs(config.output)["influences"], before["influences"])


def test_overwrite_replaces_a_different_configuration(inputs, tmp_path):
    out = str(tmp_path / "out")
    run_tasks(job_config(inputs, out))
    counts = run_tasks(job_config(inputs, out, method={"regularization": 0.5}, overwrite=True))
    assert counts["computed"] == 12
    assert InfluenceStore(out).read_manifest().fingerprint["method"]["regularization"] == 0.5


def test_foreign_non_empty_output_is_refused(inputs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigMismatchError, match="not empty"):
        pipeline.plan_job(job_config(inputs, str(tmp_path / "out")))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_memory_url_output(inputs, reference):
    _, _, expected, _ = reference
    url = "memory://stages-test/out"
    config = job_config(inputs, url)
    try:
        run_tasks(config)
        got = read_outputs(url)
        for name in expected:
            assert np.array_equal(got[name], expected[name], equal_nan=True), name
    finally:
        InfluenceStore(url).clear()


def test_perturbation_mode(inputs, tmp_path):
    config = job_config(inputs, str(tmp_path / "out"), mode="perturbation", self_influence=False)
    run_tasks(config)
    got = read_outputs(config.output)
    assert got["influences"].shape == (40, 240, 64)
    assert not np.isnan(got["influences"]).any()
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    model.load_fitted_state(InfluenceStore(config.output).read_fitted_state())
    x, y = (torch.from_numpy(a) for a in open_source(config.data.train).rows(0, 5))
    xt, yt = (torch.from_numpy(a) for a in open_source(config.data.test).rows(0, 3))
    want = model.influences(xt, yt, x, y, "perturbation").numpy()
    np.testing.assert_allclose(
        got["influences"][:3, :5], want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
    )


def test_background_writer_keeps_order_and_raises_a_failed_write():
    done = []

    def write(i):
        if i == 2:
            raise OSError("disk full")
        done.append(i)

    with pytest.raises(OSError, match="disk full"):
        with pipeline.resources.BackgroundWriter() as writer:
            for i in range(5):
                writer.submit(write, i)
    # the failure surfaced at the next submit; nothing after it was started, nothing before lost
    assert done == [0, 1]


@pytest.mark.parametrize(
    "n_train,n_test,p,workers",
    [
        (50_000, 2_000, 610, 2),
        (200_000, 5_000, 610, 2),
        (30_000, 2_000, 10_060, 1),
        (10, 7, 5, 4),
    ],
)
def test_auto_chunks_bound_blocks_and_split_test_rows_evenly(n_train, n_test, p, workers):
    train_chunk, test_chunk = pipeline.auto_chunk_sizes(n_train, n_test, p, workers)
    assert train_chunk * test_chunk * 4 <= pipeline.planning.MAX_BLOCK_BYTES or test_chunk == 1
    rows = -(-n_test // test_chunk)
    assert rows * test_chunk - n_test < rows  # the last row is at most one sample short
    assert train_chunk * p * 4 <= pipeline.planning.MAX_GRAD_BYTES
    # large train chunks are GEMM-friendly (a multiple of 64 rows); small jobs keep one chunk
    assert train_chunk % pipeline.planning.ALIGN_TRAIN_ROWS == 0 or train_chunk == n_train
    # every worker solves factors from the start, unless that makes chunks thinner than 128
    assert rows >= min(workers, -(-n_test // pipeline.planning.MIN_SPLIT_TEST_ROWS))


def test_summary_of_an_incomplete_grid_is_refused(inputs, tmp_path):
    """The summary task alone, before every column is done: it must not rank missing blocks
    (read as NaN) and record a summary that a later complete run would keep."""
    config = job_config(inputs, str(tmp_path / "out"))
    plan = pipeline.plan_job(config, n_workers=1)
    with dask.config.set(scheduler="synchronous"):
        fit_model.fn(config)
        for i in range(plan.grid.shape[0]):
            compute_factors.fn(config, i)
        influences_from_factors.fn(config, 0)
        with pytest.raises(StorageError, match=r"block \(0, 1\) is missing"):
            write_summary.fn(config)
    assert InfluenceStore(config.output).read_summary() is None


def test_overwrite_resume_keeps_the_stored_auto_chunks(inputs, tmp_path):
    """A same-configuration rerun with overwrite=True on fewer workers (auto chunks would split
    the test rows differently) resumes the stored grid instead of discarding it."""
    rng = np.random.default_rng(5)
    test_url = str(tmp_path / "test300.zarr")
    group = zarr.open_group(test_url, mode="w")
    group.create_array("x", data=rng.random((300, 64), dtype=np.float32))
    group.create_array("y", data=rng.integers(0, 10, 300).astype(np.int64))
    config = job_config(
        inputs,
        str(tmp_path / "out"),
        data={"test": test_url},
        test_chunk_size="auto",
        overwrite=True,
        summary=False,
        self_influence=False,
    )
    first = pipeline.plan_job(config, n_workers=2)
    assert first.grid.shape[0] == 2  # one test chunk per worker
    pipeline.fit_stage(config)
    pipeline.factors_stage(config, 0)
    again = pipeline.plan_job(config, n_workers=1)
    assert again.resumed and again.grid == first.grid
    assert InfluenceStore(config.output).chunk_done(FACTORS, again.grid, (0,))


def test_new_data_at_the_same_url_is_never_served_from_an_earlier_run(tmp_path):
    """The nightly re-scoring case in one process: the training data changes at the same URL
    and the next run overwrites the output. It must fingerprint and compute the new data, as a
    run to a fresh output does (sources and job contexts belong to one state of the output)."""
    inputs = write_inputs(tmp_path / "inputs")
    config = job_config(inputs, str(tmp_path / "out"), overwrite=True)
    run_tasks(config)
    before = read_outputs(config.output)
    group = zarr.open_group(inputs["train"], mode="a")
    group["x"][...] = np.random.default_rng(9).random(group["x"].shape, dtype=np.float32)
    assert run_tasks(config) == {"computed": 12, "reused": 0}
    fresh = job_config(inputs, str(tmp_path / "fresh"))
    run_tasks(fresh)
    got, want = read_outputs(config.output), read_outputs(fresh.output)
    assert not np.array_equal(got["influences"], before["influences"])
    for name in want:
        assert np.array_equal(got[name], want[name], equal_nan=True), name


def test_a_worker_context_follows_the_output_manifest(inputs, tmp_path):
    """A long-lived process (an external cluster's worker) keeps one context per job while the
    output's manifest stays, and builds a new one when another process re-plans the output."""
    config = job_config(inputs, str(tmp_path / "out"))
    pipeline.plan_job(config, n_workers=1)
    ctx = pipeline.context.job_context(config)
    assert pipeline.context.job_context(config) is ctx
    store = InfluenceStore(config.output)
    store.write_manifest(dataclasses.replace(store.read_manifest(), created="a later plan"))
    assert pipeline.context.job_context(config) is not ctx


def test_tasks_of_a_replaced_run_stop_instead_of_writing(inputs, tmp_path):
    """Run A is planned; run B replaces the output with another configuration (overwrite, or
    a forced takeover after A's lease lapsed). A's queued tasks must refuse to write A's
    blocks into B's arrays, where B's completion checks would accept them."""
    a = job_config(inputs, str(tmp_path / "out"), self_influence=False)
    pipeline.plan_job(a, n_workers=1)
    pipeline.fit_stage(a)
    b = job_config(inputs, str(tmp_path / "out"), method={"regularization": 0.5}, overwrite=True)
    pipeline.plan_job(b, n_workers=1)
    for stage in (
        lambda: pipeline.fit_stage(a),
        lambda: pipeline.factors_stage(a, 0),
        lambda: pipeline.column_stage(a, 0),
        lambda: pipeline.summary_stage(a),
    ):
        with pytest.raises(ConfigMismatchError, match="differs in: method"):
            stage()
    store = InfluenceStore(b.output)
    assert store.read_fitted_state() is None and not store.recorded(FACTORS)


def test_a_late_write_of_a_replaced_run_never_counts_for_the_new_one(inputs, tmp_path):
    """A task of run A already past its checks when run B replaced the output (another
    configuration): its write lands in B's arrays, with a record B must not accept, whether a
    block, a factor chunk or a fitted state (B would reuse A's model for everything)."""
    a = job_config(inputs, str(tmp_path / "out"), self_influence=False)
    plan_a = pipeline.plan_job(a, n_workers=1)
    pipeline.fit_stage(a)
    ctx_a = pipeline.context.job_context(a)  # A's worker, before B
    factors_a = ctx_a.model.influence_factors(*ctx_a.rows("test", *plan_a.grid.test_ranges[0]))
    b = job_config(inputs, str(tmp_path / "out"), method={"regularization": 0.5}, overwrite=True)
    plan_b = pipeline.plan_job(b, n_workers=1)
    ctx_a.store.write_chunk(FACTORS, plan_a.grid, (0,), factors_a.numpy())  # A's late writes
    ctx_a.store.write_fitted_state(ctx_a.model.fitted_state())
    store_b = InfluenceStore(b.output)
    assert store_b.read_fitted_state() is None
    assert not store_b.chunk_done(FACTORS, plan_b.grid, (0,))
    assert pipeline.fit_stage(b) is False and pipeline.factors_stage(b, 0) is False  # computed anew
    assert not np.array_equal(
        InfluenceStore(b.output).read_chunk(FACTORS, plan_b.grid, (0,)), factors_a.numpy()
    )


def test_every_job_field_enters_the_fingerprint():
    """A field added to the job section without a place in the fingerprint would let two
    different jobs share one output: the mapping must cover the section exactly."""
    from prefect_influence.config import JobSpec
    from prefect_influence.pipeline.planning import FINGERPRINTED, fingerprint
    from prefect_influence.storage import Grid

    assert set(FINGERPRINTED) == set(JobSpec.model_fields)
    grid = Grid(4, 6, 2, 3, 10, (8,), "up", "float32")
    entries = fingerprint(JobSpec(), "model-fp", "train-fp", "test-fp", grid)
    assert set(entries) == {key for keys in FINGERPRINTED.values() for key in keys}


@pytest.mark.parametrize(
    "method",
    [
        {"name": "datainf", "block_structure": "layer_wise", "regularization": 0.1},
        {
            "name": "cg",
            "second_order_mode": "gauss_newton",
            "block_structure": {"hidden": ["0.weight", "0.bias"], "head": ["2.weight", "2.bias"]},
        },
        {"name": "direct", "second_order_mode": "generalized_gauss_newton"},
        {"name": "ekfac", "fisher": "sampled", "fisher_samples": 2, "fisher_seed": 3},
    ],
    ids=["datainf-layer-wise", "cg-gauss-newton-blocks", "direct-ggn", "ekfac-sampled"],
)
def test_curvature_and_block_settings_reach_the_stored_numbers(inputs, method, tmp_path):
    """The job's tasks give what the library gives with the same settings; the settings enter
    the fingerprint, so the same output with the default curvature is another job."""
    config = job_config(inputs, str(tmp_path / "out"), method=method, self_influence=False)
    run_tasks(config)
    got = read_outputs(config.output)
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    model.fit([tuple(torch.from_numpy(a) for a in open_source(config.data.train).rows(0, 240))])
    x, y = (torch.from_numpy(a) for a in open_source(config.data.train).rows(0, 240))
    xt, yt = (torch.from_numpy(a) for a in open_source(config.data.test).rows(0, 40))
    want = model.influences(xt, yt, x, y).numpy()
    # float32 job: the fit's batches and the solve's order of summation differ from the
    # in-memory model's, so agreement is to float32 rounding of an ill-conditioned solve
    np.testing.assert_allclose(got["influences"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    default = job_config(inputs, config.output, method={"name": method["name"]})
    with pytest.raises(ConfigMismatchError, match="differs in: method"):
        pipeline.plan_job(default)


def test_default_curvature_and_blocks_keep_earlier_fingerprints():
    """Outputs written before the curvature and block settings existed resume unchanged."""
    from prefect_influence.config import MethodSpec

    assert set(MethodSpec().fingerprinted()) == set(MethodSpec.model_fields) - {
        "second_order_mode",
        "block_structure",
        "fisher",
        "fisher_samples",
        "fisher_seed",
    }
    assert MethodSpec(name="ekfac", fisher="sampled").fingerprinted()["fisher_samples"] == 1
    assert MethodSpec(block_structure="layer_wise").fingerprinted()["block_structure"] == (
        "layer_wise"
    )


def test_ekfac_columns_score_layer_by_layer_as_the_library_does(inputs, tmp_path):
    """EK-FAC's column tasks score from layer inputs and output gradients, without per-sample
    gradients: blocks and self-influences equal the library's on the same fit."""
    config = job_config(inputs, str(tmp_path / "out"), method={"name": "ekfac"})
    run_tasks(config)
    got = read_outputs(config.output)
    model, x, y = _assert_library_influences(config, got["influences"])
    own = model.self_influences(x, y).numpy()
    np.testing.assert_allclose(got["self_influence"], own, rtol=1e-4, atol=1e-4 * own.max())


def _assert_library_influences(config, got: np.ndarray):
    """The job's influences equal the library's on the same fit; returns the fitted model and
    the training data."""
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    x, y = (torch.from_numpy(a) for a in open_source(config.data.train).rows(0, 240))
    xt, yt = (torch.from_numpy(a) for a in open_source(config.data.test).rows(0, 40))
    model.fit([(x, y)])
    want = model.influences(xt, yt, x, y).numpy()
    # float32; the factors' and scores' sums run in another order than the library's
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return model, x, y


def _factory_config(inputs, tmp_path, factory: str = "small_conv", **method):
    """A job on a network of ``jobs_models`` (by default ``small_conv``: two convolutions and a
    Linear layer) with its initial weights, output ``tmp_path / "out"``."""
    import jobs_models

    checkpoint = tmp_path / f"{factory}.pt"
    torch.save(getattr(jobs_models, factory)().state_dict(), checkpoint)
    model = {
        "factory": f"jobs_models:{factory}",
        "factory_kwargs": {},
        "checkpoint": str(checkpoint),
    }
    return job_config(inputs, str(tmp_path / "out"), model=model, method=method)


def _conv_ekfac_config(inputs, tmp_path):
    return _factory_config(inputs, tmp_path, name="ekfac")


def test_ekfac_conv_columns_match_the_library_and_resume_bit_identically(inputs, tmp_path):
    """A convolutional network's column scores every missing block in one pass over its train
    chunk, reading the stored factors in tiles: the blocks equal the library's, and a block
    recomputed alone is the same bytes as when its whole column was computed."""
    config = _conv_ekfac_config(inputs, tmp_path)
    run_tasks(config)
    first = read_outputs(config.output)
    _assert_library_influences(config, first["influences"])
    store = InfluenceStore(config.output)
    store._remove(store._record_path("influences", (1, 3)))
    assert run_tasks(config) == {"computed": 1, "reused": 11}
    assert np.array_equal(read_outputs(config.output)["influences"], first["influences"])


def test_auto_chunks_of_layer_wise_columns_bound_their_terms_and_the_factor_chunks():
    # a ResNet-18: 11.2M parameters, about 5.1 MB of layer terms per sample; 10,000 × 1,000
    p, terms = 11_164_362, 5_120_000
    train_chunk, test_chunk = pipeline.auto_chunk_sizes(10_000, 1_000, p, 2, 4, terms)
    assert train_chunk * terms <= pipeline.planning.MAX_TERMS_BYTES
    assert train_chunk % pipeline.planning.ALIGN_TRAIN_ROWS == 0 and train_chunk >= 128
    assert test_chunk * p * 4 <= pipeline.planning.MAX_FACTOR_BYTES
    assert 1_000 % test_chunk == 0
    # columns holding gradients would take 6 train rows each, and every one reads all factors
    gradients_chunk, same_test_chunk = pipeline.auto_chunk_sizes(10_000, 1_000, p, 2, 4)
    assert gradients_chunk * p * 4 <= pipeline.planning.MAX_GRAD_BYTES < 7 * p * 4
    assert same_test_chunk == test_chunk


def test_layer_wise_jobs_size_their_train_chunks_by_layer_terms(inputs, tmp_path):
    from prefect_influence.pipeline.network import layer_terms_bytes

    ekfac = job_config(inputs, str(tmp_path / "a"), method={"name": "ekfac"})
    network, _ = load_network(ekfac)
    train = open_source(ekfac.data.train)
    model = build_influence_model(ekfac, network)
    # the example network 64 → 8 → 10: both layers' inputs and output gradients, float32
    assert layer_terms_bytes(ekfac, model, train) == (64 + 8 + 8 + 10) * 4
    # columns that need gradients: stored train features, or a method without layer terms
    with_features = job_config(
        inputs, str(tmp_path / "c"), method={"name": "ekfac"}, train_features="exact"
    )
    assert layer_terms_bytes(with_features, model, train) is None
    # any method's columns score from the layer terms of such a network
    arnoldi = job_config(inputs, str(tmp_path / "b"))
    arnoldi_model = build_influence_model(arnoldi, network)
    assert layer_terms_bytes(arnoldi, arnoldi_model, train) == (64 + 8 + 8 + 10) * 4
    # not in Perturbation mode, with a trainable layer of another kind, or a layer called twice
    perturbation = job_config(inputs, str(tmp_path / "d"), mode="perturbation")
    assert layer_terms_bytes(perturbation, arnoldi_model, train) is None
    for factory in ("with_layer_norm", "shared_layer"):
        config = _factory_config(inputs, tmp_path, factory)
        other = build_influence_model(config, load_network(config)[0])
        assert layer_terms_bytes(config, other, train) is None, factory


def test_the_estimate_of_layer_wise_columns_probes_layer_terms(inputs, tmp_path):
    """``plan``'s estimate of an EK-FAC job probes what its columns do (layer terms, scores
    from them) and counts their memory (terms, the model's budget of tiles), not gradients."""
    from prefect_influence.pipeline.estimate import WORKER_BASE_BYTES, estimate_job

    config = _conv_ekfac_config(inputs, tmp_path)
    estimate = estimate_job(pipeline.survey_job(config, 2), 2, api_running=True)
    assert estimate.probe["train_operand"] == "layer terms"
    budget = build_influence_model(config, load_network(config)[0]).memory_budget_bytes
    assert estimate.worker_bytes > WORKER_BASE_BYTES + budget


@pytest.mark.parametrize(
    "method", [{"name": "cg", "regularization": 1.0}, {"name": "arnoldi", "rank": 8}]
)
def test_columns_of_every_method_score_layer_by_layer(inputs, tmp_path, method):
    """Not only EK-FAC: any method's columns on a network of Linear and Conv2d layers score
    from layer terms (the manifest records it), equal the library's influences and
    self-influences, and a block recomputed alone is the same bytes."""
    config = _factory_config(inputs, tmp_path, **method)
    run_tasks(config)
    store = InfluenceStore(config.output)
    assert store.planned_manifest().fingerprint["columns"] == "layer terms"
    first = read_outputs(config.output)
    model, x, y = _assert_library_influences(config, first["influences"])
    own = model.self_influences(x, y).numpy()
    np.testing.assert_allclose(first["self_influence"], own, rtol=1e-4, atol=1e-4 * own.max())
    store._remove(store._record_path("influences", (1, 3)))
    store._remove(store._record_path("self_influence", (3,)))
    assert run_tasks(config) == {"computed": 1, "reused": 11}
    again = read_outputs(config.output)
    for name in ("influences", "self_influence"):
        assert np.array_equal(again[name], first[name]), name


def test_an_output_whose_columns_formed_gradients_resumes_forming_them(inputs, tmp_path):
    """An output planned before other methods' columns scored layer by layer (no ``columns``
    entry in its fingerprint) resumes as it began: its missing blocks come from gradients, so
    they round like the blocks already stored."""
    from prefect_influence.blocks import TrainOperand, influence_block
    from prefect_influence.pipeline.context import job_context
    from prefect_influence.pipeline.estimate import estimate_job
    from prefect_influence.pipeline.resources import torch_threads

    config = _factory_config(inputs, tmp_path, name="arnoldi", rank=8)
    plan = pipeline.plan_job(config, n_workers=1)
    store = InfluenceStore(config.output)
    old = dict(plan.manifest.fingerprint)
    del old["columns"]  # as such an output's manifest reads
    store.write_manifest(dataclasses.replace(plan.manifest, fingerprint=old))
    run_tasks(config)
    first = read_outputs(config.output)
    _assert_library_influences(config, first["influences"])
    store._remove(store._record_path("influences", (1, 3)))
    assert pipeline.plan_job(config, n_workers=1).action == "resume"
    assert run_tasks(config) == {"computed": 1, "reused": 11}
    assert np.array_equal(read_outputs(config.output)["influences"], first["influences"])
    assert "columns" not in store.planned_manifest().fingerprint
    estimate = estimate_job(pipeline.survey_job(config, 1), 1, api_running=True)
    assert estimate.probe["train_operand"] == "gradients"
    # the block is the product of the stored factors with the train chunk's gradients
    ctx = job_context(config)
    (t0, t1), (s0, s1) = ctx.grid.test_ranges[1], ctx.grid.train_ranges[3]
    x, y = ctx.rows("train", s0, s1)
    with torch_threads(1):
        grads = ctx.model.per_sample_grads(x, y)
        factors = torch.from_numpy(store.read_chunk(FACTORS, ctx.grid, (1,)).copy())
        block = influence_block(ctx.model, factors, TrainOperand(grads=grads), "up").numpy()
    assert np.array_equal(first["influences"][t0:t1, s0:s1], block)
