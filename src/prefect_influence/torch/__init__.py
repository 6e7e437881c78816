"""PyTorch influence function models: exact, iterative, low-rank and K-FAC approximations of
the inverse Hessian of a trained ``nn.Module``'s mean training loss."""

from .base import TorchInfluenceFunctionModel
from .direct import DirectInfluence

__all__ = [
    "TorchInfluenceFunctionModel",
    "DirectInfluence",
]
