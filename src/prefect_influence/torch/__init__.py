"""PyTorch influence function models: exact, iterative, low-rank and K-FAC approximations of
the inverse Hessian of a trained ``nn.Module``'s mean training loss."""

from .base import TorchInfluenceFunctionModel
from .curvature import BlockMode, SecondOrderMode
from .datainf import InverseHarmonicMeanInfluence
from .direct import DirectInfluence
from .ekfac import EkfacInfluence
from .iterative import CgInfluence, LissaInfluence
from .lowrank import ArnoldiInfluence, NystroemSketchInfluence
from .preconditioners import JacobiPreconditioner, NystroemPreconditioner, Preconditioner

__all__ = [
    "TorchInfluenceFunctionModel",
    "DirectInfluence",
    "EkfacInfluence",
    "InverseHarmonicMeanInfluence",
    "BlockMode",
    "SecondOrderMode",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "Preconditioner",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
]
