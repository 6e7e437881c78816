"""prefect-influence: influence functions for PyTorch models, block by block on Dask,
resumable Prefect flows, results as zarr on any fsspec URL.

See ``prefect_influence.base`` for the definitions of factors and influences.
"""

from .base import InfluenceFunctionModel, InfluenceMode
from .errors import (
    ArrayExistsError,
    ConfigMismatchError,
    ConfigurationError,
    EmptyDataError,
    FittedStateError,
    InfluenceInputError,
    InputRankError,
    InvalidDimensionChunksError,
    InvalidParameterError,
    InvalidRankError,
    InvalidRegularizationError,
    JobRefusedError,
    LeaseHeldError,
    NonFiniteError,
    NotFittedError,
    PrefectInfluenceError,
    ShapeMismatchError,
    StorageError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
    UnsupportedInfluenceModeError,
)

__version__ = "0.1.0"

__all__ = [
    "InfluenceFunctionModel",
    "InfluenceMode",
    "ArrayExistsError",
    "ConfigMismatchError",
    "ConfigurationError",
    "JobRefusedError",
    "LeaseHeldError",
    "EmptyDataError",
    "FittedStateError",
    "InfluenceInputError",
    "InputRankError",
    "InvalidDimensionChunksError",
    "InvalidParameterError",
    "InvalidRankError",
    "InvalidRegularizationError",
    "NonFiniteError",
    "NotFittedError",
    "PrefectInfluenceError",
    "ShapeMismatchError",
    "StorageError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "UnsupportedInfluenceModeError",
]

# -- calculators, lazy chunk sequences and their converters/aggregators ---------------------------
# imported on first use: a command that only reads a configuration or an output starts without
# loading torch and dask
_LAZY = {
    "array": (
        "LazyChunkSequence",
        "ListAggregator",
        "NestedLazyChunkSequence",
        "NestedListAggregator",
        "NestedSequenceAggregator",
        "NumpyConverter",
        "SequenceAggregator",
    ),
    "calculators": (
        "TORCH_WORKER_DASK_CONFIG",
        "DaskInfluenceCalculator",
        "DisableClientSingleThreadCheck",
        "DisableClientThreadingCheck",
        "SequentialInfluenceCalculator",
    ),
    "torch.util": (
        "NestedTorchCatAggregator",
        "TorchCatAggregator",
        "TorchNumpyConverter",
        "torch_dataset_to_dask_array",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}
__all__ += list(_LAZY_NAMES)


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
