"""Low-rank eigen-approximations of the Hessian (Lanczos/Arnoldi and Nyström sketch) and the
influence models built on them.

Both produce ``H ≈ U diag(Λ) Uᵀ`` with orthonormal ``U`` (``p × r``) from Hessian-vector products
only. The linear algebra runs in float64 whatever the model's dtype; random draws use a seeded
generator, so a fit is reproducible.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import InvalidRankError, InvalidRegularizationError
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


class _LowRankInfluence(TorchInfluenceFunctionModel):
    """``(H + λI)⁻¹ ≈ U diag(1/(Λ+λ)) Uᵀ`` (+ the complement divided by ``λ`` when asked)."""

    _state_keys = ("eigenvalues", "eigenvectors")
    _complement = False

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
    """Inverse Hessian restricted to the ``rank`` dominant eigen-directions (largest |eigenvalue|),
    found by Lanczos iteration on Hessian-vector products.

    ``(H + λI)⁻¹ v ≈ U diag(1/(Λ + λ)) Uᵀ v``: the component of ``v`` outside the dominant subspace
    is dropped (the usual choice for influence: those directions carry little curvature). Exact
    at ``rank = n_parameters``. Cost of ``fit``: ``krylov_dimension`` passes of Hessian-vector
    products over the training data; memory ``O(p · krylov_dimension)``.

    Args:
        rank: number of eigenpairs kept (≤ n_parameters).
        krylov_dimension: Lanczos subspace size (default ``min(p, max(2·rank+1, 20))``); larger
            is more accurate for the kept eigenpairs.
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
        seed: int = 0,
        **kw,
    ):
        super().__init__(model, loss, regularization, rank, seed=seed, **kw)
        self.krylov_dimension = positive_int(krylov_dimension, "krylov_dimension", allow_none=True)

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
