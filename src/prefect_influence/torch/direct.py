"""Exact influence: the dense Hessian, factorized once (Cholesky, or LU if it is indefinite)."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidParameterError, InvalidRegularizationError
from .base import TorchInfluenceFunctionModel, TrainingData
from .functional import ModelFunctions
from .hessian import exact_hessian

__all__ = ["DirectInfluence"]

#: a warning is given when the condition estimate times the factorization's unit round-off
#: exceeds this: the solution may then have lost more than all but three of its digits
ILL_CONDITIONED = 1e-3


class DirectInfluence(TorchInfluenceFunctionModel):
    """Exact ``(H + λI)⁻¹`` from the dense ``p × p`` Hessian of the mean training loss.

    ``fit`` forms the Hessian (for networks of ``nn.Linear`` layers from the layers' structure,
    at matrix-product speed; otherwise with ``p`` Hessian-vector products) and factorizes
    ``H + λI`` once: by Cholesky when it is positive definite, by LU with partial pivoting when
    it is not, as for a trained network stopped short of an exact minimum. Every solve is then
    two triangular solves. Only a factorization that breaks down (an exactly zero pivot, e.g. a
    parameter the loss does not depend on with ``λ = 0``) is refused; an ill-conditioned
    ``H + λI`` gets a ``UserWarning`` with its condition estimate. Memory is ``O(p²)``: meant for
    models up to some ten thousand parameters, and as the reference for the other methods.

    Args:
        hessian_dtype: dtype in which the Hessian is formed, factorized and applied (default:
            the model's). ``torch.float64`` for a float32 model evaluates a float64 copy of the
            model during ``fit``: slower, and accurate to the float32 gradients instead of to
            the float32 Hessian. Factors are returned in the model's dtype.

    Example:
        >>> model = DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=1e-3)
        >>> model.fit(train_loader).influences(x_test, y_test, x_train, y_train).shape
        torch.Size([n_test, n_train])
    """

    _state_keys = ("factor", "pivots")

    def __init__(
        self, model, loss, regularization=None, *, hessian_dtype: Optional[torch.dtype] = None, **kw
    ):
        super().__init__(model, loss, regularization, **kw)
        if hessian_dtype is not None and (
            not isinstance(hessian_dtype, torch.dtype) or not hessian_dtype.is_floating_point
        ):
            raise InvalidParameterError(
                f"hessian_dtype must be a floating torch.dtype such as torch.float64, got "
                f"{hessian_dtype!r}."
            )
        self.hessian_dtype = hessian_dtype or self.dtype
        #: condition number of ``H + λI`` (|largest / smallest eigenvalue|) estimated in the
        #: last fit, ``None`` before
        self.condition_estimate: Optional[float] = None

    def _fit(self, data: TrainingData) -> None:
        fn = self._fn
        batches = list(data)
        if self.hessian_dtype != self.dtype:
            copied = copy.deepcopy(self.model).to(self.hessian_dtype)
            fn = ModelFunctions(copied, self.loss, self._fn.names, self._fn.second_order)
            batches = [(_cast(x, fn.dtype), _cast(y, fn.dtype)) for x, y in batches]
        matrix = exact_hessian(fn, batches, data.n_samples)
        matrix.diagonal().add_(self.regularization)
        self._factorize(matrix)

    def _factorize(self, matrix: Tensor) -> None:
        largest = _largest_magnitude(matrix)
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            self._factor, self._pivots = chol, torch.zeros(0, dtype=torch.int32)
            definite = True
        else:
            del chol
            lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
            if int(info) != 0:
                raise InvalidRegularizationError(
                    f"H + λI is singular: its LU factorization met an exactly zero pivot at "
                    f"{self._parameter_at(int(info) - 1)}, with regularization="
                    f"{self.regularization}: typically a parameter the loss does not depend on. "
                    "Increase the regularization, or freeze such parameters."
                )
            self._factor, self._pivots = lu, pivots
            definite = False
        del matrix
        if not bool(torch.isfinite(self._factor.diagonal()).all()):
            raise InvalidRegularizationError(
                "The factorization of H + λI produced non-finite values "
                f"(regularization={self.regularization}); increase the regularization."
            )
        smallest_inverse = _inverse_largest_magnitude(self._apply_inverse, self._factor)
        self.condition_estimate = largest * smallest_inverse
        self._warn_if_ill_conditioned(definite)

    def _warn_if_ill_conditioned(self, definite: bool) -> None:
        eps = torch.finfo(self._factor.dtype).eps
        cond = self.condition_estimate
        if not cond * eps > ILL_CONDITIONED:
            return
        digits = -math.log10(eps)
        shape = "positive definite" if definite else "indefinite (Cholesky failed; LU used)"
        if cond * eps >= 1:
            loss = f"it is numerically singular in {_name(self._factor.dtype)}"
        else:
            loss = (
                f"in {_name(self._factor.dtype)} up to {math.log10(cond):.0f} of {digits:.0f} "
                "significant digits may be lost along its smallest eigenvalues"
            )
        remedy = "more regularization improves the conditioning"
        if eps > torch.finfo(torch.float64).eps:
            remedy += ", hessian_dtype=torch.float64 the accuracy"
        warnings.warn(
            f"H + λI is ill-conditioned: condition number ≈ {cond:.2e} (|largest / smallest "
            f"eigenvalue|), {shape}, at "
            f"regularization={self.regularization}; {loss}. Influences stay accurate as far as "
            f"the gradients avoid those directions; {remedy}.",
            UserWarning,
            stacklevel=5,  # the caller of fit()
        )

    def _parameter_at(self, index: int) -> str:
        for name, numel in zip(self._fn.names, self._fn.numels):
            if index < numel:
                return f"parameter {name!r} (entry {index})"
            index -= numel
        return f"index {index}"

    @property
    def hessian(self) -> Tensor:
        """The regularized Hessian ``H + λI``, reassembled from its factorization (``O(p³)``)."""
        self._require_fitted()
        if self._pivots.numel() == 0:
            matrix = self._factor @ self._factor.T
        else:
            perm, lower, upper = torch.lu_unpack(self._factor, self._pivots)
            matrix = perm @ lower @ upper
        return matrix.to(self.dtype)

    def _apply_inverse(self, rhs_columns: Tensor) -> Tensor:
        """``(H + λI)⁻¹`` times the columns of ``rhs_columns`` (``p × k``, the factor's dtype)."""
        if self._pivots.numel() == 0:
            return torch.cholesky_solve(rhs_columns, self._factor)
        return torch.linalg.lu_solve(self._factor, self._pivots, rhs_columns)

    @property
    def _solve_copies(self) -> float:  # type: ignore[override]
        # the triangular solves' result (1.2 measured); in another hessian_dtype also the cast
        # right-hand sides, the result in that dtype and its cast back (5.0 measured for float64)
        ratio = self.hessian_dtype.itemsize / self.dtype.itemsize
        return 2.0 if self.hessian_dtype == self.dtype else 1.0 + 2.5 * ratio

    def _solve(self, rhs: Tensor) -> Tensor:
        columns = rhs.T.to(self._factor.dtype)
        return self._apply_inverse(columns).T.to(self.dtype)

    def _get_state(self) -> dict[str, Tensor]:
        return {"factor": self._factor, "pivots": self._pivots}

    def _set_state(self, state: dict[str, Tensor]) -> None:
        self._factor = state["factor"]
        self._pivots = state["pivots"].to(device=self.device, dtype=torch.int32)
        self.hessian_dtype = self._factor.dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _largest_magnitude(matrix: Tensor) -> float:
    """``max |λ(A)|`` of a symmetric matrix (within a few percent)."""
    return _power_iteration(lambda v: matrix @ v, matrix, iterations=20, seed=0)


def _inverse_largest_magnitude(apply_inverse, factor: Tensor) -> float:
    """``max |λ(A⁻¹)| = 1 / min |λ(A)|`` by inverse iteration with the factorization: a lower
    bound that two eigenvalues of similar size near zero make converge slowly, so the
    condition number it gives is an estimate from below."""
    return _power_iteration(apply_inverse, factor, iterations=10, seed=1)


def _power_iteration(apply, like: Tensor, iterations: int, seed: int) -> float:
    """Largest ``‖apply(v)‖`` over seeded power iterations from a unit ``v`` (a column in
    ``like``'s dtype and device): a lower bound of the operator's largest |eigenvalue|."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape[0], 1, generator=gen, dtype=torch.float64)
    v = (v / v.norm()).to(dtype=like.dtype, device=like.device)
    estimate = 0.0
    for _ in range(iterations):
        w = apply(v)
        norm = float(w.norm())
        estimate = max(estimate, norm)
        if not math.isfinite(norm) or norm == 0:
            break
        v = w / norm
    return estimate
