"""The bad-input catalogue (docs/bad-input.md): each bad job gets a clear error before any
expensive work, and an existing finished output is left byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import zarr
from jobs import job_config, write_inputs
from test_stages import run_tasks

from prefect_influence import (
    EmptyDataError,
    InputRankError,
    InvalidParameterError,
    InvalidRankError,
    NonFiniteError,
    ShapeMismatchError,
    pipeline,
)
from prefect_influence.errors import (
    ConfigMismatchError,
    ConfigurationError,
    InfluenceInputError,
    StorageError,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    inputs = write_inputs(root / "inputs")
    out = root / "out"
    run_tasks(job_config(inputs, str(out)))
    return root, inputs, out


def _zarr_data(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("x", data=x)
    group.create_array("y", data=y)
    return str(path)


def _good_x(n=10):
    return np.random.default_rng(1).random((n, 64), dtype=np.float32)


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def case_nan_in_x(root, inputs):
    x = _good_x()
    x[3, 5] = np.nan
    return {"data": {"train": _zarr_data(root / "nan.zarr", x, np.zeros(10, np.int64))}}


def case_inf_in_test_x(root, inputs):
    x = _good_x()
    x[0, 0] = np.inf
    return {"data": {"test": _zarr_data(root / "inf.zarr", x, np.zeros(10, np.int64))}}


def case_label_out_of_range(root, inputs):
    return {"data": {"train": _zarr_data(root / "lab.zarr", _good_x(), np.full(10, 12, np.int64))}}


def case_float_labels_for_cross_entropy(root, inputs):
    return {"data": {"train": _zarr_data(root / "flab.zarr", _good_x(), np.zeros(10, np.float32))}}


def case_int32_labels_for_cross_entropy(root, inputs):
    return {"data": {"train": _zarr_data(root / "i32.zarr", _good_x(), np.zeros(10, np.int32))}}


def case_x_y_lengths_differ(root, inputs):
    return {"data": {"train": _zarr_data(root / "len.zarr", _good_x(10), np.zeros(9, np.int64))}}


def case_wrong_input_rank(root, inputs):
    x = _good_x().reshape(10, 8, 8)
    return {
        "data": {
            "train": _zarr_data(root / "rank.zarr", x, np.zeros(10, np.int64)),
            "test": _zarr_data(root / "rank-t.zarr", x, np.zeros(10, np.int64)),
        }
    }


def case_train_test_shapes_differ(root, inputs):
    x = np.zeros((10, 32), np.float32)
    return {"data": {"test": _zarr_data(root / "shape.zarr", x, np.zeros(10, np.int64))}}


def case_empty_train(root, inputs):
    return {
        "data": {
            "train": _zarr_data(
                root / "empty.zarr", np.zeros((0, 64), np.float32), np.zeros(0, np.int64)
            )
        }
    }


def case_missing_data_url(root, inputs):
    return {"data": {"train": str(root / "does-not-exist.zarr")}}


def case_data_without_y(root, inputs):
    group = zarr.open_group(str(root / "noy.zarr"), mode="w")
    group.create_array("x", data=_good_x())
    return {"data": {"train": str(root / "noy.zarr")}}


def case_unreachable_url(root, inputs):
    return {
        "data": {"train": "s3://no-such-bucket/x.zarr"},
        "storage_options": {
            "endpoint_url": "http://127.0.0.1:9",
            "key": "k",
            "secret": "s",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        },
    }


def case_checkpoint_does_not_fit(root, inputs):
    return {"model": {"factory_kwargs": {"hidden": 16}}}


def case_checkpoint_is_a_pickle(root, inputs):
    path = root / "evil.pt"
    path.write_bytes(pickle.dumps({"weight": Evil()}))
    return {"model": {"checkpoint": str(path)}}


def case_checkpoint_missing(root, inputs):
    return {"model": {"checkpoint": str(root / "nope.pt")}}


def case_factory_does_not_exist(root, inputs):
    return {"model": {"factory": "no_such_module_xyz:build"}}


def case_factory_attribute_missing(root, inputs):
    return {"model": {"factory": "prefect_influence.example:no_such_function"}}


def case_loss_import_missing(root, inputs):
    return {"model": {"loss": "torch.nn.functional:no_such_loss"}}


def case_block_names_an_unknown_parameter(root, inputs):
    return {"method": {"name": "cg", "block_structure": {"first": ["0.weight", "1.weight"]}}}


def case_ekfac_unsupported_layer(root, inputs):
    # the example model with a trainable LayerNorm is built by this factory
    return {
        "model": {
            "factory": "jobs_models:with_layer_norm",
            "factory_kwargs": {},
            "checkpoint": _ln_checkpoint(root),
        },
        "method": {"name": "ekfac"},
    }


def _ln_checkpoint(root):
    import jobs_models

    path = root / "ln.pt"
    torch.save(jobs_models.with_layer_norm().state_dict(), path)
    return str(path)


def case_factory_bad_arguments(root, inputs):
    return {"model": {"factory_kwargs": {"hidden": 8, "colour": "red"}}}


def case_rank_exceeds_parameters(root, inputs):
    return {"method": {"rank": 10**6}}


def case_unwritable_output(root, inputs):
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    return {"output": str(blocker / "out")}


def case_different_configuration(root, inputs):
    return {"method": {"regularization": 0.5}}


CASES = [
    (case_nan_in_x, NonFiniteError, "NaN or Inf \\(first at row 3\\)"),
    (case_inf_in_test_x, NonFiniteError, "NaN or Inf"),
    (case_label_out_of_range, InfluenceInputError, "outside \\[0, 10\\)"),
    (case_float_labels_for_cross_entropy, InfluenceInputError, "integer class labels"),
    (case_int32_labels_for_cross_entropy, InfluenceInputError, "int64 class labels"),
    (case_x_y_lengths_differ, ShapeMismatchError, "10 rows but y has 9"),
    (case_wrong_input_rank, InputRankError, "cannot be applied"),
    (case_train_test_shapes_differ, ShapeMismatchError, "shape"),
    (case_empty_train, EmptyDataError, "empty"),
    (case_missing_data_url, ConfigurationError, "does not exist"),
    (case_data_without_y, ConfigurationError, "lacks arrays \\['y'\\]"),
    (case_unreachable_url, ConfigurationError, "cannot be reached|does not exist"),
    (case_checkpoint_does_not_fit, ConfigurationError, "does not fit the model"),
    (case_checkpoint_is_a_pickle, ConfigurationError, "weights_only"),
    (case_checkpoint_missing, ConfigurationError, "does not exist"),
    (case_factory_does_not_exist, ConfigurationError, "cannot import module"),
    (case_factory_attribute_missing, ConfigurationError, "has no 'no_such_function'"),
    (case_loss_import_missing, ConfigurationError, "no_such_loss"),
    (case_ekfac_unsupported_layer, NotImplementedError, "LayerNorm"),
    (case_block_names_an_unknown_parameter, InvalidParameterError, "'1.weight'.*not a parameter"),
    (case_factory_bad_arguments, ConfigurationError, "cannot be called with"),
    (case_rank_exceeds_parameters, InvalidRankError, "exceeds the number of trainable parameters"),
    (case_unwritable_output, StorageError, "not writable"),
    (case_different_configuration, ConfigMismatchError, "differs in: method"),
]


@pytest.mark.parametrize("make, error, message", CASES, ids=[c[0].__name__[5:] for c in CASES])
def test_bad_input_fails_clearly_and_keeps_output(finished, make, error, message, tmp_path):
    root, inputs, out = finished
    before = tree_digest(out)
    overrides = make(tmp_path, inputs)
    config = job_config(inputs, overrides.pop("output", str(out)), **overrides)
    with pytest.raises(error, match=message):
        pipeline.plan_job(config)
    assert tree_digest(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
def test_cuda_without_a_usable_gpu_fails_clearly_and_keeps_output(finished):
    _, inputs, out = finished
    before = tree_digest(out)
    config = job_config(inputs, str(out), device="cuda")
    with pytest.raises(
        ConfigurationError, match="device='cuda', but this process has no usable CUDA"
    ):
        pipeline.plan_job(config)
    assert tree_digest(out) == before


VALIDATION_CASES = [
    ({"train_chunk_size": 0}, "greater than or equal to 1"),
    ({"test_chunk_size": -3}, "greater than or equal to 1"),
    ({"test_chunk_size": True}, "chunk size"),
    ({"method": {"regularization": -1.0}}, "greater than or equal to 0"),
    ({"method": {"name": "nonsense"}}, "direct"),
    ({"mode": "sideways"}, "up"),
    ({"method": {"second_order_mode": "fisher"}}, "gauss_newton"),
    ({"method": {"block_structure": "by_row"}}, "layer_wise"),
    ({"method": {"name": "ekfac", "block_structure": "layer_wise"}}, "ekfac works layer by layer"),
    ({"method": {"name": "datainf", "regularization": 0}}, "datainf needs regularization > 0"),
    ({"method": {"name": "cg", "fisher": "sampled"}}, "for ekfac only"),
    ({"method": {"name": "ekfac", "fisher": "often"}}, "sampled"),
    ({"method": {"name": "ekfac", "fisher_samples": 0}}, "greater than or equal to 1"),
    (
        {"method": {"name": "datainf", "second_order_mode": "gauss_newton"}},
        "datainf fixes its own curvature",
    ),
    ({"top_k": 0}, "greater than or equal to 1"),
    ({"dtype": "float16"}, "float32"),
    ({"unknown_field": 1}, "Extra inputs"),
    ({"output": "memory://"}, "root of a filesystem"),
    ({"output": "/"}, "root of a filesystem"),
    ({"output": "file:///"}, "root of a filesystem"),
]


@pytest.mark.parametrize(
    "overrides, message", VALIDATION_CASES, ids=[str(c[0]) for c in VALIDATION_CASES]
)
def test_invalid_parameters_are_rejected_by_the_schema(finished, overrides, message):
    _, inputs, out = finished
    overrides = dict(overrides)
    with pytest.raises(pydantic.ValidationError, match=message):
        job_config(inputs, overrides.pop("output", str(out)), **overrides)


def test_output_url_keeps_its_protocol_without_trailing_slashes(finished):
    _, inputs, _ = finished
    assert job_config(inputs, "memory://somewhere/out//").output == "memory://somewhere/out"
    assert job_config(inputs, "s3://bucket/prefix/").output == "s3://bucket/prefix"


@pytest.mark.parametrize("where", ["inputs", "train", "inside train"])
def test_an_output_overlapping_the_inputs_is_refused_and_they_survive(where, tmp_path):
    """overwrite=True with an output that holds, is or lies inside an input: refused before
    anything is cleared or written (it would delete the job's own data or checkpoint)."""
    inputs = write_inputs(tmp_path / "inputs")
    output = {
        "inputs": tmp_path / "inputs",
        "train": Path(inputs["train"]),
        "inside train": Path(inputs["train"]) / "results",
    }[where]
    before = tree_digest(tmp_path / "inputs")
    config = job_config(inputs, str(output) + "/", overwrite=True)
    with pytest.raises(ConfigurationError, match="overlaps the job's input"):
        pipeline.plan_job(config)
    assert tree_digest(tmp_path / "inputs") == before
