"""The shared body of every PyTorch influence model: input checks, device/dtype handling,
per-sample gradients, Up/Perturbation products, scores from layer terms (networks of
``nn.Linear`` and ``nn.Conv2d`` layers) and fitted-state export.

A concrete method only implements ``_fit(data)`` (build its inverse-Hessian approximation) and
``_solve(rhs)`` (apply it to the rows of a ``k × p`` matrix), plus its state keys.
"""

from __future__ import annotations

import collections.abc
import copy
import math
import warnings
from abc import abstractmethod
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..base import InfluenceFunctionModel, InfluenceMode, check_factors_shape, require_fitted
from ..errors import (
    EmptyDataError,
    FittedStateError,
    InfluenceInputError,
    InputRankError,
    InvalidParameterError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .curvature import (
    BlockMode,
    BlockStructure,
    SecondOrderMode,
    block_regularizations,
    parameter_blocks,
)
from .functional import (
    GRADIENT_SLICE_BYTES,
    LossFunction,
    ModelFunctions,
    check_finite,
    rows_within,
)
from .layers import FactorColumns, Layer, LayerTerms, capture, find_layers, flat_grads
from .layers import scores as layer_scores
from .operator import HessianOperator, buffers_kept, product_batch_size
from .util import native_array

__all__ = ["TorchInfluenceFunctionModel", "TrainingData"]

Batches = Iterable[tuple[Tensor, Tensor]]

#: a chunk of per-sample gradients while they are formed: the flat rows, vmap's per-parameter
#: output and its layout copy (2.9 measured for a network of Linear layers)
_GRADIENT_COPIES = 3.0
#: Perturbation mode: gradient-sized autograd temporaries per training row and factor row
#: (about 1.7 measured)
_MIXED_COPIES_PER_FACTOR = 2.0


class TrainingData:
    """Validated, re-iterable view of the training batches handed to ``fit``.

    Every batch is checked (equal lengths, finite inputs, the same per-sample shapes) and moved
    to the model's device and dtype. ``tensors()`` concatenates everything, for the methods that
    keep the data to form Hessian-vector products later (CG, LiSSA).
    """

    def __init__(self, owner: "TorchInfluenceFunctionModel", data: Batches):
        if isinstance(data, collections.abc.Iterator):  # generator, zip, iter(loader): one pass
            raise InfluenceInputError(
                "fit() reads the training data more than once and needs a re-iterable (a "
                f"DataLoader, a list of batches); got a one-shot iterator ({type(data).__name__})."
            )
        self._owner = owner
        self._data = data
        self.n_samples: Optional[int] = None
        self.batch_size = getattr(data, "batch_size", None)
        counted = 0
        for x, _ in self:
            counted += x.shape[0]
            if self.batch_size is None:
                self.batch_size = x.shape[0]
        if counted == 0:
            raise EmptyDataError("The training data passed to fit() holds no samples.")
        self.n_samples = counted

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        seen = 0
        for batch in self._data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise InfluenceInputError(
                    "fit() expects an iterable of (x, y) batches, e.g. a torch DataLoader over a "
                    f"TensorDataset; got a batch of type {type(batch).__name__}."
                )
            x, y = self._owner._prepare(batch[0], batch[1], "training batch", allow_empty=True)
            seen += x.shape[0]
            if x.shape[0]:
                yield x, y
        if self.n_samples is not None and seen != self.n_samples:
            raise InfluenceInputError(
                f"The training data yielded {self.n_samples} samples on its first pass and {seen} "
                "on a later one; fit() reads it more than once and needs the same data each time."
            )

    def tensors(self) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*self)
        return torch.cat(xs), torch.cat(ys)


class TorchInfluenceFunctionModel(InfluenceFunctionModel[Tensor, Batches]):
    """Base of the PyTorch methods.

    Args:
        model: the trained ``nn.Module``. Its trainable parameters (``requires_grad=True``) are
            the ones influences are taken over; device and dtype follow them. Put it in
            ``eval()`` mode: dropout or batch statistics would make gradients random.
        loss: ``loss(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
            It is applied to one sample at a time, so ``mean`` and ``sum`` reductions agree.
        regularization: ``λ ≥ 0`` added to the Hessian's diagonal (``H + λI``).
        hessian_regularization: alias of ``regularization`` (pyDVL's keyword).
    """

    #: methods that divide by ``λ`` set this, so that ``λ = 0`` is refused at construction
    _needs_positive_regularization = False
    #: whether the fitted state holds λ in its numbers (a factorization of ``H + λI``); one
    #: that does not (EK-FAC's eigenbases and eigenvalues) loads under any λ
    _state_depends_on_regularization = True
    #: Bytes the temporaries of one call of a computing method are sized to stay within
    #: (approximately; settable per instance). Inputs are processed in chunks of rows (test
    #: samples, training samples, right-hand sides of the solve, and in Perturbation mode factor
    #: rows) whose per-sample gradients, solve temporaries and products fit it, so the memory a
    #: call needs does not grow with its inputs. Counted: the gradients, the solve's working
    #: matrices (a per-method multiple of its right-hand sides, :attr:`_solve_copies`), and the
    #: products of a chunk. Not counted: the network, the fitted state (e.g. DataInf's training
    #: gradients, the Hessian factorization), the inputs as passed and their conversion to the
    #: model's dtype and device, the returned result, and the gradient graphs that CG and LiSSA
    #: keep for their Hessian-vector products (bounded by ``HessianOperator.graph_budget_bytes``).
    #: A chunk holds at least 64 rows where those take at most 4 MiB, so per-call overhead stays
    #: amortized under a tiny budget; :meth:`influences` also holds one chunk of test factors (at
    #: most half the budget) while the training side runs. Chunking leaves results unchanged up
    #: to floating-point rounding, except for solvers whose iterations couple the rows of a
    #: solve: block CG (``CgInfluence(solve_simultaneously=True)``, the rows share one Krylov
    #: space) and LiSSA (it stops when every row of the solve has converged); there chunked
    #: results agree within the solver's tolerance. Each chunk is a separate solve, so an
    #: iterative solver's cost grows with the number of chunks: raise the budget where memory
    #: allows.
    memory_budget_bytes: int = 256 * 2**20
    #: temporaries of :meth:`_solve` per right-hand side, in multiples of a ``p``-vector, its
    #: result included (its input not); measured for each method, with a margin
    _solve_copies: float = 3.0
    #: a chunk holds at least this many rows when they take at most ``_min_chunk_bytes``, since
    #: smaller chunks cost more in per-call overhead (a vmap, a whole solve) than they save
    _min_chunk_rows: int = 64
    _min_chunk_bytes: int = 4 * 2**20
    #: keys of the method-specific part of :meth:`fitted_state`
    _state_keys: tuple[str, ...] = ()
    #: whether a ``block_structure`` other than one block may be given
    _supports_blocks = True
    #: the ``second_order_mode`` values the method takes
    _second_order_modes: tuple[SecondOrderMode, ...] = tuple(SecondOrderMode)

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        regularization: Union[None, float, Mapping[str, Optional[float]]] = None,
        *,
        hessian_regularization: Union[None, float, Mapping[str, Optional[float]]] = None,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: Union[SecondOrderMode, str] = SecondOrderMode.HESSIAN,
    ):
        if regularization is not None and hessian_regularization is not None:
            raise InvalidParameterError(
                "Pass either regularization or its alias hessian_regularization, not both."
            )
        if regularization is None:
            regularization = hessian_regularization
        if not isinstance(model, nn.Module):
            raise InfluenceInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not callable(loss):
            raise InfluenceInputError(f"loss must be callable, got {type(loss).__name__}.")
        self.second_order_mode = SecondOrderMode.parse(second_order_mode)
        if self.second_order_mode not in self._second_order_modes:
            raise InvalidParameterError(
                f"{type(self).__name__} does not take second_order_mode="
                f"{self.second_order_mode.name}."
            )
        blocks = parameter_blocks(model, block_structure)
        if len(blocks) > 1 and not self._supports_blocks:
            raise InvalidParameterError(
                f"{type(self).__name__} approximates the Hessian layer by layer already and "
                "takes no block_structure."
            )
        regs = block_regularizations(
            regularization,
            blocks,
            required=type(self).__name__ if self._needs_positive_regularization else None,
        )
        self.block_structure = block_structure
        #: block name → names of its parameters (one block ``""`` of all of them unless a
        #: block structure splits them)
        self.parameter_blocks = blocks
        #: block name → the block's ``λ``
        self.block_regularization = regs
        self.model = model
        self.loss = loss
        self.regularization = next(iter(regs.values())) if len(regs) == 1 else dict(regs)
        names = [name for block in blocks.values() for name in block]
        self._fn = ModelFunctions(model, loss, names, self.second_order_mode.value)
        self._blocks: Optional[dict[str, "TorchInfluenceFunctionModel"]] = None
        self._fitted = False
        self._x_shape: Optional[tuple[int, ...]] = None
        self._y_shape: Optional[tuple[int, ...]] = None
        #: the layers of :meth:`layer_terms`, or why the model cannot be scored layer by layer
        self._layers: list[Layer] = []
        self._layer_error: Optional[UnsupportedLayerError] = None
        try:
            self._layers = self._find_layers()
        except UnsupportedLayerError as exc:
            self._layer_error = exc
        #: per sample shape, numbers per sample: recorded terms (with the graph), the largest
        #: layer's unfolded inputs, every layer's (an EK-FAC fit holds them all)
        self._row_bytes: dict[tuple[int, ...], tuple[int, int, int]] = {}
        if model.training:
            warnings.warn(
                "The model is in training mode; dropout and batch statistics make influences "
                "random. Call model.eval() before computing influences.",
                stacklevel=2,
            )

    # -- properties -----------------------------------------------------------------------------
    @property
    def self_influence_budget_bytes(self) -> int:
        """Deprecated alias of :attr:`memory_budget_bytes`."""
        warnings.warn(
            "self_influence_budget_bytes is deprecated; use memory_budget_bytes.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.memory_budget_bytes

    @self_influence_budget_bytes.setter
    def self_influence_budget_bytes(self, value: int) -> None:
        warnings.warn(
            "self_influence_budget_bytes is deprecated; use memory_budget_bytes.",
            DeprecationWarning,
            stacklevel=2,
        )
        self.memory_budget_bytes = value

    @property
    def n_parameters(self) -> int:
        return self._fn.n_parameters

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def is_thread_safe(self) -> bool:
        # torch.func transforms and shared module state are not safe to call concurrently.
        return False

    @property
    def device(self) -> torch.device:
        return self._fn.device

    @property
    def dtype(self) -> torch.dtype:
        return self._fn.dtype

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, data: Batches) -> "TorchInfluenceFunctionModel":
        """Fit on training batches ``(x, y)`` (a ``DataLoader`` or any re-iterable of pairs)."""
        self._x_shape = self._y_shape = None
        self._fitted = False
        with buffers_kept(self.model):
            training = TrainingData(self, data)
            with torch.no_grad():
                if self._is_blocked:
                    self._blocks = self._block_models()
                    for block in self._blocks.values():
                        block._fit(training)
                else:
                    self._fit(training)
        self._fitted = True
        return self

    @property
    def _is_blocked(self) -> bool:
        return len(self.parameter_blocks) > 1

    def _block_models(self) -> dict[str, "TorchInfluenceFunctionModel"]:
        """One model per block: this method's settings over the block's parameters only, with
        the block's ``λ`` (a deep copy that shares the network and the loss)."""
        self._blocks = None
        models = {}
        for name, names in self.parameter_blocks.items():
            memo = {id(m): m for m in self.model.modules()}  # the layers refer to modules
            memo.update({id(self.loss): self.loss, id(self._fn): None})
            block = copy.deepcopy(self, memo)
            block._fn = self._fn.restricted(names)
            block.parameter_blocks = OrderedDict([(name, names)])
            block.block_regularization = {name: self.block_regularization[name]}
            block.regularization = self.block_regularization[name]
            block._x_shape, block._y_shape = self._x_shape, self._y_shape
            block._on_restricted()
            models[name] = block
        return models

    def _on_restricted(self) -> None:
        """Called on a block's model after its parameters were narrowed to the block's, for
        settings derived from the number of parameters."""

    def _block_slices(self) -> dict[str, Tensor]:
        """Block name → positions of its parameters in the flat parameter vector."""
        offsets, start = {}, 0
        for name, numel in zip(self._fn.names, self._fn.numels):
            offsets[name] = (start, start + numel)
            start += numel
        return {
            block: torch.cat([torch.arange(*offsets[n]) for n in names]).to(self.device)
            for block, names in self.parameter_blocks.items()
        }

    def _apply(self, rhs: Tensor) -> Tensor:
        """The fitted inverse applied to every row of ``rhs``, block by block if there are
        blocks, in chunks of rows whose solve fits :attr:`memory_budget_bytes`."""
        step = self._rows_per_chunk(self._apply_row_copies())
        if rhs.shape[0] <= step:
            return self._apply_whole(rhs)
        out = torch.empty_like(rhs)
        for start in range(0, rhs.shape[0], step):
            out[start : start + step] = self._apply_whole(rhs[start : start + step])
        return out

    def _apply_whole(self, rhs: Tensor) -> Tensor:
        if not self._is_blocked:
            return self._solve(rhs)
        out = torch.empty_like(rhs)
        for index, block in zip(self._block_slices().values(), self._blocks.values()):
            # the blocks are copies made at fit time, and a solve may size its slices by it
            block.memory_budget_bytes = self.memory_budget_bytes
            out[:, index] = block._solve(rhs[:, index])
        return out

    # -- memory ---------------------------------------------------------------------------------
    # Row costs are in copies of a p-vector of the model's dtype.
    def _solve_row_copies(self) -> float:
        """What :meth:`_solve` holds per right-hand side, its result included."""
        return self._solve_copies

    def _apply_row_copies(self) -> float:
        """What :meth:`_apply` holds per row: for the largest block, its solve and its copy of
        the block's part of the row."""
        if not self._is_blocked:
            return self._solve_row_copies()
        return max(
            (1.0 + block._solve_row_copies()) * block.n_parameters / self.n_parameters
            for block in self._blocks.values()
        )

    def _rows_per_chunk(self, copies: float) -> int:
        """Rows that fit :attr:`memory_budget_bytes` when each is held ``copies`` times; at
        least ``_min_chunk_rows`` as far as those fit ``_min_chunk_bytes``."""
        p, itemsize = self.n_parameters, self.dtype.itemsize
        fitting = rows_within(p, itemsize, self._min_chunk_bytes, copies=copies, minimum=1)
        floor = min(self._min_chunk_rows, fitting)
        return rows_within(p, itemsize, self.memory_budget_bytes, copies=copies, minimum=floor)

    def _factor_rows(self) -> int:
        """Rows per chunk of gradients turned into factors: forming them, or they and the solve."""
        return self._rows_per_chunk(max(_GRADIENT_COPIES, 1.0 + self._apply_row_copies()))

    def _self_influence_rows(self) -> int:
        """Rows per chunk of a self-influence: forming the gradients, or they, the solve, the
        solution and its product with them."""
        return self._rows_per_chunk(max(_GRADIENT_COPIES, 1.0 + max(self._apply_row_copies(), 2.0)))

    def _mixed_products(self, fn: ModelFunctions, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``fn.mixed_products`` in chunks of factor and training rows that fit the budget."""
        k, n = factors.shape[0], x.shape[0]
        share = fn.n_parameters / self.n_parameters  # a block's part of the parameters
        budget = self.memory_budget_bytes / (self.n_parameters * self.dtype.itemsize)
        # per training row its gradient with their temporaries, and per factor row the autograd
        # temporaries of the second derivative
        per_factor = _MIXED_COPIES_PER_FACTOR * share
        rows = max(1, min(k, int((budget - _GRADIENT_COPIES * share) // per_factor)))
        step = self._rows_per_chunk(_GRADIENT_COPIES * share + rows * per_factor)
        if k == 0 or (rows >= k and step >= n):
            return fn.mixed_products(factors, x, y)
        out: Optional[Tensor] = None
        for f0 in range(0, k, rows):
            for start in range(0, n, step):
                part = fn.mixed_products(
                    factors[f0 : f0 + rows], x[start : start + step], y[start : start + step]
                )
                if out is None:
                    out = part.new_empty((k, n, *part.shape[2:]))
                out[f0 : f0 + rows, start : start + step] = part
        return out

    @abstractmethod
    def _fit(self, data: TrainingData) -> None:
        """Build the inverse-Hessian approximation of ``mean Hessian + λI``."""

    @abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """Apply the inverse-Hessian approximation to every row of ``rhs`` (``k × p``)."""

    # -- computing ------------------------------------------------------------------------------
    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """``H⁻¹ ∇θ ℓ(x_i, y_i)`` for every sample: shape ``n × p``. Samples go in chunks whose
        gradients and solve fit :attr:`memory_budget_bytes`."""
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        step = self._factor_rows()
        if x.shape[0] <= step:
            return self._apply(self._fn.per_sample_grads(x, y))
        out = torch.empty(x.shape[0], self.n_parameters, dtype=self.dtype, device=self.device)
        for start in range(0, x.shape[0], step):
            grads = self._fn.per_sample_grads(x[start : start + step], y[start : start + step])
            out[start : start + step] = self._apply(grads)
        return out

    def influences_from_factors(
        self,
        z_test_factors: Tensor,
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> Tensor:
        """Influences of precomputed factors (``n_test × p``) on the training batch ``(x, y)``.
        Training samples (and in Perturbation mode factor rows) go in chunks whose gradients and
        products fit :attr:`memory_budget_bytes`."""
        self._require_fitted()
        mode = InfluenceMode.parse(mode)
        factors = self._prepare_factors(z_test_factors)
        x, y = self._prepare(x, y, "training input")
        if mode is not InfluenceMode.Up:
            return self._mixed_products(self._fn, factors, x, y)
        # a chunk's gradients with their temporaries, and its columns of the result
        step = self._rows_per_chunk(_GRADIENT_COPIES + factors.shape[0] / self.n_parameters)
        if x.shape[0] <= step:
            return factors @ self._fn.per_sample_grads(x, y).T
        out = factors.new_empty(factors.shape[0], x.shape[0])
        for start in range(0, x.shape[0], step):
            grads = self._fn.per_sample_grads(x[start : start + step], y[start : start + step])
            out[:, start : start + step] = factors @ grads.T
        return out

    def influences(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> Tensor:
        """Influences of the test batch on the training batch (the test batch itself if omitted).

        Equal to ``influences_from_factors(influence_factors(x_test, y_test), x, y, mode)``; when
        the test factors exceed half of :attr:`memory_budget_bytes`, test samples go in chunks
        (the training gradients are then formed once per chunk)."""
        mode = InfluenceMode.parse(mode)
        chunks = self._test_chunks(x_test, y_test, x, y)
        if chunks is None:
            return super().influences(x_test, y_test, x, y, mode)
        x_test, y_test, x, y, step = chunks
        out: Optional[Tensor] = None
        for start in range(0, x_test.shape[0], step):
            factors = self.influence_factors(
                x_test[start : start + step], y_test[start : start + step]
            )
            part = self.influences_from_factors(factors, x, y, mode)
            del factors
            if out is None:
                out = part.new_empty((x_test.shape[0], *part.shape[1:]))
            out[start : start + step] = part
        return out

    def _test_chunks(
        self, x_test: Any, y_test: Any, x: Any, y: Any
    ) -> Optional[tuple[Tensor, Tensor, Any, Any, int]]:
        """``None`` when the test factors fit half the budget; otherwise the prepared test batch,
        the training batch (the test batch if omitted) and the test rows per chunk."""
        if (x is None) != (y is None):
            missing = "x" if x is None else "y"
            raise InfluenceInputError(
                f"Pass both training inputs x and labels y, or neither; {missing} is missing."
            )
        self._require_fitted()
        x_test, y_test = self._prepare(x_test, y_test, "input")
        step = self._rows_per_chunk(2.0)
        if x_test.shape[0] <= step:
            return None
        if x is None:
            x, y = x_test, y_test
        return x_test, y_test, x, y, step

    def per_sample_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Flat per-sample gradients ``∇θ ℓ(x_i, y_i)``: shape ``n × p`` (no fit needed)."""
        x, y = self._prepare(x, y, "input")
        # slices of per-parameter temporaries as by default, smaller under a smaller budget
        budget = min(self.memory_budget_bytes, GRADIENT_SLICE_BYTES)
        return self._fn.per_sample_grads(x, y, budget=budget)

    def factors_from_grads(self, grads: Tensor) -> Tensor:
        """``H⁻¹ g`` for every row ``g`` of precomputed per-sample gradients (``k × p``), in
        chunks of rows whose solve fits :attr:`memory_budget_bytes`."""
        self._require_fitted()
        return self._apply(self._prepare_factors(grads))

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """``⟨H⁻¹∇θℓ(z_i), ∇θℓ(z_i)⟩`` for every sample: the diagonal, without the full matrix.
        Samples go in chunks whose gradients and solve fit :attr:`memory_budget_bytes`, so a
        large input needs memory for one chunk, not ``n × p`` gradients and their solve."""
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        step = self._self_influence_rows()
        parts = []
        for start in range(0, x.shape[0], step):
            grads = self._fn.per_sample_grads(x[start : start + step], y[start : start + step])
            parts.append((self._apply(grads) * grads).sum(dim=1))
        return torch.cat(parts)

    # -- layer by layer -------------------------------------------------------------------------
    @property
    def scores_layer_by_layer(self) -> bool:
        """Whether Up-mode influences on a training batch can come from its :meth:`layer_terms`
        (:meth:`influences_from_terms`, no per-sample gradients): every trainable parameter sits
        in an ``nn.Linear`` or ``nn.Conv2d`` layer. Turns false once :meth:`layer_terms` finds a
        layer called other than once per forward pass."""
        return self._layer_error is None

    def _find_layers(self) -> list[Layer]:
        """The layers :meth:`layer_terms` records; raises :class:`UnsupportedLayerError`."""
        return find_layers(self.model, self._fn.names, self._fn.numels)

    def _checked_layers(self) -> list[Layer]:
        if self._layer_error is not None:
            raise UnsupportedLayerError(str(self._layer_error))
        return self._layers

    @property
    def _budget(self) -> int:
        return int(self.memory_budget_bytes)

    def _capture(self, x: Tensor, y: Tensor) -> LayerTerms:
        """:func:`~prefect_influence.torch.layers.capture` of a prepared batch; a layer found
        unsupported only now (called twice) turns :attr:`scores_layer_by_layer` off."""
        try:
            return capture(self.model, self._checked_layers(), self.loss, x, y)
        except UnsupportedLayerError as exc:
            self._layer_error = exc
            raise

    def layer_terms(self, x: Tensor, y: Tensor) -> LayerTerms:
        """Every layer's inputs and per-sample output gradients for the batch ``(x, y)``: what
        :meth:`influences_from_terms` needs of a training batch, ``Σ(d_in + d_out)`` numbers per
        sample instead of ``p``. Raises :class:`UnsupportedLayerError` unless
        :attr:`scores_layer_by_layer`."""
        self._checked_layers()
        x, y = self._prepare(x, y, "input")
        step = self._chunk_rows(x, y)
        n = x.shape[0]
        first = self._capture(x[:step], y[:step])
        if n <= step:
            return first
        # filled chunk by chunk: concatenating the chunks would hold the terms twice
        whole = LayerTerms(
            [t.new_empty((n, *t.shape[1:])) for t in first.inputs],
            [t.new_empty((n, *t.shape[1:])) for t in first.out_grads],
        )
        for s in range(0, n, step):
            part = first if s == 0 else self._capture(x[s : s + step], y[s : s + step])
            for target, source in zip(
                (*whole.inputs, *whole.out_grads), (*part.inputs, *part.out_grads)
            ):
                target[s : s + step] = source
        return whole

    def influences_from_terms(
        self, z_test_factors: Union[Tensor, FactorColumns], terms: LayerTerms
    ) -> Tensor:
        """Up-weighting influences (``k × n``) of test factors on a batch given by its
        :meth:`layer_terms`: :meth:`influences_from_factors` without per-sample gradients (equal
        up to rounding).

        The factors may be a :class:`~prefect_influence.torch.layers.FactorColumns` (e.g.
        stored chunks read in tiles, in this model's dtype): then only tiles of them are in
        memory at a time, and each sample's gradient blocks are formed once for all rows."""
        self._require_fitted()
        layers = self._checked_layers()
        if isinstance(z_test_factors, Tensor) or not hasattr(z_test_factors, "row_tiles"):
            z_test_factors = self._prepare_factors(z_test_factors)
        check_finite_terms(terms)
        return layer_scores(layers, z_test_factors, terms, self._budget)

    def self_influences_from_terms(self, terms: LayerTerms) -> Tensor:
        """:meth:`self_influences` of a batch given by its :meth:`layer_terms`: each sample's
        gradient is assembled from its terms, in chunks of rows whose gradients and solve fit
        :attr:`memory_budget_bytes` (equal up to rounding)."""
        self._require_fitted()
        layers = self._checked_layers()
        check_finite_terms(terms)
        # as many rows per chunk as :meth:`self_influences`, so the solves see the same chunks
        step = self._self_influence_rows()
        parts = []
        for start in range(0, terms.n, step):
            grads = flat_grads(layers, terms.rows(start, start + step), self.n_parameters)
            parts.append((self._apply(grads) * grads).sum(dim=1))
        return torch.cat(parts)

    def _chunk_rows(
        self, x: Tensor, y: Tensor, factors: bool = False, fitting: bool = False
    ) -> int:
        """Samples per chunk of the layer-wise paths: their recorded terms (and the forward
        graph, counted as twice as much again) plus the largest layer's unfolded inputs within
        the memory budget; with ``factors`` their ``p`` factors a few times over (the rotated
        gradients and the result); while ``fitting`` (EK-FAC), every layer's unfolded inputs
        twice (as they are and rotated) instead of the largest's, since a fit holds them all.
        Gradient matrices of the layers are sub-chunked where they are formed. Measured once
        per sample shape from one sample."""
        key = tuple(x.shape[1:])
        if key not in self._row_bytes:
            terms = self._capture(x[:1], y[:1])
            stored = sum(t[0].numel() for t in (*terms.inputs, *terms.out_grads))
            widths = self._unfolded_widths(terms)
            self._row_bytes[key] = (3 * stored, max(widths), 2 * sum(widths))
        stored, largest, every = self._row_bytes[key]
        per_sample = stored + (every if fitting else largest)
        if factors:
            per_sample += 3 * self.n_parameters
        return max(1, self._budget // (per_sample * self.dtype.itemsize))

    def _unfolded_widths(self, terms: LayerTerms) -> list[int]:
        """Per layer, the numbers one sample takes as unfolded inputs (``T × n_in``) and output
        gradients (``T × out``, counted twice: as recorded and reshaped or rotated)."""
        return [
            layer.positions(inputs, out_grads) * (layer.n_in * layer.groups + 2 * layer.n_out)
            for layer, inputs, out_grads in zip(self._layers, terms.inputs, terms.out_grads)
        ]

    # -- by block -------------------------------------------------------------------------------
    def influence_factors_by_block(self, x: Tensor, y: Tensor) -> "OrderedDict[str, Tensor]":
        """The factors split by block: block name → ``k × p_block`` (one block ``""`` unless a
        block structure was given). Samples go in chunks, as for :meth:`influence_factors`."""
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        step = self._factor_rows()
        if x.shape[0] <= step:
            return self._split(self.influence_factors(x, y))
        slices = self._block_slices()
        result: "OrderedDict[str, Tensor]" = OrderedDict(
            (b, torch.empty(x.shape[0], int(i.numel()), dtype=self.dtype, device=self.device))
            for b, i in slices.items()
        )
        for start in range(0, x.shape[0], step):
            flat = self.influence_factors(x[start : start + step], y[start : start + step])
            for block, index in slices.items():
                result[block][start : start + step] = flat[:, index]
        return result

    def influences_from_factors_by_block(
        self,
        z_test_factors: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, Tensor]":
        """Each block's contribution to :meth:`influences_from_factors`, by block name; they
        sum to it. ``z_test_factors`` maps every block name to its part of the factors.
        Training samples go in chunks, as for :meth:`influences_from_factors`."""
        self._require_fitted()
        mode = InfluenceMode.parse(mode)
        if not isinstance(z_test_factors, Mapping):
            raise InfluenceInputError(
                "z_test_factors must map block names to factors, as influence_factors_by_block "
                f"returns them; got {type(z_test_factors).__name__}."
            )
        absent = [b for b in self.parameter_blocks if b not in z_test_factors]
        if absent:
            raise InfluenceInputError(
                f"z_test_factors lacks the blocks {absent}; it has {list(z_test_factors)}."
            )
        x, y = self._prepare(x, y, "training input")
        slices = self._block_slices()
        blocks: "OrderedDict[str, Tensor]" = OrderedDict()
        for block, index in slices.items():
            factors = _as_tensor(z_test_factors[block], f"z_test_factors[{block!r}]")
            check_factors_shape(tuple(factors.shape), int(index.numel()))
            check_finite(factors, f"z_test_factors[{block!r}]")
            blocks[block] = factors.to(device=self.device, dtype=self.dtype)
        if mode is not InfluenceMode.Up:
            return OrderedDict(
                (block, self._mixed_products(self._fn.restricted(names), blocks[block], x, y))
                for block, names in self.parameter_blocks.items()
            )
        # a chunk's gradients with their temporaries (a block's copy of its part is smaller) and
        # the chunk's columns of every block's result
        k = max(f.shape[0] for f in blocks.values())
        step = self._rows_per_chunk(_GRADIENT_COPIES + len(blocks) * k / self.n_parameters)
        if x.shape[0] <= step:
            grads = self._fn.per_sample_grads(x, y)
            return OrderedDict((b, blocks[b] @ grads[:, index].T) for b, index in slices.items())
        result: "OrderedDict[str, Tensor]" = OrderedDict(
            (b, blocks[b].new_empty(blocks[b].shape[0], x.shape[0])) for b in slices
        )
        for start in range(0, x.shape[0], step):
            grads = self._fn.per_sample_grads(x[start : start + step], y[start : start + step])
            for block, index in slices.items():
                result[block][:, start : start + step] = blocks[block] @ grads[:, index].T
        return result

    def influences_by_block(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, Tensor]":
        """Each block's contribution to :meth:`influences`, by block name; they sum to it. Test
        samples go in chunks, as for :meth:`influences`."""
        if (x is None) != (y is None):
            raise InfluenceInputError("Pass both x and y, or neither (then the test data).")
        chunks = self._test_chunks(x_test, y_test, x, y)
        if chunks is None:
            factors = self.influence_factors_by_block(x_test, y_test)
            if x is None:
                x, y = x_test, y_test
            return self.influences_from_factors_by_block(factors, x, y, mode)
        x_test, y_test, x, y, step = chunks
        result: "OrderedDict[str, Tensor]" = OrderedDict()
        for start in range(0, x_test.shape[0], step):
            factors = self.influence_factors_by_block(
                x_test[start : start + step], y_test[start : start + step]
            )
            parts = self.influences_from_factors_by_block(factors, x, y, mode)
            del factors
            for block, part in parts.items():
                if block not in result:
                    result[block] = part.new_empty((x_test.shape[0], *part.shape[1:]))
                result[block][start : start + step] = part
        return result

    def _split(self, flat: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict((b, flat[:, index]) for b, index in self._block_slices().items())

    # -- device ---------------------------------------------------------------------------------
    def to(self, device: Union[str, torch.device]) -> "TorchInfluenceFunctionModel":
        """Move the network and the fitted state to ``device``; returns ``self``."""
        state = self.fitted_state() if self._fitted else None
        self.model.to(device)
        names = list(self._fn.names)
        self._fn = ModelFunctions(self.model, self.loss, names, self._fn.second_order)
        if state is not None:
            self.load_fitted_state(state)
        return self

    # -- fitted state ---------------------------------------------------------------------------
    def fitted_state(self) -> dict[str, Tensor]:
        self._require_fitted()
        regs = list(self.block_regularization.values())
        state = {
            "n_parameters": torch.tensor(self.n_parameters, dtype=torch.int64),
            "regularization": torch.tensor(
                regs if self._is_blocked else regs[0], dtype=torch.float64
            ),
            "x_shape": torch.tensor(self._x_shape, dtype=torch.int64),
            "y_shape": torch.tensor(self._y_shape, dtype=torch.int64),
        }
        if self._is_blocked:
            for i, block in enumerate(self._blocks.values()):
                state.update({f"block{i}.{k}": v for k, v in block._get_state().items()})
        else:
            state.update(self._get_state())
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_fitted_state(self, state: dict[str, Any]) -> "TorchInfluenceFunctionModel":
        blocks = self._block_models() if self._is_blocked else {"": self}
        own = [
            f"block{i}.{k}" if self._is_blocked else k
            for i, block in enumerate(blocks.values())
            for k in block._state_keys
        ]
        needed = {"n_parameters", "regularization", "x_shape", "y_shape", *own}
        missing = sorted(needed - set(state))
        if missing:
            raise FittedStateError(
                f"The fitted state lacks {missing}; was it exported by {type(self).__name__}"
                + (f" with {len(blocks)} blocks?" if self._is_blocked else "?")
            )
        if int(state["n_parameters"]) != self.n_parameters:
            raise FittedStateError(
                f"The fitted state is for {int(state['n_parameters'])} parameters, but the model "
                f"has {self.n_parameters} trainable parameters."
            )
        stored = [float(r) for r in torch.as_tensor(state["regularization"]).reshape(-1)]
        ours = list(self.block_regularization.values())
        if len(stored) != len(ours):
            raise FittedStateError(
                f"The fitted state has {len(stored)} blocks, this model {len(ours)}."
            )
        if self._state_depends_on_regularization and stored != ours:
            raise FittedStateError(
                f"The fitted state was made with regularization {_shown(stored)}, "
                f"this model uses {_shown(ours)}."
            )
        x_shape = tuple(int(s) for s in state["x_shape"].reshape(-1).tolist())
        y_shape = tuple(int(s) for s in state["y_shape"].reshape(-1).tolist())
        for i, block in enumerate(blocks.values()):
            prefix = f"block{i}." if self._is_blocked else ""
            block._set_state(
                {k: _to_device(state[prefix + k], self.device) for k in block._state_keys}
            )
            block._x_shape, block._y_shape, block._fitted = x_shape, y_shape, True
        self._blocks = blocks if self._is_blocked else None
        self._x_shape, self._y_shape = x_shape, y_shape
        self._fitted = True
        return self

    def _get_state(self) -> dict[str, Tensor]:
        return {}

    def _set_state(self, state: dict[str, Tensor]) -> None:
        pass

    # -- checks ---------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        require_fitted(self)

    def _prepare(
        self, x: Any, y: Any, what: str, allow_empty: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Check a batch and move it to the model's device and dtype."""
        x = _as_tensor(x, f"{what} x")
        y = _as_tensor(y, f"{what} y")
        if x.ndim == 0 or y.ndim == 0:
            raise InputRankError(
                f"{what}: x and y need a leading sample dimension; got x of shape "
                f"{tuple(x.shape)} and y of shape {tuple(y.shape)}."
            )
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]}; they must match."
            )
        if x.shape[0] == 0 and not allow_empty:
            raise EmptyDataError(f"{what}: the batch holds no samples.")
        self._check_sample_shape(x, y, what)
        if x.is_floating_point():
            check_finite(x, f"{what} x")
            x = x.to(device=self.device, dtype=self.dtype)
        else:
            x = x.to(self.device)
        if y.is_floating_point():
            check_finite(y, f"{what} y")
            y = y.to(device=self.device, dtype=self.dtype)
        else:
            y = y.to(self.device)
        return x, y

    def _check_sample_shape(self, x: Tensor, y: Tensor, what: str) -> None:
        if self._x_shape is None:
            self._probe_model(x, y, what)
            self._x_shape, self._y_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
            return
        for name, t, expected in (("x", x, self._x_shape), ("y", y, self._y_shape)):
            got = tuple(t.shape[1:])
            if got == expected:
                continue
            cls = InputRankError if len(got) != len(expected) else ShapeMismatchError
            raise cls(
                f"{what}: each sample of {name} has shape {got}, but the model was fitted on "
                f"samples of shape {expected} (rank {len(expected)})."
            )

    def _probe_model(self, x: Tensor, y: Tensor, what: str) -> None:
        """Run the loss on one sample, so a wrong input rank fails here with a clear message."""
        if x.shape[0] == 0:
            return
        xs = x[:1].to(self.device, self.dtype if x.is_floating_point() else None)
        ys = y[:1].to(self.device, self.dtype if y.is_floating_point() else None)
        try:
            with torch.no_grad(), buffers_kept(self.model):
                value = self.loss(self.model(xs), ys)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise InputRankError(
                f"{what}: the model and loss cannot be evaluated on a sample of x with shape "
                f"{tuple(x.shape[1:])} and y with shape {tuple(y.shape[1:])} ({y.dtype}): {exc}"
            ) from exc
        if value.numel() != 1:
            raise InfluenceInputError(
                f"The loss must return a scalar for one sample, got shape {tuple(value.shape)}."
            )

    def _prepare_factors(self, factors: Any) -> Tensor:
        factors = _as_tensor(factors, "z_test_factors")
        check_factors_shape(tuple(factors.shape), self.n_parameters)
        check_finite(factors, "z_test_factors")
        return factors.to(device=self.device, dtype=self.dtype)

    def _hessian_batches(self, data: TrainingData) -> "HessianOperator":
        x, y = data.tensors()
        batch = product_batch_size(self._fn, x, y, data.batch_size)
        return HessianOperator(self._fn, (x, y), batch, self.regularization)


def check_finite_terms(terms: LayerTerms) -> None:
    """Refuse layer terms whose output gradients are not finite (the loss overflowed)."""
    for grads in terms.out_grads:
        check_finite(grads, "per-sample gradients of the loss")


def _shown(regs: list[float]) -> Any:
    return regs[0] if len(regs) == 1 else regs


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device) if t.is_floating_point() else t


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        value = native_array(value)
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InfluenceInputError(
            f"{what} must be a tensor or array, got {type(value).__name__}."
        ) from exc


def positive_int(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    """Validate an option that must be an integer ≥ 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"{name} must be an integer ≥ 1, got {value!r}.")
    return value


def non_negative(value: Any, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidParameterError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    return value
