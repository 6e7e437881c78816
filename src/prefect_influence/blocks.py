"""The one place an influence block is computed: the factors of a test chunk against one train chunk.

Every calculator (sequential, Dask, Prefect tasks) builds its result from these functions:

* :func:`train_operand` prepares a train chunk once. In Up mode, for a model that exposes
  ``per_sample_grads(x, y)`` (every :class:`~prefect_influence.torch.TorchInfluenceFunctionModel`),
  that is the chunk's ``n_j × p`` gradient matrix, computed once and reused by every block of
  the train chunk; otherwise it is the chunk itself.
* :func:`influence_block` turns test factors (``n_i × p``) and an operand into a block:
  ``factors @ grads.T`` (``n_i × n_j``) when gradients are there, else
  ``model.influences_from_factors(factors, x, y, mode)`` (Perturbation mode:
  ``n_i × n_j × *x.shape[1:]``, whose mixed derivatives cannot be shared between blocks).
* :func:`iter_block_rows` is the row-by-row iterator the in-process paths use.

Blocks equal the corresponding part of ``model.influences_from_factors`` on all the data.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

from .base import InfluenceFunctionModel, InfluenceMode
from .errors import InfluenceInputError, NotFittedError, ShapeMismatchError

__all__ = [
    "TrainOperand",
    "reuses_gradients",
    "train_operand",
    "influence_block",
    "iter_factor_chunks",
    "iter_block_rows",
]


class TrainOperand(NamedTuple):
    """What the blocks of one train chunk need: its per-sample gradients, or the chunk itself."""

    x: Any = None
    y: Any = None
    grads: Any = None

    def convert(self, fn: Callable[[Any], Any]) -> "TrainOperand":
        """The same operand with ``fn`` applied to every field that is set (e.g. to numpy)."""
        return TrainOperand(*(None if v is None else fn(v) for v in self))


def reuses_gradients(model: InfluenceFunctionModel, mode: InfluenceMode) -> bool:
    """Whether Up-mode blocks are products with a train chunk's precomputed gradient matrix."""
    return InfluenceMode.parse(mode) is InfluenceMode.Up and callable(
        getattr(model, "per_sample_grads", None)
    )


def train_operand(model: InfluenceFunctionModel, x: Any, y: Any, mode: InfluenceMode) -> TrainOperand:
    """Prepare one train chunk for all its blocks: gradients in Up mode when the model has them."""
    _require_fitted(model)
    if reuses_gradients(model, mode):
        return TrainOperand(grads=model.per_sample_grads(x, y))
    return TrainOperand(x=x, y=y)


def influence_block(
    model: InfluenceFunctionModel, factors: Any, operand: TrainOperand, mode: InfluenceMode
) -> Any:
    """The influences of test factors (``n_i × p``) on one train chunk (see the module doc)."""
    mode = InfluenceMode.parse(mode)
    if operand.grads is None:
        if operand.x is None or operand.y is None:
            raise InfluenceInputError("A train operand needs either gradients or (x, y).")
        return model.influences_from_factors(factors, operand.x, operand.y, mode)
    if mode is not InfluenceMode.Up:
        raise InfluenceInputError(
            f"Gradients of a train chunk only give Up-mode influences, not {mode.name}."
        )
    return _factors_times_grads(factors, operand.grads, model.n_parameters)


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
) -> Iterator[Iterator[Any]]:
    """Rows of blocks: for every factor chunk, its blocks against each train batch in turn.

    Row ``i`` is a generator that walks ``train_data`` once, preparing each train batch with
    :func:`train_operand` (one gradient pass) and forming its block with every row of the
    factor chunk at once. Rows must be consumed in order (each is tied to the factors chunk
    being iterated); ``train_data`` must be re-iterable.
    """
    mode = InfluenceMode.parse(mode)
    for factors in factor_chunks:
        yield _block_row(model, factors, train_data, mode)


def _block_row(
    model: InfluenceFunctionModel, factors: Any, train_data: Iterable, mode: InfluenceMode
) -> Iterator[Any]:
    for batch in train_data:
        x, y = _as_pair(batch)
        yield influence_block(model, factors, train_operand(model, x, y, mode), mode)


def _as_pair(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InfluenceInputError(
            "Training data must yield (x, y) pairs, e.g. a torch DataLoader over a TensorDataset; "
            f"got a batch of type {type(batch).__name__}."
        )
    return batch[0], batch[1]


def _require_fitted(model: InfluenceFunctionModel) -> None:
    if not getattr(model, "is_fitted", True):
        raise NotFittedError(
            f"{type(model).__name__} is not fitted: call .fit(train_dataloader) before computing "
            "influences."
        )


def _factors_times_grads(factors: Any, grads: Any, n_parameters: Optional[int]) -> Any:
    """``factors @ grads.T`` with factors moved to the gradients' device and dtype (torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(grads, torch.Tensor):
        factors = torch.as_tensor(factors).to(device=grads.device, dtype=grads.dtype)
        if not bool(torch.isfinite(factors).all()):
            from .errors import NonFiniteError

            raise NonFiniteError("z_test_factors contain non-finite values (NaN or Inf).")
    p = grads.shape[1]
    if factors.ndim != 2 or factors.shape[1] != p:
        raise ShapeMismatchError(
            f"z_test_factors must have shape (n_test, {n_parameters or p}), got "
            f"{tuple(factors.shape)}."
        )
    return factors @ grads.T
