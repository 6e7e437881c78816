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
    product_batch_size,
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
        x, y = data.tensors()
        batch = self.batch_size or self._default_batch_size(x, y, data.batch_size)
        self._op = HessianOperator(self._fn, (x, y), batch, self.regularization)

    def _default_batch_size(self, x: Tensor, y: Tensor, loader_batch_size: Optional[int]) -> int:
        return product_batch_size(self._fn, x, y, loader_batch_size)

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
    """Block conjugate gradients on ``(H + λI) x = ∇θℓ(test)``: the right-hand sides of a batch
    share one Krylov space.

    Each iteration costs one batched Hessian-vector product over the training data, with one
    direction per right-hand side not yet converged; a right-hand side stops when
    ``‖r‖ ≤ max(rtol·‖b‖, atol)``. CG needs
    ``H + λI`` positive definite: a direction of non-positive curvature raises
    :class:`~prefect_influence.InvalidRegularizationError` (increase ``regularization``).

    Args:
        rtol, atol: relative and absolute tolerance on the residual norm.
        maxiter: iterations per solve (default ``n_parameters``, where exact arithmetic converges).
        preconditioner: a :class:`~prefect_influence.torch.JacobiPreconditioner` or
            :class:`~prefect_influence.torch.NystroemPreconditioner`, fitted in ``fit``.
        batch_size: training samples per Hessian-vector product (default: as many as keep one
            batch's gradient graph within 64 MiB, at least the loader's batch size).
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
            with self._op.reusing_graphs():
                self.preconditioner.fit(
                    self._op.hessian_matmul, self.n_parameters, self.regularization, self.dtype,
                    self.device,
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
        with self._op.reusing_graphs():
            return self._block_cg(rhs)

    def _block_cg(self, rhs: Tensor) -> Tensor:
        """Block CG: every right-hand side of the batch searches one shared Krylov space.

        Each iteration applies ``H + λI`` once to an orthonormal block of search directions
        (as many as right-hand sides still unconverged), projects, and makes the next block
        ``H``-conjugate to it (breakdown-free form: the directions are re-orthonormalized, so
        dependent residuals cannot make the projected system singular). Sharing the space
        needs fewer products than one CG per right-hand side (measured: 140 instead of 172
        for 10 right-hand sides of a 10k-parameter MLP). Rows are vectors throughout.
        """
        maxiter = self.maxiter or self.n_parameters
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        tol = torch.clamp(self.rtol * rhs.norm(dim=1), min=self.atol)
        active = (r.norm(dim=1) > tol).nonzero().squeeze(1)
        if active.numel() == 0:
            return x
        r_act = r[active]
        directions = _orthonormal_rows(self._precondition(r_act))
        for _ in range(maxiter):
            h_dir = self._op(directions)
            projected = directions @ h_dir.T
            chol, info = torch.linalg.cholesky_ex(0.5 * (projected + projected.T))
            if int(info) != 0:
                raise InvalidRegularizationError(
                    "CG met a direction of non-positive curvature: H + λI is not positive "
                    f"definite with regularization={self.regularization}. Increase the "
                    "regularization, or use DirectInfluence or ArnoldiInfluence."
                )
            step = torch.cholesky_solve(directions @ r_act.T, chol)  # w × a
            x[active] += step.T @ directions
            r_act = r_act - step.T @ h_dir
            keep = r_act.norm(dim=1) > tol[active]
            r[active] = r_act
            if not bool(keep.any()):
                active = active[keep]
                break
            active, r_act = active[keep], r_act[keep]
            z = self._precondition(r_act)
            beta = torch.cholesky_solve(h_dir @ z.T, chol)  # w × a: makes z H-conjugate
            directions = _orthonormal_rows(z - beta.T @ directions)
        if active.numel():
            worst = float(_relative(r, rhs).max())
            warnings.warn(
                f"CG did not converge for {active.numel()} of {rhs.shape[0]} right-hand sides "
                f"in {maxiter} iterations (worst relative residual {worst:.2e}); raise maxiter, "
                "add a preconditioner or increase the regularization.",
                stacklevel=3,
            )
        return x


def _relative(diff: Tensor, ref: Tensor) -> Tensor:
    """Row norms of ``diff`` relative to those of ``ref``; a zero row of both counts as 0 (a
    floor of 1e-300 would be 0 in float32, and 0/0 a NaN that no tolerance test passes)."""
    return diff.norm(dim=1) / ref.norm(dim=1).clamp_min(torch.finfo(ref.dtype).tiny)


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """An orthonormal basis (as rows) of the span of ``rows`` (``k × p``, at most ``p`` rows)."""
    return torch.linalg.qr(rows.T).Q.T


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

    def _default_batch_size(self, x: Tensor, y: Tensor, loader_batch_size: Optional[int]) -> int:
        # one batch per iteration is the method (stochastic unless it holds every sample)
        return loader_batch_size or int(x.shape[0])

    def _solve(self, rhs: Tensor) -> Tensor:
        with self._op.reusing_graphs():
            return self._neumann(rhs)

    def _neumann(self, rhs: Tensor) -> Tensor:
        h = rhs.clone()
        converged = False
        for it in range(self.maxiter):
            batch = it % self._op.n_batches
            hess_h = self._op.batch_hessian_matmul(batch, h) + self.regularization * h
            new = rhs + (1.0 - self.dampen) * h - hess_h / self.scale
            if not bool(torch.isfinite(new).all()):
                raise InvalidParameterError(
                    f"LiSSA diverged at iteration {it + 1}: scale={self.scale} must exceed the "
                    "largest eigenvalue of H + λI, and H + λI must be positive semi-definite."
                )
            change = _relative(new - h, new).max()
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
