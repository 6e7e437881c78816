"""Low-rank eigen-approximations of the Hessian (Lanczos/Arnoldi and Nyström sketch) and the
influence models built on them.

Both produce ``H ≈ U diag(Λ) Uᵀ`` with orthonormal ``U`` (``p × r``) from Hessian-vector products
only. The linear algebra runs in float64 whatever the model's dtype; random draws use a seeded
generator, so a fit is reproducible.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidParameterError, InvalidRankError, InvalidRegularizationError
from .base import TorchInfluenceFunctionModel, TrainingData, positive_int

__all__ = ["ArnoldiInfluence", "NystroemSketchInfluence", "lanczos_eigen", "nystroem_eigen"]

MatMul = Callable[[Tensor], Tensor]  # rows (k × p) -> H rows (k × p)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def lanczos_eigen(
    matmul: MatMul, p: int, rank: int, krylov_dimension: Optional[int] = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The ``rank`` eigenpairs of largest magnitude of a symmetric operator, by Lanczos with full
    reorthogonalization (the symmetric case of Arnoldi). Returns float64 ``(Λ, U)``.

    The Krylov space has ``krylov_dimension`` vectors (default ``min(p, max(2·rank + 1, 20))``);
    when it becomes invariant early, a fresh random vector orthogonal to it restarts the
    recurrence, so ``rank = p`` yields the exact eigendecomposition.
    """
    if not 0 < rank <= p:
        # more Lanczos vectors than dimensions would normalize rounding noise into the basis
        raise InvalidRankError(f"rank must be between 1 and the operator's size {p}, got {rank}.")
    m = min(p, krylov_dimension or max(2 * rank + 1, 20))
    m = max(m, rank)
    gen = _generator(seed)
    basis = torch.zeros(m, p, dtype=torch.float64)
    alphas = torch.zeros(m, dtype=torch.float64)
    betas = torch.zeros(m, dtype=torch.float64)
    q = torch.randn(p, generator=gen, dtype=torch.float64)
    basis[0] = q / q.norm()
    for j in range(m):
        # the product may live on the model's device (CUDA); the recurrence runs here
        w = matmul(basis[j : j + 1]).reshape(-1).to(device=basis.device, dtype=torch.float64)
        alphas[j] = w @ basis[j]
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        if j + 1 == m:
            break
        beta = w.norm()
        # relative to the operator's size seen so far (no absolute floor: an operator of
        # norm ~1e-10 would restart at every step and return random Rayleigh quotients)
        scale = max(float(alphas[: j + 1].abs().max()), float(betas[:j].max()) if j else 0.0)
        if beta <= 1e-10 * scale:  # invariant subspace (also β = 0 at scale 0): restart
            betas[j] = 0.0
            w = torch.randn(p, generator=gen, dtype=torch.float64)
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta = w.norm()
        else:
            betas[j] = beta
        basis[j + 1] = w / beta
    tri = torch.diag(alphas) + torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
    vals, vecs = torch.linalg.eigh(tri)
    order = torch.argsort(vals.abs(), descending=True)[:rank]
    return vals[order], basis.T @ vecs[:, order]


def nystroem_eigen(matmul: MatMul, p: int, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Nyström sketch ``H ≈ (HΩ)(ΩᵀHΩ)⁺(HΩ)ᵀ`` with a Gaussian ``Ω`` (``p × rank``), returned as
    float64 eigenpairs ``(Λ, U)``. Exact at ``rank = p``; for ``rank < p`` it assumes ``H ⪰ 0``
    (a positive semi-definite Hessian, e.g. a convex loss) and keeps its dominant subspace.
    Fewer than ``rank`` pairs (none if ``ΩᵀHΩ = 0``) when the sketch has numerically zero
    curvature in some directions.
    """
    gen = _generator(seed)
    omega, _ = torch.linalg.qr(torch.randn(p, rank, generator=gen, dtype=torch.float64))
    y = matmul(omega.T.contiguous()).to(device=omega.device, dtype=torch.float64).T  # p × rank
    core = omega.T @ y
    core = 0.5 * (core + core.T)
    s, q = torch.linalg.eigh(core)
    keep = s.abs() > s.abs().max() * rank * torch.finfo(torch.float64).eps
    s, q = s[keep], q[:, keep]
    if s.numel() == 0:
        return s, torch.zeros(p, 0, dtype=torch.float64, device=omega.device)
    b = y @ q / s.abs().sqrt()  # H ≈ B diag(sign s) Bᵀ
    qb, rb = torch.linalg.qr(b)
    small = (rb * torch.sign(s)) @ rb.T
    vals, w = torch.linalg.eigh(0.5 * (small + small.T))
    order = torch.argsort(vals.abs(), descending=True)
    return vals[order], qb @ w[:, order]


def _smallest_regularization(regularization: Union[float, Mapping[str, float]]) -> float:
    """The smallest ``λ``: of the one number, or over the blocks of a block structure."""
    if isinstance(regularization, Mapping):
        return min(float(v) for v in regularization.values())
    return float(regularization)


class _LowRankInfluence(TorchInfluenceFunctionModel):
    """``(H + λI)⁻¹ ≈ U diag(1/(Λ+λ)) Uᵀ`` (+ the complement divided by ``λ`` when asked)."""

    _state_keys = ("eigenvalues", "eigenvectors")
    _complement = False

    @property
    def _solve_copies(self) -> float:  # type: ignore[override]
        # the result (1.0 measured), and with the complement two more k × p terms (3.0 measured)
        return 4.0 if self._complement else 2.0

    def __init__(self, model, loss, regularization=None, rank: int = 10, *, seed: int = 0, **kw):
        super().__init__(model, loss, regularization, **kw)
        positive_int(rank, "rank")
        if rank > self.n_parameters:
            raise InvalidRankError(
                f"rank={rank} exceeds the number of trainable parameters ({self.n_parameters})."
            )
        self.rank = rank
        self.seed = int(seed)

    def _fit(self, data: TrainingData) -> None:
        op = self._hessian_batches(data)
        with op.reusing_graphs():
            vals, vecs = self._eigen(op.hessian_matmul)
        # no eigenpairs (nothing to check): the sketch found no curvature (H = 0 on its
        # subspace), and the complement term alone, v / λ, is then exact
        shifted = (vals + self.regularization).abs()
        if shifted.numel() and float(shifted.min()) <= (float(shifted.max()) or 1.0) * 1e-12:
            raise InvalidRegularizationError(
                f"An eigenvalue of H + λI is (numerically) zero with regularization="
                f"{self.regularization}; increase the regularization or lower the rank."
            )
        self._vals = vals.to(device=self.device, dtype=self.dtype)
        self._vecs = vecs.to(device=self.device, dtype=self.dtype)

    def _on_restricted(self) -> None:
        # a block smaller than the rank is decomposed whole (exact); the rank is per block, so
        # it cannot be chosen to fit every block's size
        self.rank = min(self.rank, self.n_parameters)

    def _eigen(self, matmul: MatMul) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _solve(self, rhs: Tensor) -> Tensor:
        coeffs = rhs @ self._vecs
        result = (coeffs / (self._vals + self.regularization)) @ self._vecs.T
        if self._complement:
            result = result + (rhs - coeffs @ self._vecs.T) / self.regularization
        return result

    def _get_state(self) -> dict[str, Tensor]:
        return {"eigenvalues": self._vals, "eigenvectors": self._vecs}

    def _set_state(self, state: dict[str, Tensor]) -> None:
        self._vals = state["eigenvalues"].to(self.dtype)
        self._vecs = state["eigenvectors"].to(self.dtype)


class ArnoldiInfluence(_LowRankInfluence):
    """Inverse Hessian from its ``rank`` dominant eigen-directions (largest |eigenvalue|), found
    by Lanczos iteration on Hessian-vector products.

    With ``H ≈ U diag(Λ) Uᵀ``:

    * ``use_woodbury=False`` (the default, as pyDVL's):
      ``(H + λI)⁻¹ v ≈ U diag(1/(Λ + λ)) Uᵀ v``: the component of ``v`` outside the dominant
      subspace is dropped (the usual choice for influence: those directions carry little
      curvature). ``λ = 0`` is allowed.
    * ``use_woodbury=True``: the exact inverse of the low-rank approximation plus ``λI``, by the
      Sherman–Morrison–Woodbury identity,
      ``(U diag(Λ) Uᵀ + λI)⁻¹ v = U diag(1/(Λ + λ)) Uᵀ v + (v − UUᵀv)/λ``: the component outside
      the subspace is kept, divided by ``λ`` (the curvature the approximation gives it). Needs
      ``λ > 0``.

    The two differ by ``(v − UUᵀv)/λ``, so they agree at ``rank = n_parameters`` (both exact)
    and for vectors within the subspace. Cost of ``fit``: ``krylov_dimension`` passes of
    Hessian-vector products over the training data; memory ``O(p · krylov_dimension)``.

    Args:
        rank: number of eigenpairs kept (≤ n_parameters); with a block structure, per block,
            and a block smaller than it is decomposed whole.
        krylov_dimension: Lanczos subspace size (default ``min(p, max(2·rank+1, 20))``); larger
            is more accurate for the kept eigenpairs.
        use_woodbury: keep the complement of the subspace, scaled by ``1/λ`` (see above).
        seed: seed of the start vector.
    """

    def __init__(
        self,
        model,
        loss,
        regularization=None,
        rank: int = 10,
        *,
        krylov_dimension: Optional[int] = None,
        use_woodbury: bool = False,
        seed: int = 0,
        **kw,
    ):
        super().__init__(model, loss, regularization, rank, seed=seed, **kw)
        self.krylov_dimension = positive_int(krylov_dimension, "krylov_dimension", allow_none=True)
        if not isinstance(use_woodbury, (bool, np.bool_)):
            raise InvalidParameterError(
                f"use_woodbury must be True or False, got {use_woodbury!r}."
            )
        self.use_woodbury = bool(use_woodbury)
        self._complement = self.use_woodbury
        if self.use_woodbury and _smallest_regularization(self.regularization) <= 0:
            raise InvalidRegularizationError(
                "ArnoldiInfluence with use_woodbury=True needs regularization > 0 (the Woodbury "
                "form divides the complement of the low-rank subspace by it); got "
                f"{self.regularization!r}."
            )

    def _eigen(self, matmul: MatMul) -> tuple[Tensor, Tensor]:
        return lanczos_eigen(matmul, self.n_parameters, self.rank, self.krylov_dimension, self.seed)


class NystroemSketchInfluence(_LowRankInfluence):
    """Nyström low-rank sketch of the Hessian, inverted with the Woodbury identity.

    ``(H + λI)⁻¹ v ≈ U diag(1/(Λ + λ)) Uᵀ v + (v − UUᵀv)/λ`` with ``H ≈ U diag(Λ) Uᵀ`` from ``rank``
    Hessian-vector products with a seeded Gaussian sketch. Needs ``λ > 0``. Exact at
    ``rank = n_parameters``; at lower rank it assumes a positive semi-definite Hessian.
    Cost of ``fit``: one pass of ``rank`` batched Hessian-vector products; memory ``O(p · rank)``.
    """

    _needs_positive_regularization = True
    _complement = True

    def _eigen(self, matmul: MatMul) -> tuple[Tensor, Tensor]:
        return nystroem_eigen(matmul, self.n_parameters, self.rank, self.seed)
