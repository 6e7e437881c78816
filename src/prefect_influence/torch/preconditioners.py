"""Preconditioners for :class:`~prefect_influence.torch.CgInfluence`: diagonal (Jacobi) and
low-rank Nyström. Each is fitted from Hessian-vector products and exports plain tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import InvalidRankError
from .base import positive_int
from .lowrank import nystroem_eigen

__all__ = ["Preconditioner", "JacobiPreconditioner", "NystroemPreconditioner"]

MatMul = Callable[[Tensor], Tensor]


class Preconditioner(ABC):
    """Approximates ``(H + λI)⁻¹`` cheaply; ``solve`` applies it to the rows of a matrix."""

    state_keys: tuple[str, ...] = ()

    @abstractmethod
    def fit(
        self,
        hessian_matmul: MatMul,
        n_parameters: int,
        regularization: float,
        dtype: torch.dtype,
        device: Optional[torch.device] = None,
    ) -> None:
        """Build from ``hessian_matmul`` (mean Hessian without λ, applied to rows); the fitted
        tensors live on ``device`` (the model's), in ``dtype``."""

    @abstractmethod
    def solve(self, rhs: Tensor) -> Tensor:
        """Apply the preconditioner to every row of ``rhs``."""

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """Fitted tensors."""

    @abstractmethod
    def load_state(
        self, state: dict[str, Tensor], dtype: torch.dtype, device: torch.device
    ) -> None:
        """Restore from :meth:`state`."""


class JacobiPreconditioner(Preconditioner):
    """Inverse of the diagonal of ``H + λI``, the diagonal estimated à la Hutchinson:
    ``diag(H) ≈ mean_k z_k ⊙ H z_k`` over ``num_samples_estimator`` seeded Rademacher vectors.

    A noisy estimate may be small or negative; its magnitude is used and floored at ``λ`` (or a
    tiny positive value), so the preconditioner is always positive definite.
    """

    state_keys = ("inverse_diagonal",)

    def __init__(self, num_samples_estimator: int = 1, seed: int = 0):
        self.num_samples_estimator = positive_int(num_samples_estimator, "num_samples_estimator")
        self.seed = int(seed)

    def fit(self, hessian_matmul, n_parameters, regularization, dtype, device=None) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randint(0, 2, (self.num_samples_estimator, n_parameters), generator=gen) * 2 - 1
        z = z.to(device=device, dtype=dtype)
        probe = hessian_matmul(z)
        diag = (z.to(probe) * probe).mean(dim=0).abs() + regularization
        floor = max(regularization, float(diag.max()) * 1e-6, 1e-30)
        self._inverse = 1.0 / diag.clamp_min(floor)

    def solve(self, rhs: Tensor) -> Tensor:
        return rhs * self._inverse

    def state(self) -> dict[str, Tensor]:
        return {"inverse_diagonal": self._inverse}

    def load_state(self, state, dtype, device) -> None:
        self._inverse = state["inverse_diagonal"].to(device=device, dtype=dtype)


class NystroemPreconditioner(Preconditioner):
    """Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023):
    ``P⁻¹ = (Λ_r + λ) U (Λ + λI)⁻¹ Uᵀ + (I − UUᵀ)`` from a rank-``rank`` sketch ``H ≈ U Λ Uᵀ``.
    """

    state_keys = ("eigenvalues", "eigenvectors", "regularization")

    def __init__(self, rank: int, seed: int = 0):
        self.rank = positive_int(rank, "rank")
        self.seed = int(seed)

    def fit(self, hessian_matmul, n_parameters, regularization, dtype, device=None) -> None:
        if self.rank > n_parameters:
            raise InvalidRankError(
                f"NystroemPreconditioner rank={self.rank} exceeds the number of trainable "
                f"parameters ({n_parameters})."
            )
        vals, vecs = nystroem_eigen(hessian_matmul, n_parameters, self.rank, self.seed)
        # only directions of positive curvature are rescaled: with λ = 0 a zero one would
        # make the scale (smallest / shifted) 0/0; none left is the identity preconditioner
        positive = vals > 0
        self._vals = vals[positive].to(device=device, dtype=dtype)
        self._vecs = vecs[:, positive].to(device=device, dtype=dtype)
        self._reg = torch.tensor(float(regularization), dtype=dtype, device=device)

    def solve(self, rhs: Tensor) -> Tensor:
        if self._vals.numel() == 0:
            return rhs
        coeffs = rhs @ self._vecs
        shifted = self._vals + self._reg
        smallest = shifted.min()
        return (coeffs * (smallest / shifted)) @ self._vecs.T + rhs - coeffs @ self._vecs.T

    def state(self) -> dict[str, Tensor]:
        return {"eigenvalues": self._vals, "eigenvectors": self._vecs, "regularization": self._reg}

    def load_state(self, state, dtype, device) -> None:
        self._vals = state["eigenvalues"].to(device=device, dtype=dtype)
        self._vecs = state["eigenvectors"].to(device=device, dtype=dtype)
        self._reg = state["regularization"].to(device=device, dtype=dtype)
