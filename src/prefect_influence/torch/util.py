"""PyTorch glue for calculators: numpy conversion, tensor aggregators, datasets as dask arrays;
and, at pyDVL's module path ``pydvl.influence.torch.util``, the block and curvature modes and
pyDVL's helpers for parameter structures."""

from __future__ import annotations

import logging
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
from ..errors import (
    EmptyDataError,
    InfluenceInputError,
    InvalidParameterError,
    ShapeMismatchError,
    TorchLinalgEighException,
)
from .compat import (
    LossType,
    TorchTensorContainerType,
    align_structure,
    align_with_model,
    flatten_dimensions,
    get_model_parameters,
    reshape_vector_to_tensors,
    safe_torch_linalg_eigh,
    to_model_device,
)
from .curvature import BlockMode, ModelParameterDictBuilder, SecondOrderMode

__all__ = [
    "TorchNumpyConverter",
    "TorchCatAggregator",
    "NestedTorchCatAggregator",
    "torch_dataset_to_dask_array",
    # pyDVL's names at this module path
    "BlockMode",
    "SecondOrderMode",
    "ModelParameterDictBuilder",
    "LossType",
    "TorchTensorContainerType",
    "TorchLinalgEighException",
    "align_structure",
    "align_with_model",
    "flatten_dimensions",
    "get_model_parameters",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
]

logger = logging.getLogger(__name__)


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


def _parts(item: Any) -> tuple:
    """The parts of one sample: a tuple or list ``(x, y, ...)`` is its elements, anything else
    (a tensor, an array, a number) is one part."""
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _load_chunk(dataset, start: int, stop: int, dtypes: tuple) -> tuple[np.ndarray, ...]:
    columns: list[list[np.ndarray]] = [[] for _ in dtypes]
    for i in range(start, stop):
        parts = _parts(dataset[i])
        if len(parts) != len(dtypes):
            raise ShapeMismatchError(
                f"Sample {i} of the dataset has {len(parts)} part(s), sample 0 had {len(dtypes)}."
            )
        for column, value in zip(columns, parts):
            column.append(_sample_to_numpy(value))
    chunks = []
    for k, (column, dtype) in enumerate(zip(columns, dtypes)):
        try:
            stacked = np.stack(column)
        except ValueError as exc:
            shapes = sorted({c.shape for c in column})
            raise ShapeMismatchError(
                f"Part {k} of samples {start}..{stop - 1} has different shapes {shapes}; every "
                "sample's part must have one shape."
            ) from exc
        chunks.append(stacked.astype(dtype, copy=False))
    return tuple(chunks)


def _first_sample(dataset: Any) -> Any:
    try:
        return dataset[0]
    except IndexError:
        raise EmptyDataError("The dataset holds no samples.") from None
    except (TypeError, KeyError, NotImplementedError) as exc:
        raise InfluenceInputError(
            f"The dataset ({type(dataset).__name__}) cannot be indexed with dataset[i] "
            f"({type(exc).__name__}: {exc}); pass a map-style dataset (with total_size when it "
            "has no len())."
        ) from None


def _count_samples(dataset: Any) -> int:
    """The number of samples of a dataset without ``len()``: indices are read until one
    raises ``IndexError``, as a map-style dataset does past its end."""
    logger.warning(
        "%s has no len(): counting its samples by reading them all once; pass total_size to "
        "skip this.",
        type(dataset).__name__,
    )
    n = 1  # dataset[0] was read already
    while True:
        try:
            dataset[n]
        except IndexError:
            return n
        n += 1


def torch_dataset_to_dask_array(
    dataset: Any,
    chunk_size: int,
    total_size: Optional[int] = None,
    resulting_dtype: Any = np.float32,
) -> tuple:
    """Wrap a map-style dataset as lazy dask arrays, one per part of a sample.

    A sample ``dataset[i]`` that is a tuple (or list) ``(x, y, ...)`` gives one array per
    element, e.g. ``(da_x, da_y)`` for ``TensorDataset(x, y)``; any other sample (a tensor,
    an array, a number), or a 1-tuple as ``TensorDataset(x)`` yields, gives a 1-tuple
    ``(da_x,)``. Every array is chunked along the first (sample) dimension only, in chunks of
    ``chunk_size`` samples (the last one may be shorter); nothing is loaded until they are
    computed, one task per chunk reading ``dataset[i]`` for its indices. Only ``dataset[0]``
    is read now, to learn the shapes and dtypes of a sample (and, for a dataset without
    ``len()`` and without ``total_size``, every sample once, to count them).

    Args:
        dataset: anything with ``dataset[i]`` (tensors, arrays or numbers), e.g. a
            ``torch.utils.data.Dataset``; it is sent to the workers once, as one graph key.
        chunk_size: samples per chunk, an integer ≥ 1.
        total_size: number of samples to take (the first ``total_size``). When omitted,
            ``len(dataset)``, or for a dataset without ``len()`` the first index at which
            ``dataset[i]`` raises ``IndexError``.
        resulting_dtype: dtype of the first part (``x``), and of the other parts unless they
            are integers.

    Parts after the first that are integers (or booleans), e.g. class indices for a
    cross-entropy loss, keep their own dtype: casting them to a float type would break such
    losses and, above ``2**24`` for float32, change their values. The first part is always cast
    to ``resulting_dtype``; pass an integer dtype for integer inputs such as token ids.

    Returns:
        A tuple of dask arrays, the ``k``-th of shape ``(n, *part_k.shape)``.

    Raises:
        InvalidParameterError: ``chunk_size`` or ``total_size`` is not an integer ≥ 1, or
            ``total_size`` exceeds ``len(dataset)``.
        EmptyDataError: the dataset holds no samples.
        InfluenceInputError: ``dataset[0]`` cannot be read.
    """
    import dask
    import dask.array as da

    if not _is_count(chunk_size):
        raise InvalidParameterError(f"chunk_size must be an integer ≥ 1, got {chunk_size!r}.")
    n_available: Optional[int]
    try:
        n_available = len(dataset)
    except (TypeError, NotImplementedError):
        n_available = None
    if total_size is not None and (
        not _is_count(total_size) or (n_available is not None and total_size > n_available)
    ):
        limit = "len(dataset)=" + str(n_available) if n_available is not None else "its size"
        raise InvalidParameterError(
            f"total_size must be an integer between 1 and {limit}, got {total_size!r}."
        )
    if n_available == 0:
        raise EmptyDataError("The dataset holds no samples.")

    sample = _parts(_first_sample(dataset))
    if not sample:
        raise InfluenceInputError("dataset[0] is an empty tuple; a sample needs at least x.")
    if total_size is None:
        total_size = n_available if n_available is not None else _count_samples(dataset)
    chunk_size, total_size = int(chunk_size), int(total_size)

    first = [_sample_to_numpy(v) for v in sample]
    x_dtype = np.dtype(resulting_dtype)
    dtypes = tuple(
        x_dtype if k == 0 or not _is_integer(a.dtype) else a.dtype for k, a in enumerate(first)
    )

    # one graph key for the dataset, so it is serialized once, not once per chunk task
    source = dask.delayed(dataset, name=f"torch-dataset-{uuid.uuid4().hex}")
    load = dask.delayed(_load_chunk, nout=len(dtypes), pure=True)
    columns: list[list] = [[] for _ in dtypes]
    for start in range(0, total_size, chunk_size):
        stop = min(start + chunk_size, total_size)
        chunks = load(source, start, stop, dtypes)
        for column, chunk, a, dtype in zip(columns, chunks, first, dtypes):
            column.append(da.from_delayed(chunk, shape=(stop - start, *a.shape), dtype=dtype))
    return tuple(da.concatenate(column, axis=0) for column in columns)
