"""prefect-influence: influence functions for PyTorch models, block by block on Dask,
resumable Prefect flows, results as zarr on any fsspec URL.

See ``prefect_influence.base`` for the definitions of factors and influences.
"""

from .base import InfluenceFunctionModel, InfluenceMode
from .errors import (
    ArrayExistsError,
    EmptyDataError,
    FittedStateError,
    InfluenceInputError,
    InputRankError,
    InvalidDimensionChunksError,
    InvalidParameterError,
    InvalidRankError,
    InvalidRegularizationError,
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
