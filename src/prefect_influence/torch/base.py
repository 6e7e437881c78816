"""The shared body of every PyTorch influence model: input checks, device/dtype handling,
per-sample gradients, Up/Perturbation products and fitted-state export.

A concrete method only implements ``_fit(data)`` (build its inverse-Hessian approximation) and
``_solve(rhs)`` (apply it to the rows of a ``k × p`` matrix), plus its state keys.
"""

from __future__ import annotations

import collections.abc
import math
import warnings
from abc import abstractmethod
from typing import Any, Iterable, Iterator, Optional

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
    InvalidRegularizationError,
    ShapeMismatchError,
)
from .functional import LossFunction, ModelFunctions, check_finite, rows_within
from .operator import HessianOperator, buffers_kept, product_batch_size
from .util import native_array

__all__ = ["TorchInfluenceFunctionModel", "TrainingData"]

Batches = Iterable[tuple[Tensor, Tensor]]


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
    #: gradients held at once by :meth:`self_influences` (a solve's temporaries are a few times
    #: that); at least 64 samples a slice
    self_influence_budget_bytes = 64 * 2**20
    #: keys of the method-specific part of :meth:`fitted_state`
    _state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        regularization: Optional[float] = None,
        *,
        hessian_regularization: Optional[float] = None,
    ):
        if regularization is not None and hessian_regularization is not None:
            raise InvalidParameterError(
                "Pass either regularization or its alias hessian_regularization, not both."
            )
        if regularization is None:
            regularization = 0.0 if hessian_regularization is None else hessian_regularization
        if not isinstance(model, nn.Module):
            raise InfluenceInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not callable(loss):
            raise InfluenceInputError(f"loss must be callable, got {type(loss).__name__}.")
        reg = float(regularization)
        if not math.isfinite(reg) or reg < 0:
            raise InvalidRegularizationError(
                f"regularization must be a finite number ≥ 0, got {regularization!r}."
            )
        if self._needs_positive_regularization and reg == 0:
            raise InvalidRegularizationError(
                f"{type(self).__name__} needs regularization > 0 (it divides by it); got 0."
            )
        self.model = model
        self.loss = loss
        self.regularization = reg
        self._fn = ModelFunctions(model, loss)
        self._fitted = False
        self._x_shape: Optional[tuple[int, ...]] = None
        self._y_shape: Optional[tuple[int, ...]] = None
        if model.training:
            warnings.warn(
                "The model is in training mode; dropout and batch statistics make influences "
                "random. Call model.eval() before computing influences.",
                stacklevel=2,
            )

    # -- properties -----------------------------------------------------------------------------
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
                self._fit(training)
        self._fitted = True
        return self

    @abstractmethod
    def _fit(self, data: TrainingData) -> None:
        """Build the inverse-Hessian approximation of ``mean Hessian + λI``."""

    @abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """Apply the inverse-Hessian approximation to every row of ``rhs`` (``k × p``)."""

    # -- computing ------------------------------------------------------------------------------
    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        grads = self._fn.per_sample_grads(x, y)
        return self._solve(grads)

    def influences_from_factors(
        self,
        z_test_factors: Tensor,
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> Tensor:
        self._require_fitted()
        mode = InfluenceMode.parse(mode)
        factors = self._prepare_factors(z_test_factors)
        x, y = self._prepare(x, y, "training input")
        if mode is InfluenceMode.Up:
            return factors @ self._fn.per_sample_grads(x, y).T
        return self._fn.mixed_products(factors, x, y)

    def per_sample_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Flat per-sample gradients ``∇θ ℓ(x_i, y_i)``: shape ``n × p`` (no fit needed)."""
        x, y = self._prepare(x, y, "input")
        return self._fn.per_sample_grads(x, y)

    def factors_from_grads(self, grads: Tensor) -> Tensor:
        """``H⁻¹ g`` for every row ``g`` of precomputed per-sample gradients (``k × p``)."""
        self._require_fitted()
        return self._solve(self._prepare_factors(grads))

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """``⟨H⁻¹∇θℓ(z_i), ∇θℓ(z_i)⟩`` for every sample: the diagonal, without the full matrix.
        Samples go in slices whose gradients fit :attr:`self_influence_budget_bytes`, so a large
        input needs memory for one slice, not ``n × p`` gradients and their solve."""
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        step = rows_within(self.n_parameters, self.dtype.itemsize, self.self_influence_budget_bytes)
        parts = []
        for start in range(0, x.shape[0], step):
            grads = self._fn.per_sample_grads(x[start : start + step], y[start : start + step])
            parts.append((self._solve(grads) * grads).sum(dim=1))
        return torch.cat(parts)

    # -- fitted state ---------------------------------------------------------------------------
    def fitted_state(self) -> dict[str, Tensor]:
        self._require_fitted()
        state = {
            "n_parameters": torch.tensor(self.n_parameters, dtype=torch.int64),
            "regularization": torch.tensor(self.regularization, dtype=torch.float64),
            "x_shape": torch.tensor(self._x_shape, dtype=torch.int64),
            "y_shape": torch.tensor(self._y_shape, dtype=torch.int64),
        }
        state.update({k: v.detach().cpu().clone() for k, v in self._get_state().items()})
        return state

    def load_fitted_state(self, state: dict[str, Any]) -> "TorchInfluenceFunctionModel":
        needed = {"n_parameters", "regularization", "x_shape", "y_shape", *self._state_keys}
        missing = sorted(needed - set(state))
        if missing:
            raise FittedStateError(
                f"The fitted state lacks {missing}; was it exported by {type(self).__name__}?"
            )
        if int(state["n_parameters"]) != self.n_parameters:
            raise FittedStateError(
                f"The fitted state is for {int(state['n_parameters'])} parameters, but the model "
                f"has {self.n_parameters} trainable parameters."
            )
        if (
            self._state_depends_on_regularization
            and float(state["regularization"]) != self.regularization
        ):
            raise FittedStateError(
                f"The fitted state was made with regularization {float(state['regularization'])}, "
                f"this model uses {self.regularization}."
            )
        self._x_shape = tuple(int(s) for s in state["x_shape"].reshape(-1).tolist())
        self._y_shape = tuple(int(s) for s in state["y_shape"].reshape(-1).tolist())
        own = {
            k: state[k].to(self.device) if state[k].is_floating_point() else state[k]
            for k in self._state_keys
        }
        self._set_state(own)
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
