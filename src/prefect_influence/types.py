"""pyDVL's module path ``pydvl.influence.types``: the influence modes and their error."""

from .base import InfluenceMode, TensorType
from .errors import UnsupportedInfluenceModeException

__all__ = ["InfluenceMode", "TensorType", "UnsupportedInfluenceModeException"]
