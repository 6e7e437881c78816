"""The Dask influence calculator: factors and blocks as lazy dask arrays, one task per test
chunk's solve and per block, on any Dask scheduler; plus the worker configuration torch needs
and the checks of a calculator's inputs and cluster."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Optional, Type, Union

import numpy as np

from .array import NumpyConverter
from .base import InfluenceFunctionModel, InfluenceMode, check_factors_shape
from .blocks import (
    TrainOperand,
    influence_block,
    reuses_gradients,
    scores_by_layer,
    train_operand,
)
from .errors import (
    InfluenceInputError,
    InvalidDimensionChunksError,
    ShapeMismatchError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "DisableClientThreadingCheck",
    "TORCH_WORKER_DASK_CONFIG",
]

logger = logging.getLogger(__name__)


#: Dask configuration for spawning worker processes that run torch (glibc's malloc settings,
#: read when a worker process starts). distributed's default ``MALLOC_TRIM_THRESHOLD_`` pins
#: glibc's mmap threshold at 128 KiB, so every mid-sized tensor of a product or solve becomes a
#: fresh ``mmap`` with page faults on first touch, several times slower; glibc's adaptive
#: default instead keeps freed blocks of up to 32 MiB in its heaps, so workers grow. A fixed
#: 4 MiB threshold keeps small and mid-sized tensors on the heap and returns every larger one
#: (blocks, gradient matrices) to the system when freed. Use it around starting a cluster:
#: ``with dask.config.set(TORCH_WORKER_DASK_CONFIG): LocalCluster(...)``.
TORCH_WORKER_DASK_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": str(4 * 2**20),
}


class DisableClientSingleThreadCheck:
    """Pass this *type* as ``client`` to :class:`DaskInfluenceCalculator` to skip the
    thread-safety check, e.g. to compute with the synchronous scheduler while debugging.

    The model then travels inside the graph (as one key) instead of being scattered to the
    workers ahead. Computing the result on a multi-threaded scheduler with a model that is not
    thread-safe may give wrong values or crash; that is then the caller's responsibility.

    Example:
        >>> calc = DaskInfluenceCalculator(
        ...     model, TorchNumpyConverter(), DisableClientSingleThreadCheck
        ... )
        >>> calc.influences(da_x_test, da_y_test, da_x, da_y).compute(scheduler="synchronous")
    """

    @staticmethod
    def warning_msg() -> str:
        return (
            "The thread-safety check of DaskInfluenceCalculator is disabled: compute with the "
            "synchronous scheduler or with single-threaded workers (threads_per_worker=1) unless "
            "the influence model is thread-safe."
        )


#: Alias of :class:`DisableClientSingleThreadCheck`.
DisableClientThreadingCheck = DisableClientSingleThreadCheck


class DaskInfluenceCalculator:
    """Lazy influences over ``dask.array`` inputs: one graph, computed where dask runs it.

    Args:
        influence_function_model: a fitted model; with a client it is scattered to every worker
            once (broadcast), so tasks refer to it instead of carrying a copy.
        converter: turns numpy chunks into the model's tensors and back, e.g.
            :class:`~prefect_influence.torch.util.TorchNumpyConverter`.
        client: a ``distributed.Client``, or the type :class:`DisableClientSingleThreadCheck`.
            With a client, a model that is not thread-safe is refused
            (:class:`~prefect_influence.ThreadSafetyViolationError`) if any worker runs more
            than one thread: start the cluster with ``threads_per_worker=1`` (and, for speed,
            under ``dask.config.set(TORCH_WORKER_DASK_CONFIG)``).

    Inputs must be chunked along the first (sample) dimension only, and ``x`` and ``y`` alike;
    chunks may be uneven. Outputs are chunked like the inputs: factors ``(test chunks, p)``,
    influences ``(test chunks, train chunks, *x.shape[1:])``.

    Cost model, for ``I`` test chunks and ``J`` train chunks:

    * Factors: ``I`` tasks, each one gradient pass and one inverse-Hessian solve over its
      ``n_i`` test samples. ``influences`` builds them once and feeds them to every block of
      their row (pyDVL's calculator solves again in each of the ``J`` blocks of a row).
    * Up mode, models with ``per_sample_grads`` (all torch models): ``J`` gradient tasks, each
      the ``n_j × p`` per-sample gradients of one train chunk, computed once per ``compute``
      (pyDVL recomputes them in each of the ``I`` blocks of a column); then ``I × J`` block
      tasks, each one matrix product ``(n_i × p)(p × n_j)`` with no model call.
    * Perturbation mode (or models without ``per_sample_grads``): ``I × J`` block tasks calling
      ``model.influences_from_factors``; mixed derivatives depend on the pair, so only the
      factors are shared.
    * Memory: a block task holds one factor chunk, one gradient chunk and its block, i.e.
      ``(n_i + n_j)·p + n_i·n_j`` numbers. A factor chunk lives until its row is done, a
      gradient chunk until its column is done; Dask's ordering keeps few of them alive, and
      never more than all ``(n_test + n_train)·p`` numbers. Each block task needs one factor
      and one gradient chunk, so at most one of them is moved between workers per block.

    Example:
        >>> client = Client(n_workers=4, threads_per_worker=1)
        >>> calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
        >>> da_x, da_y = torch_dataset_to_dask_array(train_set, chunk_size=500)
        >>> calc.influences(da_x_test, da_y_test, da_x, da_y).to_zarr("s3://bucket/infl.zarr")
    """

    def __init__(
        self,
        influence_function_model: InfluenceFunctionModel,
        converter: NumpyConverter,
        client: Union["Client", Type[DisableClientSingleThreadCheck]],  # noqa: F821
    ):
        import dask
        from distributed import Client

        self.influence_function_model = influence_function_model
        self.numpy_converter = converter
        self._n_parameters = influence_function_model.n_parameters
        if client is DisableClientSingleThreadCheck:
            logger.warning(DisableClientSingleThreadCheck.warning_msg())
            self._model_ref = dask.delayed(
                influence_function_model, name=f"influence-model-{uuid.uuid4().hex}"
            )
        elif isinstance(client, Client):
            _wait_for_a_worker(client)  # scatter would block on a cluster without workers
            _check_thread_safety(client, influence_function_model)
            # a list, so that scatter never mistakes the model for a mapping of several items
            self._model_ref = client.scatter([influence_function_model], broadcast=True)[0]
        else:
            raise InfluenceInputError(
                "client must be a distributed.Client or the type DisableClientSingleThreadCheck "
                f"(the class itself, not an instance); got {client!r}."
            )

    @property
    def n_parameters(self) -> int:
        """Number of trainable parameters ``p`` of the model: the width of the factors."""
        return self._n_parameters

    def influence_factors(self, x: "da.Array", y: "da.Array") -> "da.Array":  # noqa: F821
        """``H⁻¹∇θℓ(x_i, y_i)`` for every sample: a lazy ``n × p`` array chunked like ``x``."""
        import dask.array as da

        _check_inputs(x, y, "x", "y")
        dtype = _float_dtype(self.influence_function_model, x.dtype)
        return da.concatenate(
            [
                da.from_delayed(task, shape=(n, self.n_parameters), dtype=dtype)
                for task, n in self._factor_tasks(x, y, dtype)
            ],
            axis=0,
        )

    def _factor_tasks(self, x, y, dtype) -> list:
        """One delayed factor solve per chunk of ``x``, with its number of rows."""
        import dask

        tag = uuid.uuid4().hex[:12]
        return [
            (
                dask.delayed(_factors_task)(
                    self._model_ref,
                    xd,
                    yd,
                    self.numpy_converter,
                    dtype,
                    dask_key_name=f"influence-factors-{tag}-{i}",
                ),
                n,
            )
            for i, (xd, yd, n) in enumerate(zip(_chunks(x), _chunks(y), x.chunks[0]))
        ]

    def influences(
        self,
        x_test: "da.Array",  # noqa: F821
        y_test: "da.Array",  # noqa: F821
        x: Optional["da.Array"] = None,  # noqa: F821
        y: Optional["da.Array"] = None,  # noqa: F821
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "da.Array":  # noqa: F821
        """Influences of the test samples on the train samples (the test samples if omitted).

        Lazy; shape ``n_test × n_train`` (Up) or ``n_test × n_train × *x.shape[1:]``
        (Perturbation). The test factors are one graph, shared by all blocks.
        """
        mode = InfluenceMode.parse(mode)
        if (x is None) != (y is None):
            missing = "x" if x is None else "y"
            raise InfluenceInputError(
                f"Pass both training inputs x and labels y, or neither; {missing} is missing."
            )
        _check_inputs(x_test, y_test, "x_test", "y_test")
        if x is None:
            x, y = x_test, y_test
        _check_inputs(x, y, "x", "y")
        dtype = _float_dtype(self.influence_function_model, x_test.dtype)
        # each block depends on its factor solve directly, not on a chunk of a concatenated
        # array: such an alias is a task of its own that the scheduler places with its input
        # and may queue behind a long solve there, idling the other workers
        return self._blocks(self._factor_tasks(x_test, y_test, dtype), x, y, mode, dtype)

    def influences_from_factors(
        self,
        z_test_factors: "da.Array",  # noqa: F821
        x: "da.Array",  # noqa: F821
        y: "da.Array",  # noqa: F821
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "da.Array":  # noqa: F821
        """Influences of precomputed factors (``n_test × p``) on the samples ``(x, y)``.

        Lazy; one block per (factor chunk, train chunk), formed by :mod:`prefect_influence.blocks`.
        """

        mode = InfluenceMode.parse(mode)
        _check_inputs(x, y, "x", "y")
        _check_dask_array(z_test_factors, "z_test_factors")
        _check_first_dim_only(z_test_factors, "z_test_factors")
        check_factors_shape(z_test_factors.shape, self.n_parameters)
        dtype = _float_dtype(self.influence_function_model, z_test_factors.dtype)
        factors = list(zip(_chunks(z_test_factors), z_test_factors.chunks[0]))
        return self._blocks(factors, x, y, mode, dtype)

    def _blocks(self, factors: list, x, y, mode: InfluenceMode, dtype) -> "da.Array":  # noqa: F821
        """The lazy grid: one block per (factor piece, train chunk)."""
        import dask
        import dask.array as da

        model, converter = self.influence_function_model, self.numpy_converter
        tag = uuid.uuid4().hex[:12]
        if reuses_gradients(model, mode) or scores_by_layer(model, mode):
            operands = [
                dask.delayed(_operand_task)(
                    self._model_ref,
                    xd,
                    yd,
                    converter,
                    mode,
                    dask_key_name=f"train-operand-{tag}-{j}",
                )
                for j, (xd, yd) in enumerate(zip(_chunks(x), _chunks(y)))
            ]
        else:
            operands = [(xd, yd, None) for xd, yd in zip(_chunks(x), _chunks(y))]
        extra = tuple(x.shape[1:]) if mode is InfluenceMode.Perturbation else ()
        rows = []
        for i, (zd, n_i) in enumerate(factors):
            row = []
            for j, (operand, n_j) in enumerate(zip(operands, x.chunks[0])):
                block = dask.delayed(_block_task)(
                    self._model_ref,
                    zd,
                    operand,
                    converter,
                    mode,
                    dtype,
                    dask_key_name=f"influence-block-{tag}-{i}-{j}",
                )
                row.append(da.from_delayed(block, shape=(n_i, n_j, *extra), dtype=dtype))
            rows.append(da.concatenate(row, axis=1))
        return da.concatenate(rows, axis=0)


# -- tasks (module level, so workers unpickle them by reference) -----------------------------


def _factors_task(model, x, y, converter: NumpyConverter, dtype) -> np.ndarray:
    factors = model.influence_factors(converter.from_numpy(x), converter.from_numpy(y))
    return np.asarray(converter.to_numpy(factors), dtype=dtype)


def _operand_task(model, x, y, converter: NumpyConverter, mode) -> TrainOperand:
    """A train chunk's operand, prepared once for all its blocks: its gradients (numpy), or its
    layer terms (the model's own tensors, which Dask pickles) when the model scores layer by
    layer."""
    x, y = converter.from_numpy(x), converter.from_numpy(y)
    return train_operand(model, x, y, mode, by_layer=True).convert(converter.to_numpy)


def _block_task(model, factors, operand: tuple, converter: NumpyConverter, mode, dtype):
    operand = TrainOperand(*operand).convert(converter.from_numpy)
    if operand.grads is None and operand.terms is None:  # Perturbation, or no gradients
        operand = train_operand(model, operand.x, operand.y, mode)
    block = influence_block(model, converter.from_numpy(factors), operand, mode)
    return np.asarray(converter.to_numpy(block), dtype=dtype)


# -- checks --------------------------------------------------------------------------------------


#: seconds a calculator waits for the first worker of a cluster that has none yet (one that is
#: still starting or scaling up) before giving up with a clear error
WAIT_FOR_WORKERS_S = 30.0


def _wait_for_a_worker(client) -> None:
    deadline = time.monotonic() + WAIT_FOR_WORKERS_S
    while not client.nthreads():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"The Dask cluster at {client.scheduler.address} has no workers (waited "
                f"{WAIT_FOR_WORKERS_S:g} s for one): the model cannot be sent to any. Start "
                "workers, or check that they can reach the scheduler."
            )
        time.sleep(0.2)


def _check_thread_safety(client, model: InfluenceFunctionModel) -> None:
    if model.is_thread_safe:
        return
    nthreads = client.nthreads()
    crowded = {worker: n for worker, n in nthreads.items() if n > 1}
    if crowded:
        listed = ", ".join(f"{w} ({n} threads)" for w, n in sorted(crowded.items()))
        raise ThreadSafetyViolationError(
            f"{type(model).__name__} is not thread-safe, but these Dask workers run several "
            f"threads: {listed}. Start the cluster with threads_per_worker=1, e.g. "
            "Client(n_workers=4, threads_per_worker=1), or pass DisableClientSingleThreadCheck "
            "as client to skip this check at your own risk."
        )


def _check_dask_array(a: Any, name: str) -> None:
    import dask.array as da

    if not isinstance(a, da.Array):
        raise InfluenceInputError(
            f"{name} must be a dask.array.Array, got {type(a).__name__}; wrap data with "
            "dask.array.from_array or torch_dataset_to_dask_array."
        )
    if a.ndim == 0:
        raise InfluenceInputError(f"{name} needs a leading sample dimension; got a scalar.")


def _check_first_dim_only(a, name: str) -> None:
    for dim, sizes in enumerate(a.chunks[1:], start=1):
        if len(sizes) > 1:
            raise InvalidDimensionChunksError(
                f"{name} is chunked along dimension {dim} into {_show(sizes)}; only the first "
                f"(sample) dimension may be chunked. Use {name}.rechunk({{{dim}: -1}})."
            )


def _check_inputs(x, y, x_name: str, y_name: str) -> None:
    _check_dask_array(x, x_name)
    _check_dask_array(y, y_name)
    for a, name in ((x, x_name), (y, y_name)):
        if any(n != n for n in a.chunks[0]):  # NaN: sizes unknown, e.g. after a boolean mask
            raise InfluenceInputError(
                f"{name} has chunks of unknown size (e.g. after boolean indexing); call "
                f"{name}.compute_chunk_sizes() first."
            )
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(
            f"{x_name} has {x.shape[0]} samples but {y_name} has {y.shape[0]}; they must match."
        )
    if x.chunks[0] != y.chunks[0]:
        k = next((k for k, (a, b) in enumerate(zip(x.chunks[0], y.chunks[0])) if a != b), None)
        if k is None:  # equal up to the shorter one: trailing empty chunks
            detail = f"{len(x.chunks[0])} chunks in {x_name} but {len(y.chunks[0])} in {y_name}"
        else:
            detail = f"chunk {k} holds {x.chunks[0][k]} samples in {x_name} but {y.chunks[0][k]} in {y_name}"
        raise UnalignedChunksError(
            f"{x_name} and {y_name} are chunked differently along the sample dimension: {detail} "
            f"({x_name}: {_show(x.chunks[0])}, {y_name}: {_show(y.chunks[0])}). Rechunk one "
            f"like the other, e.g. {y_name}.rechunk({{0: {x_name}.chunks[0]}})."
        )
    _check_first_dim_only(x, x_name)
    _check_first_dim_only(y, y_name)


def _show(sizes: tuple[int, ...], limit: int = 8) -> str:
    if len(sizes) <= limit:
        return str(tuple(sizes))
    return f"({', '.join(map(str, sizes[:limit]))}, ... {len(sizes)} chunks)"


def _chunks(a) -> list:
    """One ``Delayed`` per chunk along the first dimension (the others are single chunks)."""
    return list(a.to_delayed(optimize_graph=False).ravel())


def _float_dtype(model: InfluenceFunctionModel, fallback: np.dtype) -> np.dtype:
    """The numpy dtype of the model's results: its own float dtype when it declares one."""
    declared = getattr(model, "dtype", None)
    if declared is not None:
        try:
            return np.dtype(str(declared).rsplit(".", 1)[-1])  # "torch.float64" -> float64
        except TypeError:
            pass
    fallback = np.dtype(fallback)
    return fallback if np.issubdtype(fallback, np.floating) else np.dtype(np.float64)
