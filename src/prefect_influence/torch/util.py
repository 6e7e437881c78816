"""PyTorch glue for calculators: numpy conversion, tensor aggregators, datasets as dask arrays."""

from __future__ import annotations

import uuid
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..array import (
    LazyChunkSequence,
    NestedLazyChunkSequence,
    NestedSequenceAggregator,
    NumpyConverter,
    SequenceAggregator,
)
from ..errors import EmptyDataError, InfluenceInputError, InvalidParameterError

__all__ = [
    "TorchNumpyConverter",
    "TorchCatAggregator",
    "NestedTorchCatAggregator",
    "torch_dataset_to_dask_array",
]


def native_array(x: np.ndarray) -> np.ndarray:
    """``x`` in contiguous, native-byte-order memory (a copy only if needed): torch takes
    neither negative strides (a reversed dask array) nor big-endian data."""
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))


class TorchNumpyConverter(NumpyConverter[Tensor]):
    """Tensors to numpy arrays (detached, on the CPU) and back (onto ``device``).

    Args:
        device: where :meth:`from_numpy` puts tensors; ``None`` keeps them on the CPU. The
            influence models move inputs to their own device anyway, so this only saves a copy.
    """

    def __init__(self, device: Optional[Union[str, torch.device]] = None):
        self.device = None if device is None else torch.device(device)

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray) -> Tensor:
        x = native_array(np.asarray(x))
        # torch warns on read-only arrays (dask chunks often are); copy those instead of sharing.
        t = torch.from_numpy(x) if x.flags.writeable else torch.tensor(x)
        return t if self.device is None else t.to(self.device)


class TorchCatAggregator(SequenceAggregator[Tensor]):
    """All chunks of a :class:`~prefect_influence.LazyChunkSequence` in one tensor (``cat``)."""

    def __call__(self, tensor_sequence: LazyChunkSequence) -> Tensor:
        chunks = list(tensor_sequence.generator_factory())
        if not chunks:
            raise EmptyDataError("The lazy sequence yielded no chunks; nothing to concatenate.")
        return torch.cat(chunks, dim=0)


class NestedTorchCatAggregator(NestedSequenceAggregator[Tensor]):
    """All blocks of a :class:`~prefect_influence.NestedLazyChunkSequence` in one tensor.

    The blocks of a row are joined along dimension 1 (train samples), the rows along
    dimension 0 (test samples).
    """

    def __call__(self, nested_sequence: NestedLazyChunkSequence) -> Tensor:
        rows = [torch.cat(list(row), dim=1) for row in nested_sequence.generator_factory()]
        if not rows:
            raise EmptyDataError("The nested lazy sequence yielded no rows; nothing to join.")
        return torch.cat(rows, dim=0)


def _sample_to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _load_chunk(dataset, start: int, stop: int, x_dtype, y_dtype) -> tuple[np.ndarray, ...]:
    xs, ys = [], []
    for i in range(start, stop):
        x, y = dataset[i]
        xs.append(_sample_to_numpy(x))
        ys.append(_sample_to_numpy(y))
    return np.stack(xs).astype(x_dtype, copy=False), np.stack(ys).astype(y_dtype, copy=False)


def torch_dataset_to_dask_array(
    dataset: Any,
    chunk_size: int,
    total_size: Optional[int] = None,
    resulting_dtype: Any = np.float32,
):
    """Wrap a map-style dataset of ``(x, y)`` pairs as two lazy dask arrays ``(da_x, da_y)``.

    Both are chunked along the first (sample) dimension only, in chunks of ``chunk_size``
    samples (the last one may be shorter); nothing is loaded until they are computed, one task
    per chunk reading ``dataset[i]`` for its indices. Only ``dataset[0]`` is read now, to learn
    the shapes and dtypes of a sample.

    Args:
        dataset: anything with ``dataset[i] -> (x, y)`` (tensors, arrays or numbers), e.g. a
            ``torch.utils.data.Dataset``; it is sent to the workers once, as one graph key.
        chunk_size: samples per chunk, an integer ≥ 1.
        total_size: number of samples to take (the first ``total_size``); ``len(dataset)``
            when omitted.
        resulting_dtype: dtype of ``da_x``, and of ``da_y`` when the labels are floating point.

    Labels that are integers (or booleans), e.g. class indices for a cross-entropy loss, keep
    their own dtype: casting them to a float type would break such losses and, above ``2**24``
    for float32, change their values. Inputs are always cast to ``resulting_dtype``; pass an
    integer dtype for integer inputs such as token ids.

    Returns:
        ``(da_x, da_y)`` with shapes ``(n, *x.shape)`` and ``(n, *y.shape)``.

    Raises:
        InvalidParameterError: ``chunk_size`` or ``total_size`` is not an integer ≥ 1, or
            ``total_size`` exceeds ``len(dataset)``.
    """
    import dask
    import dask.array as da

    if not _is_count(chunk_size):
        raise InvalidParameterError(f"chunk_size must be an integer ≥ 1, got {chunk_size!r}.")
    n_available: Optional[int]
    try:
        n_available = len(dataset)
    except TypeError:
        n_available = None
    if total_size is None:
        if n_available is None:
            raise InfluenceInputError(
                f"The dataset ({type(dataset).__name__}) has no len(); pass total_size."
            )
        total_size = n_available
    elif not _is_count(total_size) or (n_available is not None and total_size > n_available):
        raise InvalidParameterError(
            f"total_size must be an integer between 1 and len(dataset)={n_available}, "
            f"got {total_size!r}."
        )
    if total_size == 0:
        raise EmptyDataError("The dataset holds no samples.")
    chunk_size, total_size = int(chunk_size), int(total_size)

    x0, y0 = (_sample_to_numpy(v) for v in dataset[0])
    x_dtype = np.dtype(resulting_dtype)
    y_dtype = y0.dtype if _is_integer(y0.dtype) else x_dtype

    # one graph key for the dataset, so it is serialized once, not once per chunk task
    source = dask.delayed(dataset, name=f"torch-dataset-{uuid.uuid4().hex}")
    load = dask.delayed(_load_chunk, nout=2, pure=True)
    xs, ys = [], []
    for start in range(0, total_size, chunk_size):
        stop = min(start + chunk_size, total_size)
        x_chunk, y_chunk = load(source, start, stop, x_dtype, y_dtype)
        xs.append(da.from_delayed(x_chunk, shape=(stop - start, *x0.shape), dtype=x_dtype))
        ys.append(da.from_delayed(y_chunk, shape=(stop - start, *y0.shape), dtype=y_dtype))
    return da.concatenate(xs, axis=0), da.concatenate(ys, axis=0)
