"""Preconditioners for :class:`~prefect_influence.torch.CgInfluence`: diagonal (Jacobi) and
low-rank Nyström. Each is fitted from Hessian-vector products and exports plain tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import (
    InvalidParameterError,
    InvalidRankError,
    NotFittedError,
)
from .base import positive_int
from .curvature import checked_regularization
from .lowrank import nystroem_eigen
from .operator import HessianOperator

__all__ = ["Preconditioner", "JacobiPreconditioner", "NystroemPreconditioner"]

MatMul = Callable[[Tensor], Tensor]


class Preconditioner(ABC):
    """Approximates ``(A + λI)⁻¹`` cheaply for a symmetric positive semi-definite ``A`` (the
    Hessian), to speed up conjugate gradients on ``(A + λI) x = b``.

    :meth:`fit` takes the operator ``A`` (without ``λ``) and ``λ``, as pyDVL's
    ``Preconditioner.fit(operator, regularization)`` does; :meth:`solve` applies the
    approximation to a vector or to every row of a matrix (rows are vectors throughout this
    package; pyDVL's ``solve`` takes vectors as columns, the same for a vector or a symmetric
    matrix).
    """

    state_keys: tuple[str, ...] = ()

    def fit(self, operator: Any, regularization: Optional[float] = None) -> "Preconditioner":
        """Fit to ``operator`` and ``λ`` (``None`` is 0); returns ``self``.

        ``operator``: a :class:`~prefect_influence.torch.operator.HessianOperator` (its Hessian
        without ``λ`` is used), or any object with ``apply(rows)`` (the operator applied to every
        row of a ``k × n`` matrix) and ``input_size`` (``n``), optionally ``dtype`` and
        ``device``, as pyDVL's ``TensorOperator`` has them. The fitted tensors live on that
        device, in that dtype.
        """
        reg = checked_regularization(regularization)
        matmul, n, dtype, device = _operator_parts(operator)
        self._fit(matmul, n, reg, dtype, device)
        self._reg = reg
        return self

    @abstractmethod
    def _fit(
        self, matmul: MatMul, n: int, regularization: float, dtype: torch.dtype, device: Any
    ) -> None:
        """Build from ``matmul`` (``A`` applied to rows, ``n`` columns)."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load_state`) has run."""

    @property
    def regularization(self) -> Optional[float]:
        """The ``λ`` fitted for (``None`` before a fit); setting it refits only what ``λ``
        changes."""
        return getattr(self, "_reg", None)

    @regularization.setter
    def regularization(self, value: float) -> None:
        reg = checked_regularization(value)
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit(operator, regularization)."
            )
        self._set_regularization(reg)
        self._reg = reg

    @property
    def modify_regularization_requires_fit(self) -> bool:
        """pyDVL's flag: ``False``, changing :attr:`regularization` needs no new fit."""
        return False

    @abstractmethod
    def _set_regularization(self, regularization: float) -> None:
        """Adapt the fitted tensors to another ``λ``."""

    def solve(self, rhs: Tensor) -> Tensor:
        """Apply the preconditioner to a vector or to every row of a matrix."""
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit(operator, regularization)."
            )
        if rhs.ndim == 1:
            return self._solve(rhs[None])[0]
        return self._solve(rhs)

    @abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """Apply the preconditioner to every row of ``rhs``."""

    @abstractmethod
    def to(self, device: Any) -> "Preconditioner":
        """Move the fitted tensors to ``device``; returns ``self``."""

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
    ``diag(H) ≈ mean_k z_k ⊙ H z_k`` over ``num_samples_estimator`` seeded Rademacher vectors
    (pyDVL draws Gaussian ones; Rademacher vectors have lower variance and are exact for a
    diagonal ``H``).

    A noisy estimate may be small or negative; its magnitude is used and floored at ``λ`` (or a
    tiny positive value), so the preconditioner is always positive definite.
    """

    state_keys = ("inverse_diagonal",)

    def __init__(self, num_samples_estimator: int = 1, seed: int = 0):
        self.num_samples_estimator = positive_int(num_samples_estimator, "num_samples_estimator")
        self.seed = int(seed)
        self._diag: Optional[Tensor] = None
        self._inverse: Optional[Tensor] = None

    @property
    def is_fitted(self) -> bool:
        return self._inverse is not None

    def _fit(self, matmul, n, regularization, dtype, device) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randint(0, 2, (self.num_samples_estimator, n), generator=gen) * 2 - 1
        z = z.to(device=device, dtype=dtype)
        probe = matmul(z)
        self._diag = (z.to(probe) * probe).mean(dim=0).abs()
        self._inverse = self._inverse_for(regularization)

    def _inverse_for(self, regularization: float) -> Tensor:
        diag = self._diag + regularization
        floor = max(regularization, float(diag.max()) * 1e-6, 1e-30)
        return 1.0 / diag.clamp_min(floor)

    def _set_regularization(self, regularization: float) -> None:
        if self._diag is None:
            raise InvalidParameterError(
                "This JacobiPreconditioner was restored from a fitted state, which holds only "
                "its inverse diagonal for one λ; call fit to use another regularization."
            )
        self._inverse = self._inverse_for(regularization)

    def _solve(self, rhs: Tensor) -> Tensor:
        return rhs * self._inverse

    def to(self, device: Any) -> "JacobiPreconditioner":
        if self._diag is not None:
            self._diag = self._diag.to(device)
        if self._inverse is not None:
            self._inverse = self._inverse.to(device)
        return self

    def state(self) -> dict[str, Tensor]:
        return {"inverse_diagonal": self._inverse}

    def load_state(self, state, dtype, device) -> None:
        self._inverse = state["inverse_diagonal"].to(device=device, dtype=dtype)
        self._diag = None


class NystroemPreconditioner(Preconditioner):
    """Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023):
    ``P⁻¹ = (Λ_r + λ) U (Λ + λI)⁻¹ Uᵀ + (I − UUᵀ)`` from a rank-``rank`` sketch ``H ≈ U Λ Uᵀ``.
    ``rank`` may not exceed the operator's size; in a :class:`CgInfluence` with a block
    structure, a block smaller than it is sketched whole.
    """

    state_keys = ("eigenvalues", "eigenvectors", "regularization")

    def __init__(self, rank: int, seed: int = 0):
        self.rank = positive_int(rank, "rank")
        self.seed = int(seed)
        self._vals: Optional[Tensor] = None
        self._vecs: Optional[Tensor] = None

    @property
    def is_fitted(self) -> bool:
        return self._vals is not None

    def _fit(self, matmul, n, regularization, dtype, device) -> None:
        if self.rank > n:
            raise InvalidRankError(
                f"NystroemPreconditioner rank={self.rank} exceeds the number of trainable "
                f"parameters ({n})."
            )
        vals, vecs = nystroem_eigen(matmul, n, self.rank, self.seed)
        # only directions of positive curvature are rescaled: with λ = 0 a zero one would
        # make the scale (smallest / shifted) 0/0; none left is the identity preconditioner
        positive = vals > 0
        self._vals = vals[positive].to(device=device, dtype=dtype)
        self._vecs = vecs[:, positive].to(device=device, dtype=dtype)
        self._reg_t = torch.tensor(float(regularization), dtype=dtype, device=device)

    def _set_regularization(self, regularization: float) -> None:
        self._reg_t = torch.tensor(regularization, dtype=self._vals.dtype, device=self._vals.device)

    def _solve(self, rhs: Tensor) -> Tensor:
        if self._vals.numel() == 0:
            return rhs
        coeffs = rhs @ self._vecs
        shifted = self._vals + self._reg_t
        smallest = shifted.min()
        return (coeffs * (smallest / shifted)) @ self._vecs.T + rhs - coeffs @ self._vecs.T

    def to(self, device: Any) -> "NystroemPreconditioner":
        if self.is_fitted:
            self._vals, self._vecs = self._vals.to(device), self._vecs.to(device)
            self._reg_t = self._reg_t.to(device)
        return self

    def state(self) -> dict[str, Tensor]:
        return {
            "eigenvalues": self._vals,
            "eigenvectors": self._vecs,
            "regularization": self._reg_t,
        }

    def load_state(self, state, dtype, device) -> None:
        self._vals = state["eigenvalues"].to(device=device, dtype=dtype)
        self._vecs = state["eigenvectors"].to(device=device, dtype=dtype)
        self._reg_t = state["regularization"].to(device=device, dtype=dtype)
        self._reg = float(self._reg_t)


def _operator_parts(operator: Any) -> tuple[MatMul, int, torch.dtype, Any]:
    """The row-wise product, size, dtype and device of an operator a preconditioner fits to."""
    if isinstance(operator, HessianOperator):
        fn = operator.fn
        return operator.hessian_matmul, fn.n_parameters, fn.dtype, fn.device
    if callable(getattr(operator, "apply", None)) and hasattr(operator, "input_size"):
        dtype = getattr(operator, "dtype", None) or torch.get_default_dtype()
        device = getattr(operator, "device", None)

        def matmul(rows: Tensor) -> Tensor:
            # the sketches draw float64 probes; the operator takes its own dtype and device
            return operator.apply(rows.to(device=device, dtype=dtype))

        return matmul, int(operator.input_size), dtype, device
    raise InvalidParameterError(
        "A preconditioner is fitted to a HessianOperator or to an operator with apply(rows) and "
        f"input_size (pyDVL's TensorOperator); got {type(operator).__name__}."
    )
