"""DataInf: the inverse harmonic mean of the damped rank-one gradient terms, in closed form."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .base import TorchInfluenceFunctionModel, TrainingData
from .curvature import BlockMode, BlockStructure
from .functional import LossFunction, rows_within

__all__ = ["InverseHarmonicMeanInfluence"]


class InverseHarmonicMeanInfluence(TorchInfluenceFunctionModel):
    """DataInf (Kwon et al., 2024): ``(1/n) Σᵢ (gᵢgᵢᵀ + λI)⁻¹`` in place of ``(H + λI)⁻¹``.

    The Gauss-Newton matrix ``(1/n) Σ gᵢgᵢᵀ + λI`` is an arithmetic mean of damped rank-one
    terms; DataInf swaps the order of inversion and averaging, so that each term inverts in
    closed form (Sherman–Morrison):

        (gᵢgᵢᵀ + λI)⁻¹ v = (v − gᵢ (gᵢᵀv) / (λ + ‖gᵢ‖²)) / λ

    and no system is solved. It is exact for one training sample; otherwise it departs from
    the Gauss-Newton inverse as the gradients' norms grow against ``λ``. It is meant for large
    models, block by block (``block_structure=BlockMode.LAYER_WISE``), where any solve would
    cost far more.

    ``fit`` keeps the per-sample training gradients (``n × p`` numbers: memory and the fitted
    state grow with the training set) and their squared norms; a solve is two matrix products
    with them. The state does not depend on ``λ``. The mean runs over all training samples;
    pyDVL 0.10 averages the means of the loader's batches, which is the same when all batches
    have the same size.

    Args:
        regularization: ``λ > 0``, a number or a mapping block name → number (every block
            needs one).
        block_structure: a :class:`~prefect_influence.torch.util.BlockMode` or a mapping of
            block names to parameter names.
    """

    _needs_positive_regularization = True
    _state_depends_on_regularization = False
    _state_keys = ("gradients", "squared_norms")
    #: the result and a product with the training gradients (2.0 measured), and the coefficients
    #: against a slice of training gradients, sized from a quarter of the budget
    _solve_copies = 3.0

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        regularization: Union[float, Mapping[str, Optional[float]]],
        block_structure: BlockStructure = BlockMode.FULL,
    ):
        super().__init__(model, loss, regularization, block_structure=block_structure)

    def _fit(self, data: TrainingData) -> None:
        grads = torch.empty(data.n_samples, self.n_parameters, dtype=self.dtype, device=self.device)
        start = 0
        for x, y in data:
            grads[start : start + len(x)] = self._fn.per_sample_grads(x, y)
            start += len(x)
        self._set_state({"gradients": grads, "squared_norms": (grads * grads).sum(dim=1)})

    def _solve(self, rhs: Tensor) -> Tensor:
        lam = self.regularization
        weights = 1.0 / (self._grads.shape[0] * (lam + self._norms))
        out = rhs.clone()
        # slices of the training gradients keep the k × n coefficients within a quarter of the
        # budget (in place where the arithmetic is the same, to hold one such matrix)
        budget = self.memory_budget_bytes // 4
        step = rows_within(max(rhs.shape[0], 1), rhs.element_size(), budget)
        for start in range(0, self._grads.shape[0], step):
            g = self._grads[start : start + step]
            out -= (rhs @ g.T).mul_(weights[start : start + step]) @ g
        return out.div_(lam)

    def _get_state(self) -> dict[str, Tensor]:
        return {"gradients": self._grads, "squared_norms": self._norms}

    def _set_state(self, state: dict[str, Tensor]) -> None:
        self._grads = state["gradients"]
        self._norms = state["squared_norms"]
