"""Influence calculators for data larger than memory: sequential over batches, or lazy on Dask.

Both map a fitted :class:`~prefect_influence.InfluenceFunctionModel` over chunks of data and
build every block with :mod:`prefect_influence.blocks`. Neither redoes work per block: the
factors of a test chunk are solved for once, and (Up mode) a train chunk's per-sample gradients
are computed once per pass and multiplied with the factors. See each class for its cost model.
The sequential calculator lives here, the Dask one in :mod:`prefect_influence.dask_calculator`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Iterator, Optional, Sized

from .array import LazyChunkSequence, NestedLazyChunkSequence
from .base import InfluenceFunctionModel, InfluenceMode
from .blocks import (
    iter_block_rows,
    iter_factor_chunks,
)
from .dask_calculator import (
    TORCH_WORKER_DASK_CONFIG,
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    DisableClientThreadingCheck,
)
from .errors import InfluenceInputError, InvalidParameterError

__all__ = [
    "SequentialInfluenceCalculator",
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "DisableClientThreadingCheck",
    "TORCH_WORKER_DASK_CONFIG",
]

# -- sequential ----------------------------------------------------------------------------------


class SequentialInfluenceCalculator:
    """Maps an influence model over batches, one block after the other, in this process.

    Nothing is computed when a method is called: each returns a lazy sequence, run by its
    ``compute(aggregator)`` (all in memory) or ``to_zarr(url, converter)`` (block by block to
    storage).

    Args:
        influence_function_model: a fitted model, e.g. ``DirectInfluence(...).fit(loader)``.
        train_cache_bytes: memory allowed for keeping prepared train batches (their ``n_j × p``
            per-sample gradients in Up mode, the batches themselves in Perturbation mode)
            from one row of blocks to the next, within one run. Default 1 GiB; 0 disables it.

    Cost model, for ``I`` test batches and ``J`` train batches:

    * ``influence_factors``: one inverse-Hessian solve per test sample, once.
    * ``influences`` (Up): row ``i`` solves for the factors of test batch ``i`` once, then forms
      the block with each train batch as one matrix product ``(n_i × p)(p × n_j)``. The train
      batches' per-sample gradients are computed during the first row and kept while they fit
      in ``train_cache_bytes``: if all of them fit (``n_train · p`` numbers), every gradient is
      computed once per run and ``train_data_iterable`` is read once; train batches beyond the
      budget are read and differentiated again in each of the ``I`` rows (use large test
      batches to make ``I`` small then).
    * ``influences`` (Perturbation): one mixed second derivative per (test, train) pair; the
      factors are still solved once per test batch.
    * Memory: the cache, plus one test batch's factors, one train batch's gradients and one
      block.

    A train iterable that is read more than once must yield the same batches each time (no
    shuffling).

    Example:
        >>> calc = SequentialInfluenceCalculator(DirectInfluence(net, loss).fit(train_loader))
        >>> lazy = calc.influences(test_loader, train_loader)       # nothing computed yet
        >>> values = lazy.compute(aggregator=NestedTorchCatAggregator())   # n_test × n_train
        >>> lazy.to_zarr("s3://bucket/influences.zarr", TorchNumpyConverter())
    """

    def __init__(
        self, influence_function_model: InfluenceFunctionModel, *, train_cache_bytes: int = 2**30
    ):
        if (
            isinstance(train_cache_bytes, bool)
            or not isinstance(train_cache_bytes, int)
            or (train_cache_bytes < 0)
        ):
            raise InvalidParameterError(
                f"train_cache_bytes must be an integer ≥ 0, got {train_cache_bytes!r}."
            )
        self.influence_function_model = influence_function_model
        self.train_cache_bytes = train_cache_bytes

    def influence_factors(self, data_iterable: Iterable[tuple[Any, Any]]) -> LazyChunkSequence:
        """``H⁻¹∇θℓ(x, y)`` for every batch of ``data_iterable``: lazy chunks of ``n_i × p``."""
        factory = partial(iter_factor_chunks, self.influence_function_model, data_iterable)
        return LazyChunkSequence(factory, len_generator=_length(data_iterable))

    def influences(
        self,
        test_data_iterable: Iterable[tuple[Any, Any]],
        train_data_iterable: Iterable[tuple[Any, Any]],
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> NestedLazyChunkSequence:
        """Influences of every test batch on every train batch, as rows of blocks.

        Row ``i``, block ``j`` is ``n_i × n_j`` (Up) or ``n_i × n_j × *x.shape[1:]``
        (Perturbation). See the class doc for how often ``train_data_iterable`` is read.
        """
        mode = InfluenceMode.parse(mode)
        model = self.influence_function_model

        def rows():
            factors = iter_factor_chunks(model, test_data_iterable)
            return iter_block_rows(
                model, factors, train_data_iterable, mode, self.train_cache_bytes
            )

        return NestedLazyChunkSequence(rows, len_outer_generator=_length(test_data_iterable))

    def influences_from_factors(
        self,
        z_test_factors: Iterable[Any],
        train_data_iterable: Iterable[tuple[Any, Any]],
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> NestedLazyChunkSequence:
        """Influences of precomputed factor chunks (each ``n_i × p``) on every train batch.

        A chunk may also be a one-element list or tuple holding the factors, as a
        ``DataLoader(TensorDataset(factors))`` yields.
        """
        mode = InfluenceMode.parse(mode)
        model = self.influence_function_model

        def rows():
            factors = _factor_chunks(z_test_factors)
            return iter_block_rows(
                model, factors, train_data_iterable, mode, self.train_cache_bytes
            )

        return NestedLazyChunkSequence(rows, len_outer_generator=_length(z_test_factors))


def _factor_chunks(batches: Iterable[Any]) -> Iterator[Any]:
    """The factor chunks of ``batches``, each unwrapped from a one-element list or tuple."""
    for i, batch in enumerate(batches):
        if isinstance(batch, (list, tuple)):
            if len(batch) != 1:
                raise InfluenceInputError(
                    f"Batch {i} of z_test_factors is a {type(batch).__name__} of {len(batch)} "
                    "elements; each batch must be a factor tensor (n_i × p) or a one-element "
                    "list or tuple holding one, as DataLoader(TensorDataset(factors)) yields."
                )
            batch = batch[0]
        yield batch


def _length(iterable: Any) -> Optional[int]:
    try:
        return len(iterable) if isinstance(iterable, Sized) else None
    except TypeError:
        return None
