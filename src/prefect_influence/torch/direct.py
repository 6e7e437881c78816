"""Exact influence: the dense Hessian, symmetric-eigendecomposed once in ``fit``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidRegularizationError
from .base import TorchInfluenceFunctionModel, TrainingData
from .hessian import exact_hessian

__all__ = ["DirectInfluence"]


class DirectInfluence(TorchInfluenceFunctionModel):
    """Exact ``(H + λI)⁻¹`` from the dense ``p × p`` Hessian of the mean training loss.

    ``fit`` forms the Hessian with ``p`` Hessian-vector products per batch and computes its
    symmetric eigendecomposition ``H + λI = V diag(w) Vᵀ`` once; every solve is then two matrix
    products. Memory is ``O(p²)``: meant for models up to some ten thousand parameters, and as
    the reference the other methods are tested against. Works for indefinite Hessians as long as
    ``H + λI`` is not singular.

    Example:
        >>> model = DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=1e-3)
        >>> model.fit(train_loader).influences(x_test, y_test, x_train, y_train).shape
        torch.Size([n_test, n_train])
    """

    _state_keys = ("eigenvalues", "eigenvectors")

    def _fit(self, data: TrainingData) -> None:
        hessian = exact_hessian(self._fn, data, data.n_samples)
        self._set_regularized_hessian(hessian)

    @property
    def hessian(self) -> Tensor:
        """The regularized Hessian ``H + λI`` (reassembled from its eigendecomposition)."""
        self._require_fitted()
        return (self._vecs * self._vals) @ self._vecs.T

    def _set_regularized_hessian(self, hessian: Tensor) -> None:
        p = hessian.shape[0]
        eye = torch.eye(p, dtype=hessian.dtype, device=hessian.device)
        vals, vecs = torch.linalg.eigh(hessian + self.regularization * eye)
        scale = float(vals.abs().max()) or 1.0
        tiny = float(vals.abs().min())
        if tiny <= scale * p * torch.finfo(hessian.dtype).eps:
            raise InvalidRegularizationError(
                f"H + λI is singular (smallest |eigenvalue| {tiny:.3g}, largest {scale:.3g}) with "
                f"regularization={self.regularization}; increase the regularization."
            )
        self._vals, self._vecs = vals, vecs

    def _solve(self, rhs: Tensor) -> Tensor:
        return ((rhs @ self._vecs) / self._vals) @ self._vecs.T

    def _get_state(self) -> dict[str, Tensor]:
        return {"eigenvalues": self._vals, "eigenvectors": self._vecs}

    def _set_state(self, state: dict[str, Tensor]) -> None:
        self._vals = state["eigenvalues"].to(self.dtype)
        self._vecs = state["eigenvectors"].to(self.dtype)
