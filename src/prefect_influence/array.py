"""Lazy sequences of result chunks: nothing runs until they are aggregated or written to zarr.

A calculator returns a :class:`LazyChunkSequence` (chunks stacked along the first axis, e.g. the
influence factors of consecutive test batches) or a :class:`NestedLazyChunkSequence` (rows of
blocks: row ``i`` holds the blocks of test chunk ``i`` against every train chunk). Each holds a
*factory* that returns a fresh generator, so the same lazy object can be computed several times.

Two ways to run one:

* ``compute(aggregator)`` pulls every chunk into memory and combines them (a list by default,
  one tensor with :class:`~prefect_influence.torch.util.TorchCatAggregator`).
* ``to_zarr(url, converter)`` writes chunk after chunk into a zarr v3 array at a local path,
  any fsspec URL (``file://``, ``memory://``, ``s3://``...) or a zarr store object, so memory
  stays bounded by one chunk (one block for nested sequences), whatever the size of the whole
  result.

Example:
    >>> lazy = LazyChunkSequence(lambda: (torch.full((n, 2), n) for n in (3, 1, 2)))
    >>> lazy.compute(TorchCatAggregator()).shape     # computed now
    torch.Size([6, 2])
    >>> lazy.to_zarr("memory://factors", TorchNumpyConverter(), return_stored=True).shape
    (6, 2)
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar, Union

import numpy as np

from .errors import ArrayExistsError, EmptyDataError, InfluenceInputError, ShapeMismatchError
from .locations import PathOrUrl, open_store

__all__ = [
    "NumpyConverter",
    "SequenceAggregator",
    "NestedSequenceAggregator",
    "ListAggregator",
    "NestedListAggregator",
    "LazyChunkSequence",
    "NestedLazyChunkSequence",
]

logger = logging.getLogger(__name__)

TensorType = TypeVar("TensorType")

#: where :meth:`LazyChunkSequence.to_zarr` writes: a path, an fsspec URL or a zarr store object
PathOrStore = Union[PathOrUrl, "zarr.abc.store.Store"]  # noqa: F821


class NumpyConverter(ABC, Generic[TensorType]):
    """Converts between a framework's tensors and numpy arrays (for Dask and zarr)."""

    @abstractmethod
    def to_numpy(self, x: TensorType) -> np.ndarray:
        """The tensor as a numpy array (on the host)."""

    @abstractmethod
    def from_numpy(self, x: np.ndarray) -> TensorType:
        """A tensor holding the values of the numpy array."""


class SequenceAggregator(ABC, Generic[TensorType]):
    """Combines the chunks of a :class:`LazyChunkSequence` into one in-memory result."""

    @abstractmethod
    def __call__(self, tensor_sequence: "LazyChunkSequence") -> Any:
        """Run the sequence's generator and combine what it yields."""


class NestedSequenceAggregator(ABC, Generic[TensorType]):
    """Combines the rows of blocks of a :class:`NestedLazyChunkSequence` into one result."""

    @abstractmethod
    def __call__(self, nested_sequence: "NestedLazyChunkSequence") -> Any:
        """Run the sequence's generator of rows and combine every block."""


class ListAggregator(SequenceAggregator):
    """The chunks as a list, in order."""

    def __call__(self, tensor_sequence: "LazyChunkSequence") -> list:
        return list(tensor_sequence.generator_factory())


class NestedListAggregator(NestedSequenceAggregator):
    """The blocks as a list of rows, each a list of blocks."""

    def __call__(self, nested_sequence: "NestedLazyChunkSequence") -> list[list]:
        return [list(row) for row in nested_sequence.generator_factory()]


class LazyChunkSequence(Generic[TensorType]):
    """Chunks stacked along the first axis, produced on demand by ``generator_factory()``.

    Args:
        generator_factory: called without arguments, returns a new iterator over the chunks.
        len_generator: the number of chunks, if known (only used for progress logging).
    """

    def __init__(
        self,
        generator_factory: Callable[[], Iterator[TensorType]],
        len_generator: Optional[int] = None,
    ):
        self.generator_factory = generator_factory
        self.len_generator = len_generator

    def compute(self, aggregator: Optional[SequenceAggregator] = None) -> Any:
        """Run the generator now and combine the chunks (a list unless ``aggregator`` is given)."""
        return (aggregator or ListAggregator())(self)

    def to_zarr(
        self,
        path_or_url: PathOrStore,
        converter: NumpyConverter,
        return_stored: bool = False,
        overwrite: bool = False,
        storage_options: Optional[dict[str, Any]] = None,
    ):
        """Compute chunk by chunk and append each to a zarr v3 array at ``path_or_url``.

        Args:
            path_or_url: a local path, an fsspec URL (``file://``, ``memory://``, ``s3://``...),
                or a zarr store object (e.g. ``zarr.storage.MemoryStore()``), written at its
                root.
            converter: turns each chunk into a numpy array.
            return_stored: return the written ``zarr.Array`` (else ``None``).
            overwrite: replace what is stored there. Without it, a non-empty location raises
                :class:`~prefect_influence.ArrayExistsError` before anything is computed or
                written, and is left untouched.
            storage_options: passed to fsspec (e.g. credentials, ``endpoint_url`` for S3); not
                with a store object.

        Memory holds one chunk at a time. The zarr chunk shape is the first chunk's shape.
        """
        writer = _ZarrWriter(path_or_url, storage_options, overwrite)
        count = 0
        for chunk in self.generator_factory():
            writer.append_rows(converter.to_numpy(chunk))
            count += 1
            logger.debug("wrote chunk %d/%s to %s", count, self.len_generator or "?", path_or_url)
        return writer.finish(return_stored)


class NestedLazyChunkSequence(Generic[TensorType]):
    """Rows of blocks, produced on demand: ``generator_factory()`` yields one iterator per row.

    Row ``i`` stacks along the first axis, the blocks inside a row along the second; every row
    must cover the same columns. Rows and their blocks must be consumed in order.

    Args:
        generator_factory: called without arguments, returns a new iterator over rows, each an
            iterator over the row's blocks.
        len_outer_generator: the number of rows, if known (only used for progress logging).
    """

    def __init__(
        self,
        generator_factory: Callable[[], Iterator[Iterator[TensorType]]],
        len_outer_generator: Optional[int] = None,
    ):
        self.generator_factory = generator_factory
        self.len_outer_generator = len_outer_generator

    def compute(self, aggregator: Optional[NestedSequenceAggregator] = None) -> Any:
        """Run every block now and combine them (a list of rows unless ``aggregator`` is given)."""
        return (aggregator or NestedListAggregator())(self)

    def to_zarr(
        self,
        path_or_url: PathOrStore,
        converter: NumpyConverter,
        return_stored: bool = False,
        overwrite: bool = False,
        storage_options: Optional[dict[str, Any]] = None,
    ):
        """Compute block by block and write each into its place in a zarr v3 array.

        Same arguments as :meth:`LazyChunkSequence.to_zarr`. The array grows as blocks arrive
        (chunk sizes may be uneven and are not known ahead), so memory holds one block at a
        time. Rows that do not cover the same number of columns raise
        :class:`~prefect_influence.ShapeMismatchError`.
        """
        writer = _ZarrWriter(path_or_url, storage_options, overwrite)
        for i, row in enumerate(self.generator_factory()):
            writer.start_row()
            for block in row:
                writer.write_block(converter.to_numpy(block))
            writer.end_row()
            logger.debug(
                "wrote row %d/%s to %s", i + 1, self.len_outer_generator or "?", path_or_url
            )
        return writer.finish(return_stored)


# -- storage ----------------------------------------------------------------------------------


def _store_is_empty(store) -> bool:
    from zarr.core.sync import sync

    return bool(sync(store.is_empty("")))


class _ZarrWriter:
    """Grows one zarr v3 array as chunks or blocks arrive; created with the first data."""

    def __init__(self, path_or_url: PathOrStore, storage_options: Optional[dict], overwrite: bool):
        from zarr.abc.store import Store

        if isinstance(path_or_url, Store):
            if storage_options:
                raise InfluenceInputError(
                    "storage_options configure the filesystem of a path or URL; they cannot "
                    f"apply to the zarr store object {path_or_url}, which is already open. "
                    "Pass the URL with storage_options, or the store alone."
                )
            self.location = str(path_or_url)
            self.store = path_or_url
        elif isinstance(path_or_url, (str, os.PathLike)):
            self.location = os.fspath(path_or_url)
            self.store = open_store(path_or_url, storage_options)
        else:
            raise InfluenceInputError(
                "to_zarr writes to a local path, an fsspec URL or a zarr store object (e.g. "
                f"zarr.storage.MemoryStore()); got {type(path_or_url).__name__}."
            )
        self.overwrite = overwrite
        if not overwrite and not _store_is_empty(self.store):
            raise ArrayExistsError(
                f"{self.location!r} already holds data; pass overwrite=True to replace it, or "
                "choose another location."
            )
        self.array = None
        self.n_rows = 0  # rows completely written
        self.n_cols: Optional[int] = None  # columns of a row (nested sequences), fixed by row 0
        self._row_height: Optional[int] = None
        self._col = 0
        self._row_index = 0

    # -- flat sequences --------------------------------------------------------------------------
    def append_rows(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk)
        if chunk.ndim == 0:
            raise ShapeMismatchError("Chunks must have a leading dimension; got a scalar.")
        if self.array is None:
            self._create((0, *chunk.shape[1:]), chunk)
        self._check_trailing(chunk, 1)
        self.array.append(chunk, axis=0)
        self.n_rows += chunk.shape[0]

    # -- nested sequences ------------------------------------------------------------------------
    def start_row(self) -> None:
        self._row_height, self._col = None, 0

    def write_block(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.ndim < 2:
            raise ShapeMismatchError(
                f"Blocks of a nested sequence need at least 2 dimensions; got shape {block.shape}."
            )
        if self._row_height is None:
            self._row_height = block.shape[0]
        elif block.shape[0] != self._row_height:
            raise ShapeMismatchError(
                f"Row {self._row_index}: the block at column {self._col} has {block.shape[0]} "
                f"rows, the row's first block had {self._row_height}."
            )
        if self.array is None:
            self._create((0, 0, *block.shape[2:]), block)
        self._check_trailing(block, 2)
        r0, c0 = self.n_rows, self._col
        r1, c1 = r0 + block.shape[0], c0 + block.shape[1]
        if self.n_cols is not None and c1 > self.n_cols:
            raise ShapeMismatchError(
                f"Row {self._row_index} covers more than the {self.n_cols} columns of row 0."
            )
        shape = self.array.shape
        if r1 > shape[0] or c1 > shape[1]:
            self.array.resize((max(shape[0], r1), max(shape[1], c1), *shape[2:]))
        self.array[r0:r1, c0:c1] = block
        self._col = c1

    def end_row(self) -> None:
        if self._row_height is None:
            raise EmptyDataError(f"Row {self._row_index} of the nested sequence has no blocks.")
        if self.n_cols is None:
            self.n_cols = self._col
        elif self._col != self.n_cols:
            raise ShapeMismatchError(
                f"Row {self._row_index} covers {self._col} columns, row 0 covered {self.n_cols}."
            )
        self.n_rows += self._row_height
        self._row_index += 1

    # -- common ----------------------------------------------------------------------------------
    def _create(self, shape: tuple[int, ...], first: np.ndarray) -> None:
        import zarr
        from zarr.errors import ContainsArrayError, ContainsGroupError

        chunks = tuple(max(1, s) for s in first.shape)
        try:
            self.array = zarr.create_array(
                self.store,
                shape=shape,
                chunks=chunks,
                dtype=first.dtype,
                zarr_format=3,
                overwrite=self.overwrite,
            )
        except (ContainsArrayError, ContainsGroupError) as exc:  # written by someone meanwhile
            raise ArrayExistsError(
                f"{self.location!r} already holds a zarr node; pass overwrite=True to replace it."
            ) from exc

    def _check_trailing(self, data: np.ndarray, lead: int) -> None:
        expected = tuple(self.array.shape[lead:])
        if tuple(data.shape[lead:]) != expected:
            raise ShapeMismatchError(
                f"A chunk of shape {data.shape} does not fit the array being written, whose "
                f"trailing dimensions are {expected}."
            )

    def finish(self, return_stored: bool):
        if self.array is None:
            raise EmptyDataError(
                f"The sequence yielded no chunks; nothing was written to {self.location!r}."
            )
        return self.array if return_stored else None
