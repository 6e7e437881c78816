"""Whole chunks of uncompressed zarr v3 arrays, read and written as their files.

In zarr v3 a chunk of an array without compressors and with a little-endian ``bytes`` codec is
one file of plain C-order bytes (edge chunks padded to the full chunk shape with the fill
value). Writing and reading those files directly gives the files zarr itself would write and
read, without its encoding pipeline, which costs more than the I/O for the blocks of a job.
:meth:`PlainChunks.of` returns ``None`` for any other array, which then goes through zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import StorageError
from ..locations import is_local

__all__ = ["PlainChunks"]

#: bytes of columns a transposed chunk is written at a time
SLAB_BYTES = 16 * 2**20


@dataclass(frozen=True)
class PlainChunks:
    """Where and how zarr v3 keeps the chunks of one uncompressed little-endian array."""

    fs: Any
    root: str
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    encode_key: Any
    #: a 2-d chunk stored column by column (zarr's transpose codec, order ``(1, 0)``)
    transposed: bool = False

    @classmethod
    def of(cls, array, fs, root: str) -> Optional["PlainChunks"]:
        """The plain layout of zarr ``array`` stored at ``root`` on ``fs``, if it has one."""
        from zarr.codecs import BytesCodec, TransposeCodec

        meta = array.metadata
        codecs = tuple(getattr(meta, "codecs", ()))
        transposed = (
            len(codecs) == 2
            and isinstance(codecs[0], TransposeCodec)
            and tuple(codecs[0].order) == (1, 0)
        )
        if transposed:
            codecs = codecs[1:]
        plain = (
            getattr(meta, "zarr_format", None) == 3
            and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and hasattr(meta.chunk_grid, "chunk_shape")
        )
        if not plain:
            return None
        return cls(
            fs,
            root,
            tuple(meta.chunk_grid.chunk_shape),
            np.dtype(array.dtype).newbyteorder("<"),
            meta.fill_value,
            meta.encode_chunk_key,
            transposed,
        )

    def path(self, index: tuple[int, ...]) -> str:
        coords = tuple(index) + (0,) * (len(self.chunk_shape) - len(index))
        return f"{self.root}/{self.encode_key(coords)}"

    def write(self, index: tuple[int, ...], values: np.ndarray) -> None:
        """Write chunk ``index`` (``values`` may be a smaller edge chunk)."""
        path = self.path(index)
        if self.transposed:
            self._write_columns(path, values)
            return
        if values.shape != self.chunk_shape:  # an edge chunk: zarr stores it padded
            full = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            full[tuple(slice(0, n) for n in values.shape)] = values
            values = full
        data = np.ascontiguousarray(values, dtype=self.dtype)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, memoryview(data).cast("B") if is_local(self.fs) else data.tobytes())

    def read(self, index: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        """Chunk ``index`` cut to ``shape`` (possibly a read-only view of the bytes read); the
        fill value where it was never written, as zarr reads it."""
        local = tuple(slice(0, n) for n in shape)
        try:
            raw = self.fs.cat_file(self.path(index))
        except FileNotFoundError:
            return np.full(tuple(shape), self.fill_value, dtype=self.dtype)
        full = np.frombuffer(raw, dtype=self.dtype)
        expected = int(np.prod(self.chunk_shape))
        if full.size != expected:
            raise StorageError(
                f"chunk {index} of {self.root} has {len(raw)} bytes, expected "
                f"{expected * self.dtype.itemsize} (torn write?)"
            )
        if self.transposed:
            return full.reshape(self.chunk_shape[::-1]).T[local]
        return full.reshape(self.chunk_shape)[local]

    def _write_columns(self, path: str, values: np.ndarray) -> None:
        """A transposed chunk, written in slabs of columns (never a transposed copy of all)."""
        rows, n_cols = self.chunk_shape
        step = max(1, SLAB_BYTES // (rows * self.dtype.itemsize))
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            for c in range(0, n_cols, step):
                slab = np.full((min(step, n_cols - c), rows), self.fill_value, dtype=self.dtype)
                part = values[:, c : c + step]
                slab[: part.shape[1], : part.shape[0]] = part.T
                f.write(memoryview(slab).cast("B"))

    def read_part(self, index: tuple[int, ...], rows: slice, cols: slice) -> np.ndarray:
        """Rows ``rows`` and columns ``cols`` of 2-d chunk ``index``, reading only their bytes
        (one ranged read per row, one for whole rows; a transposed chunk: one read of those
        columns' every row); the fill value where never written."""
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        (n_rows, n_cols), itemsize = self.chunk_shape, self.dtype.itemsize
        out = np.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        if out.size == 0:
            return out
        try:
            with self.fs.open(self.path(index), "rb") as f:
                if self.transposed:  # the columns' every row: one contiguous range
                    columns = np.empty((c1 - c0, n_rows), dtype=self.dtype)
                    _read_exactly(f, c0 * n_rows * itemsize, columns, self.path(index))
                    return columns.T[r0:r1]
                if c0 == 0 and c1 == n_cols:  # whole rows: one contiguous range
                    _read_exactly(f, r0 * n_cols * itemsize, out, self.path(index))
                else:
                    for i, r in enumerate(range(r0, r1)):
                        _read_exactly(f, (r * n_cols + c0) * itemsize, out[i], self.path(index))
        except FileNotFoundError:
            out.fill(self.fill_value)
        return out


def _read_exactly(f, offset: int, target: np.ndarray, path: str) -> None:
    f.seek(offset)
    view = memoryview(target).cast("B")
    got = f.readinto(view)
    if got != len(view):
        raise StorageError(f"{path} ends before byte {offset + len(view)} (torn write?)")
