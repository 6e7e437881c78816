"""Where a job's inputs come from: the user's model (factory + checkpoint), its loss, the
training and test data (zarr groups, .npy/.npz, Dataset factories, the built-in example), and
the influence model the configuration asks for. Each input also yields a fingerprint."""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import pickle
import threading
from typing import Any, Callable, Optional

import fsspec
import numpy as np
import torch
from torch import nn

from .config import BUILTIN, LossName, Method, PipelineConfig, PreconditionerName
from .errors import (
    EmptyDataError,
    InfluenceInputError,
    InputRankError,
    NonFiniteError,
    ShapeMismatchError,
)

__all__ = [
    "ConfigurationError",
    "resolve_import",
    "load_network",
    "resolve_loss",
    "DataSource",
    "open_source",
    "build_influence_model",
    "torch_dtype",
]

_HASH_ROWS = 4096
#: rows that lie within one stored chunk of a chunked array are read as that whole chunk, and
#: the last such chunk is kept (per array, if within this size): a stored chunk is decoded whole
#: even for a few of its rows, and consecutive train chunks often share one (measured: reading
#: 6,272 rows of a 65,536-row zstd chunk took 24 ms; 8 columns decoded the same chunk 8 times).
#: Rows spanning several stored chunks are read as asked (one call, nothing kept).
ROW_CACHE_BYTES = 32 * 2**20


class ConfigurationError(InfluenceInputError):
    """A configuration entry cannot be resolved (import path, checkpoint, data URL...)."""


def torch_dtype(name: Any) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[getattr(name, "value", name)]


def resolve_import(path: str, what: str) -> Any:
    """``'package.module:attribute'`` → the object. The configuration is trusted code."""
    if ":" not in path:
        raise ConfigurationError(f"{what} {path!r} must look like 'package.module:attribute'.")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ConfigurationError(
            f"{what} {path!r}: module {module_name!r} has no {attr!r}."
        ) from exc
    return obj


# -- model -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _builtin_network() -> tuple[dict[str, torch.Tensor], bytes]:
    from .example import load_digits_example, train_model

    state = train_model(load_digits_example()).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def _read_bytes(url: str, storage_options: dict, what: str) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{what} {url!r} does not exist.") from exc
    except Exception as exc:  # network, permissions, bad protocol
        raise ConfigurationError(f"{what} {url!r} cannot be read: {exc}") from exc


def load_network(config: PipelineConfig) -> tuple[nn.Module, str]:
    """The trained network in eval mode, in the configured dtype and device, and a fingerprint
    of what determines it (factory + checkpoint bytes)."""
    spec = config.model
    if spec.factory == BUILTIN:
        from .example import build_model

        network = build_model()
        state, raw = _builtin_network()
        if spec.checkpoint:
            raw = _read_bytes(spec.checkpoint, config.storage_options, "checkpoint")
            state = _load_state_dict(raw, spec.checkpoint)
    else:
        factory = resolve_import(spec.factory, "model factory")
        if not callable(factory):
            raise ConfigurationError(f"model factory {spec.factory!r} is not callable.")
        try:
            network = factory(**spec.factory_kwargs)
        except TypeError as exc:
            raise ConfigurationError(
                f"model factory {spec.factory!r} cannot be called with {spec.factory_kwargs}: {exc}"
            ) from exc
        if not isinstance(network, nn.Module):
            raise ConfigurationError(
                f"model factory {spec.factory!r} returned {type(network).__name__}, not an nn.Module."
            )
        if not spec.checkpoint:
            raise ConfigurationError(
                "model.checkpoint is empty: influences need the trained weights (a state_dict "
                "saved with torch.save)."
            )
        raw = _read_bytes(spec.checkpoint, config.storage_options, "checkpoint")
        state = _load_state_dict(raw, spec.checkpoint)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigurationError(
            f"checkpoint {spec.checkpoint or BUILTIN!r} does not fit the model from "
            f"{spec.factory!r}: {exc}"
        ) from exc
    check_device(config.device.value)
    network = network.to(device=config.device.value, dtype=torch_dtype(config.dtype)).eval()
    digest = hashlib.sha256(raw).hexdigest()
    return network, f"{model_identity(config)}|sha256:{digest}"


def model_identity(config: PipelineConfig) -> str:
    """What the configuration alone says about the network: factory and its arguments (the
    network fingerprint adds the checkpoint's digest)."""
    return f"{config.model.factory}|{json_kwargs(config.model.factory_kwargs)}"


def check_device(name: str) -> None:
    """Refuse a CUDA device this process cannot use, before anything is computed or written
    (torch would fail later with "Torch not compiled with CUDA enabled")."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise ConfigurationError(
            f"device={name!r}, but this process has no usable CUDA device (torch "
            f"{torch.__version__}, built with {build}). Run where a GPU is visible with a CUDA "
            "build of torch (the flow process and every Dask worker need one), or set "
            "device='cpu'."
        )


def json_kwargs(kwargs: dict) -> str:
    import json

    return json.dumps(kwargs, sort_keys=True, default=str)


def _load_state_dict(raw: bytes, url: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigurationError(
            f"checkpoint {url!r} is not a plain state_dict of tensors; it was refused by "
            f"torch.load(weights_only=True) (it may contain arbitrary Python objects): {exc}"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(f"checkpoint {url!r} cannot be loaded: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigurationError(
            f"checkpoint {url!r} holds a {type(state).__name__}, not a state_dict."
        )
    return state


def resolve_loss(name: str) -> Callable:
    if name == LossName.cross_entropy.value:
        return nn.functional.cross_entropy
    if name == LossName.mse.value:
        return nn.functional.mse_loss
    loss = resolve_import(name, "loss")
    if not callable(loss):
        raise ConfigurationError(f"loss {name!r} is not callable.")
    return loss


# -- data ------------------------------------------------------------------------------------------
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

    def fingerprint(self) -> str:
        """sha256 of shapes, dtypes and contents, read in slices (never all at once). The same
        pass refuses non-finite values, so bad data fails before any expensive work."""
        h = hashlib.sha256()
        for arr in (self._x, self._y):
            h.update(f"{tuple(arr.shape)}|{np.dtype(arr.dtype).str}|".encode())
        for start in range(0, len(self), _HASH_ROWS):
            x, y = self.rows(start, start + _HASH_ROWS)
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
        from .example import load_digits_example

        ex = load_digits_example()
        role = url.split("#", 1)[1]
        return DataSource(
            *((ex.x_train, ex.y_train) if role == "train" else (ex.x_test, ex.y_test)), url
        )
    if not is_stored(url):
        return _dataset_source(url)
    if url.endswith(".npz"):
        raw = _read_bytes(url, storage_options, "data")
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
    import zarr

    try:
        # zarr takes storage options for fsspec URIs only (a local path has none to use)
        options = storage_options or None if "://" in url else None
        group = zarr.open_group(url, mode="r", storage_options=options)
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


def check_model_fits_data(network: nn.Module, loss_name: str, source: DataSource, dtype) -> None:
    """Run the network on the first rows and the loss on the first one, and check labels
    against the outputs, so a wrong input rank, label dtype or out-of-range labels fail before
    any expensive work (and before anything is written)."""
    x, y = source.rows(0, min(len(source), 64))
    tx = torch.from_numpy(np.ascontiguousarray(x))
    tx = tx.to(dtype) if tx.is_floating_point() else tx
    try:
        with torch.no_grad():
            out = network(tx)
    except Exception as exc:
        raise InputRankError(
            f"{source.description}: the model cannot be applied to inputs of shape "
            f"{tuple(x.shape[1:])} per sample: {exc}"
        ) from exc
    if loss_name == LossName.cross_entropy.value:
        if not np.issubdtype(y.dtype, np.integer):
            raise InfluenceInputError(
                f"{source.description}: cross_entropy needs integer class labels in y, got {y.dtype}."
            )
        n_classes = out.shape[1] if out.ndim > 1 else 1
        labels = np.concatenate(
            [
                source.rows(s, s + _HASH_ROWS)[1].reshape(-1)
                for s in range(0, len(source), _HASH_ROWS)
            ]
        )
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            raise InfluenceInputError(
                f"{source.description}: {int(bad.sum())} label(s) outside [0, {n_classes}) for a "
                f"model with {n_classes} outputs (e.g. {int(labels[bad][0])})."
            )
    elif loss_name == LossName.mse.value and tuple(out.shape[1:]) != tuple(y.shape[1:]):
        raise ShapeMismatchError(
            f"{source.description}: mse targets have shape {tuple(y.shape[1:])} per sample but "
            f"the model outputs {tuple(out.shape[1:])}."
        )
    # the loss itself, on one sample as the influence models evaluate it (labels as the
    # pipeline passes them: floating ones in the computation dtype, integer ones unchanged)
    ty = torch.from_numpy(np.ascontiguousarray(y[:1]))
    ty = ty.to(dtype) if ty.is_floating_point() else ty
    loss = resolve_loss(loss_name)
    try:
        with torch.no_grad():
            value = loss(out[:1], ty)
    except Exception as exc:
        hint = ""
        if loss_name == LossName.cross_entropy.value and y.dtype != np.int64:
            hint = " (cross_entropy takes int64 class labels: store y as int64)"
        raise InfluenceInputError(
            f"{source.description}: the loss {loss_name!r} fails on the model's output and y "
            f"({y.dtype}, shape {tuple(y.shape[1:])} per sample){hint}: {exc}"
        ) from exc
    if value.numel() != 1:
        raise InfluenceInputError(
            f"{source.description}: the loss {loss_name!r} must return a scalar for one sample, "
            f"got shape {tuple(value.shape)}."
        )


# -- influence model -------------------------------------------------------------------------------
def build_influence_model(config: PipelineConfig, network: nn.Module):
    """The (unfitted) influence model the configuration describes."""
    from . import torch as methods

    m = config.method
    loss = resolve_loss(config.model.loss)
    reg = m.regularization
    if m.name is Method.direct:
        return methods.DirectInfluence(network, loss, reg)
    if m.name is Method.cg:
        pre = None
        if m.preconditioner is PreconditionerName.jacobi:
            pre = methods.JacobiPreconditioner(num_samples_estimator=4)
        elif m.preconditioner is PreconditionerName.nystroem:
            pre = methods.NystroemPreconditioner(rank=m.preconditioner_rank)
        return methods.CgInfluence(
            network,
            loss,
            reg,
            rtol=m.rtol,
            atol=m.atol,
            maxiter=m.maxiter,
            preconditioner=pre,
            batch_size=m.fit_batch_size,
        )
    if m.name is Method.lissa:
        return methods.LissaInfluence(
            network,
            loss,
            reg,
            maxiter=m.maxiter or 1000,
            dampen=m.lissa_dampen,
            scale=m.lissa_scale,
            rtol=m.rtol,
            batch_size=m.fit_batch_size,
        )
    if m.name is Method.arnoldi:
        return methods.ArnoldiInfluence(
            network, loss, reg, rank=m.rank, krylov_dimension=m.krylov_dimension
        )
    if m.name is Method.nystroem:
        return methods.NystroemSketchInfluence(network, loss, reg, rank=m.rank)
    if m.name is Method.ekfac:
        return methods.EkfacInfluence(network, loss, reg)
    raise ConfigurationError(f"unknown method {m.name!r}")  # pragma: no cover - enum guards it
