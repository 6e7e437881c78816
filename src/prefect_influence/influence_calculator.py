"""pyDVL's module path ``pydvl.influence.influence_calculator``: the calculators and their
errors."""

from .array import LazyChunkSequence, NestedLazyChunkSequence, NumpyConverter
from .base import InfluenceFunctionModel, InfluenceMode
from .calculators import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    DisableClientThreadingCheck,
    SequentialInfluenceCalculator,
)
from .errors import (
    InvalidDimensionChunksError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
    UnsupportedInfluenceModeException,
)

__all__ = [
    "DaskInfluenceCalculator",
    "SequentialInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "DisableClientThreadingCheck",
    "InvalidDimensionChunksError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "UnsupportedInfluenceModeException",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "LazyChunkSequence",
    "NestedLazyChunkSequence",
    "NumpyConverter",
]
