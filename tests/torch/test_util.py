"""Torch glue: numpy converter, cat aggregators, datasets as lazy dask arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from prefect_influence import (
    EmptyDataError,
    InfluenceInputError,
    InvalidParameterError,
    LazyChunkSequence,
    NestedLazyChunkSequence,
)
from prefect_influence.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)


class CountingDataset(Dataset):
    """Float64 inputs of shape (2, 3) and integer or float labels; counts item reads."""

    def __init__(self, n=11, float_labels=False):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
        self.y = torch.randn(n, generator=gen) if float_labels else torch.arange(n) * 1000
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_converter_round_trip_and_read_only_arrays():
    conv = TorchNumpyConverter(device=torch.device("cpu"))
    t = torch.arange(6.0, requires_grad=True).reshape(2, 3) * 2
    a = conv.to_numpy(t)
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, np.arange(6.0).reshape(2, 3) * 2)
    frozen = np.arange(4.0)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when sharing a read-only array
        back = conv.from_numpy(frozen)
    assert torch.equal(back, torch.arange(4.0, dtype=torch.float64))
    assert TorchNumpyConverter().device is None


def test_cat_aggregators():
    chunks = [torch.full((n, 2), float(n)) for n in (3, 1, 2)]
    flat = LazyChunkSequence(lambda: iter(chunks)).compute(TorchCatAggregator())
    assert torch.equal(flat, torch.cat(chunks))
    full = torch.arange(6 * 7.0).reshape(6, 7)

    def rows():
        return ((full[a:b, c:d] for c, d in ((0, 2), (2, 7))) for a, b in ((0, 4), (4, 6)))

    assert torch.equal(NestedLazyChunkSequence(rows).compute(NestedTorchCatAggregator()), full)
    with pytest.raises(EmptyDataError):
        LazyChunkSequence(lambda: iter([])).compute(TorchCatAggregator())
    with pytest.raises(EmptyDataError):
        NestedLazyChunkSequence(lambda: iter([])).compute(NestedTorchCatAggregator())


def test_dataset_to_dask_array_is_lazy_chunked_and_cast():
    data = CountingDataset()
    da_x, da_y = torch_dataset_to_dask_array(data, chunk_size=4)
    assert data.reads == 1  # only the probe of dataset[0]
    assert da_x.shape == (11, 2, 3) and da_y.shape == (11,)
    assert da_x.chunks == ((4, 4, 3), (2,), (3,)) and da_y.chunks == ((4, 4, 3),)
    assert da_x.dtype == np.float32 and da_y.dtype == np.int64
    x, y = da_x.compute(scheduler="synchronous"), da_y.compute(scheduler="synchronous")
    assert x.dtype == np.float32  # really cast, not only declared
    np.testing.assert_array_equal(x, data.x.numpy().astype(np.float32))
    np.testing.assert_array_equal(y, data.y.numpy())  # integer labels keep dtype and values


def test_dataset_to_dask_array_float_labels_dtype_and_total_size():
    data = CountingDataset(float_labels=True)
    da_x, da_y = torch_dataset_to_dask_array(
        data, chunk_size=3, total_size=7, resulting_dtype=np.float64
    )
    assert da_x.chunks[0] == (3, 3, 1) and da_y.dtype == np.float64
    np.testing.assert_array_equal(da_x.compute(scheduler="synchronous"), data.x[:7].numpy())
    y = da_y.compute(scheduler="synchronous")
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, data.y[:7].numpy().astype(np.float64))


def test_dataset_to_dask_array_plain_values():
    data = [(np.array([1.0, 2.0]), 3), (np.array([4.0, 5.0]), 6)]
    da_x, da_y = torch_dataset_to_dask_array(data, chunk_size=5)
    assert da_y.dtype == np.dtype(int)
    np.testing.assert_array_equal(da_y.compute(), [3, 6])


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, None])
def test_dataset_to_dask_array_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(InvalidParameterError, match="chunk_size"):
        torch_dataset_to_dask_array(TensorDataset(torch.ones(3, 1), torch.ones(3)), chunk_size)
    with pytest.raises(ValueError):  # the error is also a ValueError
        torch_dataset_to_dask_array(TensorDataset(torch.ones(3, 1), torch.ones(3)), chunk_size)


def test_dataset_to_dask_array_rejects_bad_total_size():
    data = TensorDataset(torch.ones(3, 1), torch.ones(3))
    for total in (0, 4):
        with pytest.raises(InvalidParameterError, match="total_size"):
            torch_dataset_to_dask_array(data, 2, total_size=total)
    with pytest.raises(InfluenceInputError, match="total_size"):
        torch_dataset_to_dask_array(iter([]), 2)


def test_converter_takes_reversed_and_big_endian_arrays():
    conv = TorchNumpyConverter()
    a = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    assert torch.equal(conv.from_numpy(a[::-1]), torch.from_numpy(a[::-1].copy()))
    big = a.astype(">f4")
    assert torch.equal(conv.from_numpy(big), torch.from_numpy(a))
