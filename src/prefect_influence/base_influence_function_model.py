"""pyDVL's module path ``pydvl.influence.base_influence_function_model``: the influence model
contract and its errors."""

from .base import InfluenceFunctionModel, InfluenceMode
from .errors import (
    NotFittedException,
    NotImplementedLayerRepresentationException,
    UnsupportedInfluenceModeException,
)

__all__ = [
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "UnsupportedInfluenceModeException",
]
