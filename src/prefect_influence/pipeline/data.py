"""Where a job's samples come from: zarr groups, ``x.npy``/``y.npy`` directories, ``.npz``
files at any fsspec URL, ``module:function`` Dataset factories and the built-in example; each
opened as a :class:`DataSource` with random access to rows and a content fingerprint."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Any, Optional

import fsspec
import numpy as np

from ..config import BUILTIN
from ..errors import ConfigurationError, EmptyDataError, NonFiniteError, ShapeMismatchError
from ..locations import open_group
from .inputs import read_bytes, resolve_import

__all__ = ["DataSource", "open_source", "is_stored", "HASH_ROWS"]

HASH_ROWS = 4096
#: rows that lie within one stored chunk of a chunked array are read as that whole chunk, and
#: the last such chunk is kept (per array, if within this size): a stored chunk is decoded whole
#: even for a few of its rows, and consecutive train chunks often share one (measured: reading
#: 6,272 rows of a 65,536-row zstd chunk took 24 ms; 8 columns decoded the same chunk 8 times).
#: Rows spanning several stored chunks are read as asked (one call, nothing kept).
ROW_CACHE_BYTES = 32 * 2**20


class DataSource:
    """Random access to ``(x, y)`` rows of a data set as numpy arrays."""

    def __init__(self, x: Any, y: Any, description: str):
        if not x.shape or not y.shape:
            raise ShapeMismatchError(f"{description}: x and y need a leading sample dimension.")
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"{description}: x has {x.shape[0]} rows but y has {y.shape[0]}."
            )
        if x.shape[0] == 0:
            raise EmptyDataError(f"{description}: the data set is empty.")
        self._x, self._y, self.description = x, y, description
        self._kept: dict[str, tuple[int, int, np.ndarray]] = {}  # last stored chunk per array
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._x.shape[0])

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self._x.shape[1:])

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read("x", start, stop), self._read("y", start, stop)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        arr = self._x if name == "x" else self._y
        stop = min(stop, len(self))
        step = _stored_rows(arr)
        lo = start // step * step if step else 0
        hi = min(len(self), lo + step) if step else 0
        row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        if not step or start >= stop or stop > hi or (hi - lo) * row_bytes > ROW_CACHE_BYTES:
            return np.asarray(arr[start:stop])
        with self._lock:
            cached = self._kept.get(name)
            if cached is None or cached[0] != lo:
                self._kept.pop(name, None)  # never two stored chunks at once
                cached = self._kept[name] = (lo, hi, np.asarray(arr[lo:hi]))
        return cached[2][start - lo : stop - lo].copy()  # callers own their rows

    def fingerprint(self, stop: Optional[int] = None) -> str:
        """sha256 of shapes, dtypes and contents, read in slices (never all at once). The same
        pass refuses non-finite values, so bad data fails before any expensive work. With
        ``stop``, the fingerprint of the first ``stop`` rows alone: what the data set had if
        the rows after them were appended since."""
        stop = len(self) if stop is None else min(stop, len(self))
        h = hashlib.sha256()
        for arr in (self._x, self._y):
            h.update(f"{(stop, *arr.shape[1:])}|{np.dtype(arr.dtype).str}|".encode())
        for start in range(0, stop, HASH_ROWS):
            x, y = self.rows(start, min(start + HASH_ROWS, stop))
            for name, arr in (("x", x), ("y", y)):
                if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                    bad = start + int(
                        np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))[0]
                    )
                    raise NonFiniteError(
                        f"{self.description}: {name} contains NaN or Inf (first at row {bad})."
                    )
            h.update(np.ascontiguousarray(x).tobytes())
            h.update(np.ascontiguousarray(y).tobytes())
        return "sha256:" + h.hexdigest()


def open_source(
    url: str, storage_options: Optional[dict] = None, role: str = "train"
) -> DataSource:
    """Open a data location (see :class:`~prefect_influence.config.DataSpec`), anew on every
    call: data may change between runs at the same URL (the pipeline keeps one job's sources
    for the tasks of that job)."""
    return _open(_role_url(url, role), dict(storage_options or {}))


def _role_url(url: str, role: str) -> str:
    return f"{url}#{role}" if url == BUILTIN else url


def _open(url: str, storage_options: dict) -> DataSource:
    if url.startswith(BUILTIN + "#"):
        from ..example import load_digits_example

        ex = load_digits_example()
        role = url.split("#", 1)[1]
        return DataSource(
            *((ex.x_train, ex.y_train) if role == "train" else (ex.x_test, ex.y_test)), url
        )
    if not is_stored(url):
        return _dataset_source(url)
    if url.endswith(".npz"):
        raw = read_bytes(url, storage_options, "data")
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            _require_keys(url, f.files)
            return DataSource(f["x"], f["y"], url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        exists = fs.exists(path)
    except Exception as exc:
        raise ConfigurationError(f"data {url!r} cannot be reached: {exc}") from exc
    if not exists:
        raise ConfigurationError(f"data {url!r} does not exist.")
    if fs.exists(f"{path}/x.npy"):
        x = np.load(io.BytesIO(fs.cat_file(f"{path}/x.npy")), allow_pickle=False)
        y = np.load(io.BytesIO(fs.cat_file(f"{path}/y.npy")), allow_pickle=False)
        return DataSource(x, y, url)
    try:
        group = open_group(url, storage_options, mode="r")
    except Exception as exc:
        raise ConfigurationError(
            f"data {url!r} is neither a zarr group, a directory with x.npy/y.npy nor a .npz: {exc}"
        ) from exc
    _require_keys(url, list(group.array_keys()))
    return DataSource(group["x"], group["y"], url)


def _stored_rows(arr: Any) -> Optional[int]:
    """Rows per stored chunk of a chunked array (zarr, h5py), ``None`` for in-memory ones."""
    chunks = getattr(arr, "chunks", None)
    if isinstance(arr, np.ndarray) or not isinstance(chunks, tuple) or not chunks:
        return None
    return chunks[0] if isinstance(chunks[0], int) and chunks[0] > 0 else None


def is_stored(url: str) -> bool:
    """Whether a data or checkpoint URL names stored files (not the built-in example and not a
    ``module:function`` data factory)."""
    if url == BUILTIN or url.startswith(BUILTIN + "#"):
        return False
    return "://" in url or ":" not in url or url.startswith(("/", ".")) or _looks_like_drive(url)


def _looks_like_drive(url: str) -> bool:
    return len(url) > 1 and url[1] == ":"


def _require_keys(url: str, keys: list[str]) -> None:
    missing = {"x", "y"} - set(keys)
    if missing:
        raise ConfigurationError(
            f"data {url!r} lacks arrays {sorted(missing)} (has {sorted(keys)})."
        )


def _dataset_source(path: str) -> DataSource:
    factory = resolve_import(path, "data factory")
    dataset = factory()
    try:
        n = len(dataset)
    except TypeError as exc:
        raise ConfigurationError(
            f"data factory {path!r} must return a sized torch Dataset."
        ) from exc
    if n == 0:
        raise EmptyDataError(f"data factory {path!r} returned an empty data set.")
    pairs = [dataset[i] for i in range(n)]
    x = np.stack([np.asarray(p[0]) for p in pairs])
    y = np.stack([np.asarray(p[1]) for p in pairs])
    return DataSource(x, y, path)
