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
from .array import (  # noqa: E402
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedListAggregator,
    NestedSequenceAggregator,
    NumpyConverter,
    SequenceAggregator,
)
from .calculators import (  # noqa: E402
    TORCH_WORKER_DASK_CONFIG,
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    DisableClientThreadingCheck,
    SequentialInfluenceCalculator,
)
from .torch.util import (  # noqa: E402
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)

__all__ += [
    "SequentialInfluenceCalculator",
    "TORCH_WORKER_DASK_CONFIG",
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "DisableClientThreadingCheck",
    "NumpyConverter",
    "SequenceAggregator",
    "NestedSequenceAggregator",
    "ListAggregator",
    "NestedListAggregator",
    "LazyChunkSequence",
    "NestedLazyChunkSequence",
    "TorchNumpyConverter",
    "TorchCatAggregator",
    "NestedTorchCatAggregator",
    "torch_dataset_to_dask_array",
]
