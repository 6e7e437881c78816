"""Matrix-free iterative solvers: block conjugate gradients (with preconditioners) and LiSSA.

Both keep the training data (as tensors) and solve ``(H + λI) x = b`` for all rows of a batch
at once, one batched Hessian-vector product over the training data per iteration.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidParameterError, InvalidRegularizationError
from .base import (
    HessianOperator,
    TorchInfluenceFunctionModel,
    TrainingData,
    non_negative,
    positive_int,
)
from .preconditioners import Preconditioner

__all__ = ["CgInfluence", "LissaInfluence"]


class _DataBackedInfluence(TorchInfluenceFunctionModel):
    """Keeps the training tensors so that Hessian-vector products can be formed after ``fit``."""

    _state_keys = ("train_x", "train_y", "batch_size")

    def __init__(self, model, loss, regularization=None, *, batch_size: Optional[int] = None, **kw):
        super().__init__(model, loss, regularization, **kw)
        self.batch_size = positive_int(batch_size, "batch_size", allow_none=True)

    def _fit(self, data: TrainingData) -> None:
        self._op = HessianOperator(
            self._fn, data.tensors(), self.batch_size or data.batch_size, self.regularization
        )

    def _get_state(self) -> dict[str, Tensor]:
        return {
            "train_x": self._op.x,
            "train_y": self._op.y,
            "batch_size": torch.tensor(self._op.batch_size, dtype=torch.int64),
        }

    def _set_state(self, state: dict[str, Tensor]) -> None:
        x = state["train_x"].to(self.device)
        y = state["train_y"].to(self.device)
        self._op = HessianOperator(self._fn, (x, y), int(state["batch_size"]), self.regularization)


class CgInfluence(_DataBackedInfluence):
    """Conjugate gradients on ``(H + λI) x = ∇θℓ(test)``, all right-hand sides of a batch at once.

    Each iteration costs one batched Hessian-vector product over the training data for the
    columns not yet converged; a column stops when ``‖r‖ ≤ max(rtol·‖b‖, atol)``. CG needs
    ``H + λI`` positive definite: a direction of non-positive curvature raises
    :class:`~prefect_influence.InvalidRegularizationError` (increase ``regularization``).

    Args:
        rtol, atol: relative and absolute tolerance on the residual norm.
        maxiter: iterations per solve (default ``n_parameters``, where exact arithmetic converges).
        preconditioner: a :class:`~prefect_influence.torch.JacobiPreconditioner` or
            :class:`~prefect_influence.torch.NystroemPreconditioner`, fitted in ``fit``.
        batch_size: training samples per Hessian-vector product (default: the loader's).
    """

    def __init__(
        self,
        model,
        loss,
        regularization=None,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: Optional[int] = None,
        preconditioner: Optional[Preconditioner] = None,
        *,
        batch_size: Optional[int] = None,
        **kw,
    ):
        super().__init__(model, loss, regularization, batch_size=batch_size, **kw)
        self.rtol = non_negative(rtol, "rtol")
        self.atol = non_negative(atol, "atol")
        if self.rtol == 0 and self.atol == 0:
            raise InvalidParameterError("rtol and atol cannot both be 0: CG would never stop.")
        self.maxiter = positive_int(maxiter, "maxiter", allow_none=True)
        if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
            raise InvalidParameterError(
                "preconditioner must be a JacobiPreconditioner or NystroemPreconditioner, got "
                f"{type(preconditioner).__name__}."
            )
        self.preconditioner = preconditioner

    @property
    def _state_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        keys = _DataBackedInfluence._state_keys
        if self.preconditioner is not None:
            keys += tuple(f"preconditioner.{k}" for k in self.preconditioner.state_keys)
        return keys

    def _fit(self, data: TrainingData) -> None:
        super()._fit(data)
        if self.preconditioner is not None:
            self.preconditioner.fit(
                self._op.hessian_matmul, self.n_parameters, self.regularization, self.dtype
            )

    def _get_state(self) -> dict[str, Tensor]:
        state = super()._get_state()
        if self.preconditioner is not None:
            state.update({f"preconditioner.{k}": v for k, v in self.preconditioner.state().items()})
        return state

    def _set_state(self, state: dict[str, Tensor]) -> None:
        super()._set_state(state)
        if self.preconditioner is not None:
            prefix = "preconditioner."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self.preconditioner.load_state(own, self.dtype, self.device)

    def _precondition(self, r: Tensor) -> Tensor:
        return r if self.preconditioner is None else self.preconditioner.solve(r)

    def _solve(self, rhs: Tensor) -> Tensor:
        maxiter = self.maxiter or self.n_parameters
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        z = self._precondition(r)
        d = z.clone()
        rz = (r * z).sum(dim=1)
        tol = torch.clamp(self.rtol * rhs.norm(dim=1), min=self.atol)
        active = r.norm(dim=1) > tol
        for _ in range(maxiter):
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            hd = self._op(d[idx])
            curvature = (d[idx] * hd).sum(dim=1)
            if bool((curvature <= 0).any()):
                raise InvalidRegularizationError(
                    "CG met a direction of non-positive curvature: H + λI is not positive "
                    f"definite with regularization={self.regularization}. Increase the "
                    "regularization, or use DirectInfluence or ArnoldiInfluence."
                )
            alpha = rz[idx] / curvature
            x[idx] += alpha[:, None] * d[idx]
            r[idx] -= alpha[:, None] * hd
            z_new = self._precondition(r[idx])
            rz_new = (r[idx] * z_new).sum(dim=1)
            beta = rz_new / rz[idx]
            d[idx] = z_new + beta[:, None] * d[idx]
            rz[idx] = rz_new
            active[idx] = r[idx].norm(dim=1) > tol[idx]
        if bool(active.any()):
            worst = float((r.norm(dim=1) / rhs.norm(dim=1).clamp_min(1e-300)).max())
            warnings.warn(
                f"CG did not converge for {int(active.sum())} of {rhs.shape[0]} right-hand sides "
                f"in {maxiter} iterations (worst relative residual {worst:.2e}); raise maxiter, "
                "add a preconditioner or increase the regularization.",
                stacklevel=3,
            )
        return x


class LissaInfluence(_DataBackedInfluence):
    """LiSSA: the Neumann-series iteration ``h ← b + (1 − dampen)·h − (H + λI) h / scale``.

    The fixed point is ``h = scale·((H + λI) + scale·dampen·I)⁻¹ b``; the result is ``h / scale``.
    It converges when ``scale`` exceeds the largest eigenvalue of ``H + λI`` (and ``H + λI ⪰ 0``).
    Each iteration uses the next batch of the training data in order (cycling), so with
    ``batch_size`` ≥ n_train it is the deterministic full-batch iteration. Stops when the largest
    relative change of an iterate falls below ``rtol`` or after ``maxiter`` iterations.
    """

    def __init__(
        self,
        model,
        loss,
        regularization=None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float = 10.0,
        rtol: float = 1e-4,
        *,
        batch_size: Optional[int] = None,
        **kw,
    ):
        super().__init__(model, loss, regularization, batch_size=batch_size, **kw)
        self.maxiter = positive_int(maxiter, "maxiter")
        self.dampen = non_negative(dampen, "dampen")
        self.scale = non_negative(scale, "scale")
        if self.scale == 0:
            raise InvalidParameterError("scale must be > 0.")
        self.rtol = non_negative(rtol, "rtol")

    def _solve(self, rhs: Tensor) -> Tensor:
        h = rhs.clone()
        batches = list(self._op.batches())
        converged = False
        for it in range(self.maxiter):
            xb, yb = batches[it % len(batches)]
            hess_h = self._fn.hvp(xb, yb, h) / xb.shape[0] + self.regularization * h
            new = rhs + (1.0 - self.dampen) * h - hess_h / self.scale
            if not bool(torch.isfinite(new).all()):
                raise InvalidParameterError(
                    f"LiSSA diverged at iteration {it + 1}: scale={self.scale} must exceed the "
                    "largest eigenvalue of H + λI, and H + λI must be positive semi-definite."
                )
            change = ((new - h).norm(dim=1) / new.norm(dim=1).clamp_min(1e-300)).max()
            h = new
            if float(change) < self.rtol:
                converged = True
                break
        if not converged:
            warnings.warn(
                f"LiSSA did not reach rtol={self.rtol} in {self.maxiter} iterations; raise "
                "maxiter or adjust scale.",
                stacklevel=3,
            )
        return h / self.scale
