"""Matrix-free iterative solvers: conjugate gradients (one per right-hand side or block) with a
MINRES fallback for indefinite curvature (all preconditionable), and LiSSA.

Both keep the training data (as tensors) and solve ``(H + λI) x = b`` for all rows of a batch
at once, one batched Hessian-vector product over the training data per iteration.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidParameterError
from .base import TorchInfluenceFunctionModel, TrainingData, non_negative, positive_int
from .operator import HessianOperator, product_batch_size
from .preconditioners import NystroemPreconditioner, Preconditioner

__all__ = ["CgInfluence", "LissaInfluence", "minres"]

logger = logging.getLogger(__name__)


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

    def _solve_row_copies(self) -> float:
        # each vector differentiated in a Hessian-vector product needs about one batch's
        # gradient graph more
        graph = -(-self._op.graph_bytes() // self._op.n_batches)
        return self._solve_copies + graph / (self.n_parameters * self.dtype.itemsize)

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
    """Conjugate gradients on ``(H + λI) x = ∇θℓ(test)``: one CG per right-hand side (pyDVL's
    default), or block CG (``solve_simultaneously=True``), where the right-hand sides of a batch
    share one Krylov space.

    Either way each iteration costs one batched Hessian-vector product over the training data
    with one vector per right-hand side not yet converged (the separate CGs advance together,
    each with its own step sizes); a right-hand side stops when ``‖r‖ ≤ max(rtol·‖b‖, atol)``,
    so both give the solution to that tolerance. Block CG usually needs fewer iterations, as
    each right-hand side searches the others' directions too. A trained network stopped short
    of an exact minimum often has an indefinite ``H + λI``: when CG meets a direction of
    non-positive curvature, the right-hand sides it stops continue from where CG left them with
    MINRES (:func:`minres`), which solves symmetric indefinite systems, with the same
    preconditioner, tolerances and iteration budget.

    Args:
        rtol, atol: relative and absolute tolerance on the residual norm. ``rtol`` defaults to
            1e-7, or to 100 units of round-off of the model's dtype where that is larger
            (1.2e-5 in float32: smaller residuals are below what float32 products resolve).
        maxiter: iterations per right-hand side, CG and MINRES together (default
            ``10·n_parameters``, as pyDVL: exact arithmetic converges within ``n_parameters``,
            finite precision on an indefinite, ill-conditioned ``H + λI`` needs more; MINRES
            stops earlier once restarting no longer halves its residual).
        preconditioner: a :class:`~prefect_influence.torch.JacobiPreconditioner` or
            :class:`~prefect_influence.torch.NystroemPreconditioner`, fitted in ``fit``.
        solve_simultaneously: ``False`` (pyDVL's default): one CG per right-hand side; ``True``:
            block CG.
        warn_on_max_iteration: warn (``True``) or log at DEBUG level (``False``) when a
            right-hand side does not converge.
        progress: log each solve's iterations (at INFO level).
        batch_size: training samples per Hessian-vector product (default: as many as keep one
            batch's gradient graph within 64 MiB, at least the loader's batch size).

    Right-hand sides are solved in chunks that fit ``memory_budget_bytes``; one CG per
    right-hand side gives the same solutions in chunks (up to rounding), block CG solutions
    that agree within the tolerance (each chunk searches its own Krylov space).
    """

    #: the iterate, residuals, search directions, their products and the recurrence's
    #: temporaries (9.3 measured for both CG forms), with a margin for a preconditioner's output
    #: and MINRES's vectors
    _solve_copies = 12.0

    def __init__(
        self,
        model,
        loss,
        regularization=None,
        rtol: Optional[float] = None,
        atol: float = 1e-7,
        maxiter: Optional[int] = None,
        preconditioner: Optional[Preconditioner] = None,
        *,
        solve_simultaneously: bool = False,
        warn_on_max_iteration: bool = True,
        progress: bool = False,
        batch_size: Optional[int] = None,
        **kw,
    ):
        super().__init__(model, loss, regularization, batch_size=batch_size, **kw)
        if rtol is None:
            rtol = max(1e-7, 100 * torch.finfo(self.dtype).eps)
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
        for name, flag in (
            ("solve_simultaneously", solve_simultaneously),
            ("warn_on_max_iteration", warn_on_max_iteration),
            ("progress", progress),
        ):
            if not isinstance(flag, (bool, np.bool_)):
                raise InvalidParameterError(f"{name} must be True or False, got {flag!r}.")
        self.solve_simultaneously = bool(solve_simultaneously)
        self.warn_on_max_iteration = bool(warn_on_max_iteration)
        self.progress = bool(progress)

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
                self.preconditioner.fit(self._op, self.regularization)

    def _on_restricted(self) -> None:
        # a Hessian block smaller than a Nyström preconditioner's rank is sketched whole (then
        # the preconditioner is exact); the rank is per block and cannot fit every block's size
        pre = self.preconditioner
        if isinstance(pre, NystroemPreconditioner) and pre.rank > self.n_parameters:
            pre.rank = self.n_parameters

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
        maxiter = self.maxiter or 10 * self.n_parameters
        tol = torch.clamp(self.rtol * rhs.norm(dim=1), min=self.atol)
        # iterations each right-hand side has used, CG and MINRES together
        spent = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
        with self._op.reusing_graphs():
            if self.solve_simultaneously:
                x, r, active, used, indefinite = self._block_cg(rhs, tol, maxiter)
                spent[:] = used
                # MINRES takes over the unconverged columns
                stopped = [(active, used)] if indefinite else []
            else:
                x, r, spent, stopped = self._cg(rhs, tol, maxiter)
            for rows, used in stopped:
                logger.info(
                    "CG met non-positive curvature (H + λI is indefinite at regularization=%s) "
                    "after %d iterations; continuing %d right-hand side(s) with MINRES.",
                    self.regularization,
                    used,
                    rows.numel(),
                )
                step, residual, more = minres(
                    self._op, r[rows], tol[rows], maxiter - used, self._precondition
                )
                x[rows] += step
                r[rows] = residual
                spent[rows] = used + more
        unconverged = (r.norm(dim=1) > tol).nonzero().squeeze(1)
        if self.progress:
            logger.info(
                "CG solved %d right-hand side(s): %d iterations at most, %d not converged.",
                rhs.shape[0],
                int(spent.max()) if spent.numel() else 0,
                unconverged.numel(),
            )
        if unconverged.numel():
            worst = float(_relative(r, rhs).max())
            if bool((spent[unconverged] < maxiter).any()):
                why = (
                    f"(MINRES stopped improving after {int(spent[unconverged].min())} "
                    "iterations: H + λI is indefinite and too ill-conditioned for "
                    f"{str(self.dtype).removeprefix('torch.')} products)"
                )
            else:
                why = f"in {maxiter} iterations"
            message = (
                f"CG did not converge for {unconverged.numel()} of {rhs.shape[0]} right-hand "
                f"sides {why}: worst relative residual {worst:.2e}, rtol={self.rtol:.2g}. Raise "
                "maxiter, add a preconditioner or increase the regularization; DirectInfluence "
                "is exact."
            )
            if self.warn_on_max_iteration:
                warnings.warn(message, stacklevel=3)
            else:
                logger.debug(message)
        return x

    def _cg(
        self, rhs: Tensor, tol: Tensor, maxiter: int
    ) -> tuple[Tensor, Tensor, Tensor, list[tuple[Tensor, int]]]:
        """Preconditioned CG for every row of ``rhs`` separately: each row has its own
        recurrence (step sizes, search direction), and all rows not yet converged share one
        batched product per iteration. Rows are vectors throughout.

        Returns the iterate, the residuals, the iterations each row used and, for the rows that
        met a direction of non-positive curvature, groups ``(rows, iterations used)``.
        """
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        spent = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
        stopped: list[tuple[Tensor, int]] = []
        active = (r.norm(dim=1) > tol).nonzero().squeeze(1)
        if active.numel() == 0:
            return x, r, spent, stopped
        r_act = r[active]
        z = self._precondition(r_act)
        direction = z
        rz = (r_act * z).sum(dim=1)
        for iteration in range(maxiter):
            h_dir = self._op(direction)
            curvature = (direction * h_dir).sum(dim=1)
            ok = curvature > 0  # also False for NaN
            if not bool(ok.all()):
                stopped.append((active[~ok], iteration))
                spent[active[~ok]] = iteration
                active, r_act, direction, h_dir = active[ok], r_act[ok], direction[ok], h_dir[ok]
                rz, curvature = rz[ok], curvature[ok]
                if active.numel() == 0:
                    return x, r, spent, stopped
            alpha = rz / curvature
            x[active] += alpha[:, None] * direction
            r_act = r_act - alpha[:, None] * h_dir
            r[active] = r_act
            spent[active] = iteration + 1
            keep = r_act.norm(dim=1) > tol[active]
            if not bool(keep.any()):
                return x, r, spent, stopped
            active, r_act, direction, rz = active[keep], r_act[keep], direction[keep], rz[keep]
            z = self._precondition(r_act)
            rz_new = (r_act * z).sum(dim=1)
            direction = z + (rz_new / rz)[:, None] * direction
            rz = rz_new
        return x, r, spent, stopped

    def _block_cg(
        self, rhs: Tensor, tol: Tensor, maxiter: int
    ) -> tuple[Tensor, Tensor, Tensor, int, bool]:
        """Block CG: every right-hand side of the batch searches one shared Krylov space.

        Each iteration applies ``H + λI`` once to an orthonormal block of search directions
        (as many as right-hand sides still unconverged), projects, and makes the next block
        ``H``-conjugate to it (breakdown-free form: the directions are re-orthonormalized, so
        dependent residuals cannot make the projected system singular). Sharing the space
        needs fewer products than one CG per right-hand side. Rows are vectors throughout.

        Returns the iterate, the residuals, the unconverged columns, the iterations used and
        whether CG stopped at a direction of non-positive curvature.
        """
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        active = (r.norm(dim=1) > tol).nonzero().squeeze(1)
        if active.numel() == 0:
            return x, r, active, 0, False
        r_act = r[active]
        directions = _orthonormal_rows(self._precondition(r_act))
        for iteration in range(maxiter):
            h_dir = self._op(directions)
            projected = directions @ h_dir.T
            chol, info = torch.linalg.cholesky_ex(0.5 * (projected + projected.T))
            if int(info) != 0:
                return x, r, active, iteration, True
            step = torch.cholesky_solve(directions @ r_act.T, chol)  # w × a
            x[active] += step.T @ directions
            r_act = r_act - step.T @ h_dir
            keep = r_act.norm(dim=1) > tol[active]
            r[active] = r_act
            if not bool(keep.any()):
                return x, r, active[keep], iteration + 1, False
            active, r_act = active[keep], r_act[keep]
            z = self._precondition(r_act)
            beta = torch.cholesky_solve(h_dir @ z.T, chol)  # w × a: makes z H-conjugate
            directions = _orthonormal_rows(z - beta.T @ directions)
        return x, r, active, maxiter, False


def minres(
    operator: Callable[[Tensor], Tensor],
    rhs: Tensor,
    tol: Tensor,
    maxiter: int,
    precondition: Callable[[Tensor], Tensor] = lambda r: r,
) -> tuple[Tensor, Tensor, int]:
    """Preconditioned MINRES (Paige & Saunders 1975) for a symmetric, possibly indefinite
    operator, on every row of ``rhs`` at once: one batched product per iteration over the
    rows still unconverged. ``precondition`` must apply a positive definite matrix.

    Each row has its own Lanczos recurrence and stops when the residual norm the recurrence
    tracks (in the preconditioner's norm, relative to the start) falls below ``tol / ‖rhs‖``.
    The true residuals are then computed once; a row still above ``tol`` restarts from its
    iterate as long as each restart halves its residual. Returns the iterates, their true
    residuals and the products used.
    """
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    previous = rhs.norm(dim=1)
    active = (previous > tol).nonzero().squeeze(1)
    target = tol / previous.clamp_min(torch.finfo(rhs.dtype).tiny)
    used = 0
    while active.numel() and used < maxiter:
        step, stopped, iterations = _minres_run(
            operator, residual[active], target[active], maxiter - used, precondition
        )
        x[active] += step
        residual[active] = rhs[active] - operator(x[active])
        used += iterations + 1
        norms = residual[active].norm(dim=1)
        # a restart is worth it only while it still halves the true residual; it aims ten
        # times below the tolerance, as the estimate (in the preconditioner's norm, drifting
        # in low precision) stopped short of it
        again = stopped & (norms > tol[active]) & (norms < 0.5 * previous[active])
        previous[active] = norms
        target[active] = 0.1 * tol[active] / norms
        active = active[again]
    return x, residual, used


def _minres_run(operator, b: Tensor, rtol: Tensor, maxiter: int, precondition):
    """One MINRES recurrence from zero on the rows of ``b``; returns the iterates, which rows
    stopped on their residual estimate, and the iterations run."""
    k = b.shape[0]
    x = torch.zeros_like(b)
    r1 = b
    y = precondition(r1)
    beta1 = (r1 * y).sum(dim=1).clamp_min(0).sqrt()
    zeros = torch.zeros(k, dtype=b.dtype, device=b.device)
    old_beta, beta, dbar, eps_ln = zeros.clone(), beta1.clone(), zeros.clone(), zeros.clone()
    phibar, cs, sn = beta1.clone(), -torch.ones_like(zeros), zeros.clone()
    w, w2, r2 = torch.zeros_like(b), torch.zeros_like(b), b.clone()
    stopped = torch.zeros(k, dtype=torch.bool, device=b.device)
    rows = torch.arange(k, device=b.device)
    tiny = torch.finfo(b.dtype).tiny
    for iteration in range(maxiter):
        v = y / beta.clamp_min(tiny)[:, None]
        y = operator(v)
        if iteration:
            y = y - (beta / old_beta)[:, None] * r1
        alpha = (v * y).sum(dim=1)
        y = y - (alpha / beta.clamp_min(tiny))[:, None] * r2
        r1, r2 = r2, y
        y = precondition(r2)
        old_beta = beta
        beta = (r2 * y).sum(dim=1).clamp_min(0).sqrt()
        old_eps = eps_ln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_ln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - old_eps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        x[rows] += phi[:, None] * w
        keep = phibar > rtol[rows] * beta1[rows]
        if not bool(keep.all()):
            stopped[rows[~keep]] = True
            rows = rows[keep]
            if rows.numel() == 0:
                return x, stopped, iteration + 1
            state = (old_beta, beta, dbar, eps_ln, phibar, cs, sn, w, w2, r1, r2, y)
            (old_beta, beta, dbar, eps_ln, phibar, cs, sn, w, w2, r1, r2, y) = (
                t[keep] for t in state
            )
    return x, stopped, maxiter


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
    relative change of an iterate falls below ``rtol`` or after ``maxiter`` iterations; as that
    is the largest over the right-hand sides solved together, solutions in chunks (of
    ``memory_budget_bytes``) agree with those of one solve within the tolerance.
    """

    #: the iterate, its product and the update's temporaries (7.5 measured)
    _solve_copies = 9.0

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
        # the step ‖h_new − h‖ shrinks when the iteration converges (for the full batch it
        # cannot grow); its mean over windows of at least one pass tells divergence from noise
        window = max(self._op.n_batches, 20)
        steps, smallest, latest = 0.0, math.inf, math.inf
        for it in range(self.maxiter):
            batch = it % self._op.n_batches
            hess_h = self._op.batch_hessian_matmul(batch, h) + self.regularization * h
            new = rhs + (1.0 - self.dampen) * h - hess_h / self.scale
            if not bool(torch.isfinite(new).all()):
                raise InvalidParameterError(
                    f"LiSSA diverged to non-finite values at iteration {it + 1}. "
                    + self._divergence_hint()
                )
            step = new - h
            change = _relative(step, new).max()
            steps += float(step.norm(dim=1).max())
            h = new
            if float(change) < self.rtol:
                converged = True
                break
            if (it + 1) % window == 0:
                latest, steps = steps / window, 0.0
                if latest > 10 * smallest:
                    raise InvalidParameterError(
                        f"LiSSA diverges: its steps grew {latest / smallest:.0f}-fold by iteration "
                        f"{it + 1}. {self._divergence_hint()}"
                    )
                smallest = min(smallest, latest)
        if not converged:
            growing = latest > 1.5 * smallest
            warnings.warn(
                f"LiSSA did not reach rtol={self.rtol} in {self.maxiter} iterations; "
                + (
                    f"its steps grow, so it appears to diverge. {self._divergence_hint()}"
                    if growing
                    else "raise maxiter or adjust scale."
                ),
                stacklevel=3,
            )
        return h / self.scale

    def _divergence_hint(self) -> str:
        return (
            f"The iteration converges only if H + λI is positive definite with eigenvalues below "
            f"scale={self.scale} (regularization={self.regularization}): raise scale or the "
            "regularization, or use CgInfluence, which handles indefinite curvature."
        )
