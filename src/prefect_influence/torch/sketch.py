"""A seeded random projection of gradients (a count sketch): each parameter is sent to one of
``dim`` coordinates with a random sign, so ``⟨S f, S g⟩`` estimates ``⟨f, g⟩`` without bias
(variance about ``(‖f‖²‖g‖² + ⟨f, g⟩²) / dim``). It holds two length-``p`` vectors, never a
dense ``p × dim`` matrix, and projects an ``n × p`` matrix in one pass over its entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CountSketch"]


class CountSketch:
    """The projection ``S: R^p → R^dim`` drawn from ``seed`` (the same everywhere for a seed:
    drawn on the CPU, then moved)."""

    def __init__(self, n_parameters: int, dim: int, seed: int = 0):
        if dim < 1 or n_parameters < 1:
            raise ValueError(
                f"a projection needs dim ≥ 1 and p ≥ 1, got dim={dim}, p={n_parameters}"
            )
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.n_parameters, self.dim, self.seed = int(n_parameters), int(dim), int(seed)
        self.bucket = torch.randint(0, dim, (n_parameters,), generator=generator)
        self.sign = torch.randint(0, 2, (n_parameters,), generator=generator).mul_(2).sub_(1)

    def __call__(self, rows: Tensor) -> Tensor:
        """``rows @ S`` for an ``n × p`` matrix (a vector of ``p`` is taken as one row)."""
        rows2d = rows.reshape(1, -1) if rows.dim() == 1 else rows
        if rows2d.shape[1] != self.n_parameters:
            raise ValueError(
                f"the projection takes {self.n_parameters} parameters per row, got {rows2d.shape[1]}"
            )
        bucket = self.bucket.to(rows2d.device)
        signed = rows2d * self.sign.to(device=rows2d.device, dtype=rows2d.dtype)
        out = rows2d.new_zeros(rows2d.shape[0], self.dim)
        out.index_add_(1, bucket, signed)
        return out.reshape(self.dim) if rows.dim() == 1 else out
