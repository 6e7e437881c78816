"""Data sources (zarr group, .npz, directory of .npy, Dataset factory, built-in example), the
model loader, and the CLI's status/top-k on a finished output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from jobs import job_config, write_inputs
from test_stages import run_tasks

from prefect_influence.cli import main
from prefect_influence.errors import ConfigurationError
from prefect_influence.pipeline.data import open_source
from prefect_influence.pipeline.network import resolve_loss

X = np.arange(24, dtype=np.float32).reshape(6, 4)
Y = np.arange(6, dtype=np.int64) % 3


def tensor_dataset():
    return torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))


@pytest.mark.parametrize("kind", ["zarr", "npz", "npy", "factory", "memory-zarr"])
def test_every_source_kind_reads_the_same_rows(kind, tmp_path):
    if kind == "zarr":
        group = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
        group.create_array("x", data=X)
        group.create_array("y", data=Y)
        url = str(tmp_path / "d.zarr")
    elif kind == "memory-zarr":
        url = f"memory://sources-{tmp_path.name}/d.zarr"
        group = zarr.open_group(url, mode="w")
        group.create_array("x", data=X)
        group.create_array("y", data=Y)
    elif kind == "npz":
        np.savez(tmp_path / "d.npz", x=X, y=Y)
        url = str(tmp_path / "d.npz")
    elif kind == "npy":
        (tmp_path / "d").mkdir()
        np.save(tmp_path / "d" / "x.npy", X)
        np.save(tmp_path / "d" / "y.npy", Y)
        url = str(tmp_path / "d")
    else:
        url = "test_sources:tensor_dataset"
    source = open_source(url)
    assert len(source) == 6 and source.x_shape == (4,)
    x, y = source.rows(2, 5)
    np.testing.assert_array_equal(x, X[2:5])
    np.testing.assert_array_equal(y, Y[2:5])
    assert source.fingerprint() == open_source(url).fingerprint()


class _CountingArray:
    """A chunked array (zarr-like: shape, dtype, chunks, slicing) that counts its reads."""

    def __init__(self, values, chunks):
        self.values, self.chunks, self.reads = values, chunks, []
        self.shape, self.dtype = values.shape, values.dtype

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.values[key]


def test_rows_within_a_stored_chunk_read_it_once_and_are_returned_as_copies(tmp_path, monkeypatch):
    from prefect_influence.pipeline import data as sources

    values = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    group.create_array("x", data=values, chunks=(7, 4))
    group.create_array("y", data=np.arange(50), chunks=(7,))
    source = open_source(str(tmp_path / "c.zarr"))
    rng = np.random.default_rng(0)
    ranges = [(0, 50), (3, 4), (6, 8), (49, 60), (10, 10)] + [
        tuple(sorted(rng.integers(0, 55, 2))) for _ in range(40)
    ]
    for start, stop in ranges:
        x, y = source.rows(start, stop)
        np.testing.assert_array_equal(x, values[start:stop])
        np.testing.assert_array_equal(y, np.arange(50)[start:stop])
        x[...] = -1  # the caller's own array: later reads are unaffected
    np.testing.assert_array_equal(source.rows(0, 50)[0], values)

    # consecutive train chunks inside one stored chunk read it once; rows across stored chunks
    # are read as asked
    x = _CountingArray(values, (20, 4))
    counted = sources.DataSource(x, _CountingArray(np.arange(50), (20,)), "counted")
    for start in range(0, 20, 5):
        np.testing.assert_array_equal(counted.rows(start, start + 5)[0], values[start : start + 5])
    np.testing.assert_array_equal(counted.rows(18, 23)[0], values[18:23])
    assert x.reads == [(0, 20), (18, 23)]
    # a span above the cache size is read as asked, not cached
    monkeypatch.setattr(sources, "ROW_CACHE_BYTES", 10 * 16 - 1)
    x.reads.clear()
    np.testing.assert_array_equal(counted.rows(41, 44)[0], values[41:44])
    assert x.reads == [(41, 44)]


def test_builtin_example_has_train_and_test_roles():
    train, test = (
        open_source("builtin:digits", role="train"),
        open_source("builtin:digits", role="test"),
    )
    assert len(train) == 1500 and len(test) == 297 and train.x_shape == (64,)


def test_losses_resolve():
    assert resolve_loss("cross_entropy") is torch.nn.functional.cross_entropy
    assert resolve_loss("mse") is torch.nn.functional.mse_loss
    assert resolve_loss("torch.nn.functional:l1_loss") is torch.nn.functional.l1_loss
    with pytest.raises(ConfigurationError, match="module:attribute"):
        resolve_loss("l1")


def test_cli_status_and_top_k(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "inputs")
    config = job_config(inputs, str(tmp_path / "out"))
    run_tasks(config)
    assert main(["status", config.output]) == 0
    text = capsys.readouterr().out
    assert "influences:     12/12 chunks done" in text and "arnoldi" in text
    chunk = tmp_path / "out" / "influences" / "c" / "1" / "2"
    chunk.write_bytes(chunk.read_bytes()[:5])
    assert main(["status", config.output]) == 0
    assert "1 corrupt (will be recomputed): [[1, 2]]" in capsys.readouterr().out
    assert main(["top-k", config.output, "--test-index", "3"]) == 0
    text = capsys.readouterr().out
    assert "most helpful:" in text and "most harmful:" in text
    assert main(["top-k", config.output, "--test-index", "99"]) == 2
    assert main(["status", str(tmp_path / "nothing")]) == 1


def test_the_builtin_example_without_scikit_learn_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"prefect-influence\[example\]"):
        open_source("builtin:digits", role="train")
