"""The one place an influence block is computed: a test chunk's factors against one train chunk.

Every calculator (sequential, Dask, Prefect tasks) builds its result from these functions:

* :func:`train_operand` prepares a train chunk once. In Up mode, for a model that exposes
  ``per_sample_grads(x, y)`` (every :class:`~prefect_influence.torch.TorchInfluenceFunctionModel`),
  that is the chunk's ``n_j × p`` gradient matrix, computed once and reused by every block of
  the train chunk; for a model that scores layer by layer (``scores_layer_by_layer``: made of
  ``nn.Linear`` and ``nn.Conv2d`` layers), on request, the chunk's layer inputs and output
  gradients instead (``layer_terms(x, y)``: ``Σ(d_in + d_out)`` numbers per sample instead of
  ``p``); otherwise it is the chunk itself.
* :func:`influence_block` turns test factors (``n_i × p``) and an operand into a block:
  ``factors @ grads.T`` (``n_i × n_j``) when gradients are there, else
  ``model.influences_from_factors(factors, x, y, mode)`` (Perturbation mode:
  ``n_i × n_j × *x.shape[1:]``, whose mixed derivatives cannot be shared between blocks).
* :func:`iter_block_rows` is the row-by-row iterator the in-process paths use; it keeps the
  operands of as many train chunks as a byte budget allows, so those are prepared once.

Blocks equal the corresponding part of ``model.influences_from_factors`` on all the data.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from .base import InfluenceFunctionModel, InfluenceMode, check_factors_shape, require_fitted
from .errors import InfluenceInputError, NonFiniteError, UnsupportedLayerError

__all__ = [
    "TrainOperand",
    "reuses_gradients",
    "scores_by_layer",
    "train_operand",
    "influence_block",
    "iter_factor_chunks",
    "iter_block_rows",
    "check_finite_factors",
]


class TrainOperand(NamedTuple):
    """What the blocks of one train chunk need: its per-sample gradients, or the chunk itself."""

    x: Any = None
    y: Any = None
    grads: Any = None
    #: the model's layer-wise terms of the chunk (``model.layer_terms(x, y)``), kept as they are
    terms: Any = None

    def convert(self, fn: Callable[[Any], Any]) -> "TrainOperand":
        """The same operand with ``fn`` applied to every array field that is set (e.g. to
        numpy); layer terms are passed through."""
        x, y, grads = (None if v is None else fn(v) for v in (self.x, self.y, self.grads))
        return TrainOperand(x, y, grads, self.terms)


def reuses_gradients(model: InfluenceFunctionModel, mode: InfluenceMode) -> bool:
    """Whether Up-mode blocks are products with a train chunk's precomputed gradient matrix."""
    return InfluenceMode.parse(mode) is InfluenceMode.Up and callable(
        getattr(model, "per_sample_grads", None)
    )


def scores_by_layer(model: InfluenceFunctionModel, mode: InfluenceMode) -> bool:
    """Whether Up-mode blocks can come from a train chunk's layer terms (no gradients)."""
    return InfluenceMode.parse(mode) is InfluenceMode.Up and bool(
        getattr(model, "scores_layer_by_layer", False)
    )


def train_operand(
    model: InfluenceFunctionModel, x: Any, y: Any, mode: InfluenceMode, *, by_layer: bool = False
) -> TrainOperand:
    """Prepare one train chunk for all its blocks: gradients in Up mode when the model has them,
    or (``by_layer=True``, for callers that can hold the model's own tensors) its layer terms
    when the model scores layer by layer."""
    require_fitted(model)
    if by_layer and scores_by_layer(model, mode):
        try:
            return TrainOperand(terms=model.layer_terms(x, y))
        except UnsupportedLayerError:
            if not reuses_gradients(model, mode):
                raise  # else a layer called twice per forward pass: gradients serve instead
    if reuses_gradients(model, mode):
        return TrainOperand(grads=model.per_sample_grads(x, y))
    return TrainOperand(x=x, y=y)


def influence_block(
    model: InfluenceFunctionModel,
    factors: Any,
    operand: TrainOperand,
    mode: InfluenceMode,
    *,
    check_factors: bool = True,
) -> Any:
    """The influences of test factors (``n_i × p``) on one train chunk (see the module doc).

    ``check_factors=False`` skips the test for non-finite factors, for callers that already
    checked the same factors (once per row instead of once per block).
    """
    mode = InfluenceMode.parse(mode)
    if operand.terms is not None:
        if check_factors:
            check_finite_factors(factors)
        return model.influences_from_terms(factors, operand.terms)
    if operand.grads is None:
        if operand.x is None or operand.y is None:
            raise InfluenceInputError("A train operand needs either gradients or (x, y).")
        return model.influences_from_factors(factors, operand.x, operand.y, mode)
    if mode is not InfluenceMode.Up:
        raise InfluenceInputError(
            f"Gradients of a train chunk only give Up-mode influences, not {mode.name}."
        )
    return _factors_times_grads(factors, operand.grads, check_factors)


def iter_factor_chunks(
    model: InfluenceFunctionModel, data: Iterable[tuple[Any, Any]]
) -> Iterator[Any]:
    """``model.influence_factors`` of every ``(x, y)`` batch, one batch at a time."""
    for x, y in data:
        yield model.influence_factors(x, y)


def iter_block_rows(
    model: InfluenceFunctionModel,
    factor_chunks: Iterable[Any],
    train_data: Iterable[tuple[Any, Any]],
    mode: InfluenceMode,
    cache_bytes: int = 0,
) -> Iterator[Iterator[Any]]:
    """Rows of blocks: for every factor chunk, its blocks against each train batch in turn.

    Each train batch is prepared with :func:`train_operand` (one gradient pass in Up mode) and
    its block formed with every row of the factor chunk at once. Operands are kept for the
    following rows while their total size stays within ``cache_bytes``: train batches that fit
    are prepared once per run, the others once per row (then ``train_data`` is re-iterated,
    so it must be re-iterable and yield the same batches each time). Rows must be consumed in
    order.
    """
    mode = InfluenceMode.parse(mode)
    operands = _OperandCache(model, train_data, mode, cache_bytes)
    for factors in factor_chunks:
        if reuses_gradients(model, mode):  # else the model checks them itself
            check_finite_factors(factors)
        yield (
            influence_block(model, factors, operand, mode, check_factors=False)
            for operand in operands
        )


class _OperandCache:
    """Train operands of one run: a cached prefix within a byte budget, the rest recomputed."""

    def __init__(self, model, train_data: Iterable, mode: InfluenceMode, cache_bytes: int):
        self.model, self.train_data, self.mode = model, train_data, mode
        self.budget = int(cache_bytes)
        self.cached: list[TrainOperand] = []
        self.used = 0
        self.caching = True  # still extending the cached prefix (first pass)
        self.complete = False  # the cache holds every train batch

    def __iter__(self) -> Iterator[TrainOperand]:
        yield from self.cached
        if self.complete:
            return
        batches = itertools.islice(iter(self.train_data), len(self.cached), None)
        for batch in batches:
            x, y = _as_pair(batch)
            operand = train_operand(self.model, x, y, self.mode, by_layer=True)
            if self.caching:
                size = _nbytes(operand)
                if self.used + size <= self.budget:
                    self.cached.append(operand)
                    self.used += size
                else:
                    self.caching = False
            yield operand
        if self.caching:  # the first pass ran to its end with everything cached
            self.complete = True
        self.caching = False


def _nbytes(operand: TrainOperand) -> int:
    return sum(int(getattr(v, "nbytes", 0)) for v in operand if v is not None)


def _as_pair(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InfluenceInputError(
            "Training data must yield (x, y) pairs, e.g. a torch DataLoader over a TensorDataset; "
            f"got a batch of type {type(batch).__name__}."
        )
    return batch[0], batch[1]


def _factors_times_grads(factors: Any, grads: Any, check: bool) -> Any:
    """``factors @ grads.T`` with factors moved to the gradients' device and dtype (torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(grads, torch.Tensor):
        factors = torch.as_tensor(factors).to(device=grads.device, dtype=grads.dtype)
    if check:
        check_finite_factors(factors)
    check_factors_shape(tuple(factors.shape), grads.shape[1])
    return factors @ grads.T


def check_finite_factors(factors: Any) -> None:
    """Raise :class:`~prefect_influence.NonFiniteError` if the factors hold a NaN or Inf."""
    # a finite sum proves every entry finite at a fraction of an elementwise test's cost; only a
    # non-finite sum (which large finite values can also produce) needs the elementwise test
    if not hasattr(factors, "sum"):  # not an array; the model's own checks apply
        return
    finite = _isfinite_module(factors)
    if not bool(finite(factors.sum())) and not bool(finite(factors).all()):
        raise NonFiniteError("z_test_factors contain non-finite values (NaN or Inf).")


def _isfinite_module(t: Any):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        return torch.isfinite
    import numpy as np

    return np.isfinite
