"""pyDVL's torch helper functions, for code written against ``pydvl.influence.torch``: closures
of Hessian-vector products of a model's loss, a Lanczos (ARPACK) spectral approximation of an
operator, a matrix as an operator, and the alignment of flat vectors with parameter dicts.

The influence models of this package do not use them; they follow pyDVL's signatures and
semantics. The loss of a batch is ``loss(model(x), y)`` as the loss function reduces it, and
the loss of a data loader is the mean of its batches' losses weighted by their sizes (equal to
the mean per-sample loss for a ``mean``-reduced loss).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from ..errors import (
    EmptyDataError,
    InfluenceInputError,
    InputRankError,
    InvalidParameterError,
    InvalidRankError,
    ShapeMismatchError,
    TorchLinalgEighException,
)

__all__ = [
    "LossType",
    "TorchTensorContainerType",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "TorchLinalgEighException",
    "align_structure",
    "align_with_model",
    "create_batch_hvp_function",
    "create_batch_loss_function",
    "create_hvp_function",
    "flatten_dimensions",
    "get_model_parameters",
    "hvp",
    "operator_spectral_approximation",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
]

#: a loss function ``loss(outputs, targets) -> scalar``
LossType = Callable[[Tensor, Tensor], Tensor]

#: a tensor, a sequence of tensors, or a mapping of names to tensors
TorchTensorContainerType = Union[Tensor, Collection[Tensor], Mapping[str, Tensor]]


# -- parameters and their structure ---------------------------------------------------------------


def to_model_device(x: Tensor, model: nn.Module) -> Tensor:
    """``x`` on the device of the model's first parameter (unchanged for a model without any)."""
    first = next(model.parameters(), None)
    return x if first is None else x.to(first.device)


def get_model_parameters(
    model: nn.Module, detach: bool = True, require_grad_only: bool = True
) -> dict[str, Tensor]:
    """The model's parameters by name: only trainable ones unless ``require_grad_only=False``,
    detached from autograd unless ``detach=False``."""
    return {
        name: p.detach() if detach else p
        for name, p in model.named_parameters()
        if p.requires_grad or not require_grad_only
    }


def flatten_dimensions(
    tensors: Iterable[Tensor], shape: Optional[tuple[int, ...]] = None, concat_at: int = -1
) -> Tensor:
    """Concatenate tensors along ``concat_at``, each first flattened to 1-D or, with ``shape``,
    reshaped to ``shape``.

    Example:
        >>> flatten_dimensions([torch.ones(2, 2), torch.zeros(3)])
        tensor([1., 1., 1., 1., 0., 0., 0.])
    """
    pieces = [t.reshape(-1) if shape is None else t.reshape(*shape) for t in tensors]
    if not pieces:
        raise EmptyDataError("flatten_dimensions got no tensors to concatenate.")
    return torch.cat(pieces, dim=concat_at)


def reshape_vector_to_tensors(
    input_vector: Tensor, target_shapes: Iterable[tuple[int, ...]]
) -> tuple[Tensor, ...]:
    """Split a 1-D tensor into consecutive pieces of the given shapes (views, no copy).

    Raises:
        InputRankError: ``input_vector`` is not 1-D.
        ShapeMismatchError: its length is not the total size of the shapes.
    """
    if input_vector.dim() != 1:
        raise InputRankError(
            f"The vector to split must be 1-D; got a tensor of shape {tuple(input_vector.shape)}."
        )
    shapes = [tuple(s) for s in target_shapes]
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != input_vector.shape[0]:
        raise ShapeMismatchError(
            f"The shapes {shapes} hold {sum(sizes)} numbers, but the vector has "
            f"{input_vector.shape[0]}."
        )
    pieces = torch.split(input_vector, sizes)
    return tuple(piece.view(shape) for piece, shape in zip(pieces, shapes))


def align_structure(source: Mapping[str, Tensor], target: TorchTensorContainerType) -> dict:
    """``target`` as a dict with the keys of ``source`` (in its order), each value shaped like
    the corresponding value of ``source``.

    ``target`` may be a mapping with the same keys in the same order and the same shapes, a
    tuple or list of tensors of those shapes in that order, or a 1-D tensor holding all of them
    flattened and concatenated.

    Raises:
        ShapeMismatchError: keys or shapes differ, or the vector has the wrong length.
        InputRankError: ``target`` is a tensor that is not 1-D.
        InfluenceInputError: ``target`` is of another type. All three are ``ValueError``.
    """
    keys = list(source.keys())
    shapes = [tuple(v.shape) for v in source.values()]
    if isinstance(target, Mapping):
        if list(target.keys()) != keys:
            missing = [k for k in keys if k not in target]
            extra = [k for k in target if k not in source]
            detail = f"missing {missing}, unexpected {extra}" if missing or extra else "order"
            raise ShapeMismatchError(
                f"The keys of target {list(target.keys())} differ from those of source {keys} "
                f"({detail})."
            )
        target_shapes = [tuple(v.shape) for v in target.values()]
        if target_shapes != shapes:
            wrong = [k for k, a, b in zip(keys, target_shapes, shapes) if a != b]
            raise ShapeMismatchError(
                f"The shapes of target differ from those of source at {wrong}: "
                f"{target_shapes} instead of {shapes}."
            )
        return dict(target)
    if isinstance(target, Tensor):
        return dict(zip(keys, reshape_vector_to_tensors(target, shapes)))
    if isinstance(target, (tuple, list)):
        target_shapes = [tuple(getattr(v, "shape", ())) for v in target]
        if target_shapes != shapes or not all(isinstance(v, Tensor) for v in target):
            raise ShapeMismatchError(
                f"target is a {type(target).__name__} of tensors with shapes {target_shapes}, "
                f"but source's shapes are {shapes}."
            )
        return dict(zip(keys, target))
    raise InfluenceInputError(
        f"target must be a mapping of tensors, a tuple or list of tensors, or a 1-D tensor; got "
        f"{type(target).__name__}."
    )


def align_with_model(x: TorchTensorContainerType, model: nn.Module) -> dict[str, Tensor]:
    """``x`` shaped like the model's trainable parameters (see :func:`align_structure`)."""
    return align_structure(get_model_parameters(model, detach=False), x)


def safe_torch_linalg_eigh(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(*args, **kwargs)``, raising :class:`TorchLinalgEighException` (which
    explains the known failure on large matrices) instead of a bare ``RuntimeError``."""
    try:
        values, vectors = torch.linalg.eigh(*args, **kwargs)
    except RuntimeError as exc:
        raise TorchLinalgEighException(exc) from exc
    return values, vectors


# -- Hessian-vector products ----------------------------------------------------------------------


def hvp(
    func: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    vec: dict[str, Tensor],
    reverse_only: bool = True,
) -> dict[str, Tensor]:
    """``∇²func(params) · vec`` for a scalar function of a dict of tensors, as a dict shaped like
    ``params``: reverse over reverse mode (``reverse_only=True``), else forward over reverse
    where torch can (not for parameters that require gradients, nor for functions whose
    backward pass torch cannot differentiate forward, e.g. through ``mse_loss``; reverse mode
    gives the same product then)."""
    return _hvp_many(func, params, [vec], reverse_only)[0]


def _hvp_many(
    func: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    vecs: list[dict[str, Tensor]],
    reverse_only: bool,
) -> list[dict[str, Tensor]]:
    """``∇²func(params) · v`` for each ``v`` of ``vecs`` (one gradient graph for all of them in
    reverse mode).

    Forward over reverse mode is used only when asked for and possible: not for parameters
    tracked by autograd (torch cannot differentiate such products again), and not where torch
    lacks the forward derivative of a backward pass (``mse_loss`` raises "ZeroTensors are
    immutable" in torch 2.13). Reverse mode computes the same products then.
    """
    tracked = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    if not reverse_only and not tracked:
        try:
            return [jvp(grad(func), (params,), (v,))[1] for v in vecs]
        except RuntimeError:
            pass  # a genuine error recurs in reverse mode below
    _, pullback = vjp(grad(func), params)
    return [pullback(v)[0] for v in vecs]


def create_batch_loss_function(
    model: nn.Module, loss: LossType
) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """``(params, x, y) ↦ loss(model_params(x), y)``: the loss of a batch with the model's
    parameters replaced by ``params`` (a dict of some of its named parameters; the others are
    the model's own).

    Each call runs on copies of the model's buffers: a model in train mode updates them
    (BatchNorm running statistics), which must neither change the model nor, done in place on
    tensors an earlier batch's graph saved, invalidate that graph.
    """

    def batch_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        x, y = to_model_device(x, model), to_model_device(y, model)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return loss(functional_call(model, {**buffers, **params}, (x,)), y)

    return batch_loss


def _as_rows(params: Mapping[str, Tensor], vec: Any) -> tuple[Tensor, bool]:
    """``vec`` as a ``k × p`` matrix in the parameters' dtype and device, and whether it was
    one vector (a 1-D tensor or a container shaped like ``params``)."""
    first = next(iter(params.values()))
    p = sum(v.numel() for v in params.values())
    if not isinstance(vec, Tensor):
        vec = flatten_dimensions(align_structure(params, vec).values())
    if vec.dim() not in (1, 2):
        raise InputRankError(
            f"vec must be a vector of {p} numbers or a k × {p} matrix; got shape "
            f"{tuple(vec.shape)}."
        )
    if vec.shape[-1] != p:
        raise ShapeMismatchError(
            f"vec has {vec.shape[-1]} numbers per row, but the model has {p} trainable parameters."
        )
    single = vec.dim() == 1
    rows = vec.reshape(1, -1) if single else vec
    return rows.to(device=first.device, dtype=first.dtype), single


def _shaped(rows: list[Tensor], single: bool) -> Tensor:
    out = torch.stack(rows)
    return out[0] if single else out


def create_batch_hvp_function(
    model: nn.Module, loss: LossType, reverse_only: bool = True
) -> Callable[[dict[str, Tensor], Tensor, Tensor, Any], Tensor]:
    """``(params, x, y, vec) ↦ ∇²θ loss(model_θ(x), y) · vec`` at ``θ = params``, flat.

    ``params`` is a dict of (some of) the model's named parameters, ``vec`` a flat vector of
    their total size (or a dict/tuple shaped like them), or a ``k × p`` matrix whose rows are
    multiplied each. The result is flat in the order of ``params``: a vector, or ``k × p``.
    ``reverse_only=False`` asks for forward over reverse mode, used where torch can (as in
    :func:`hvp`).
    """
    batch_loss = create_batch_loss_function(model, loss)

    def batch_hvp(params: dict[str, Tensor], x: Tensor, y: Tensor, vec: Any) -> Tensor:
        if not params:
            raise InfluenceInputError("params is empty; pass the parameters to differentiate.")
        rows, single = _as_rows(params, vec)
        keys = list(params)

        def f(p: dict[str, Tensor]) -> Tensor:
            return batch_loss(p, x, y)

        vecs = [align_structure(params, r) for r in rows]
        products = _hvp_many(f, dict(params), vecs, reverse_only)
        return _shaped([flatten_dimensions(d[k] for k in keys) for d in products], single)

    return batch_hvp


def _batches(data_loader: Iterable) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in data_loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InfluenceInputError(
                "data_loader must yield (x, y) pairs, e.g. a DataLoader over TensorDataset(x, "
                f"y); got a batch of type {type(batch).__name__}."
            )
        yield batch[0], batch[1]


def _no_data() -> EmptyDataError:
    return EmptyDataError(
        "data_loader yielded no samples (a generator is exhausted after one pass; pass a "
        "DataLoader or a list, which can be iterated again)."
    )


def create_hvp_function(
    model: nn.Module,
    loss: LossType,
    data_loader: Iterable,
    precompute_grad: bool = True,
    use_average: bool = True,
    reverse_only: bool = True,
    track_gradients: bool = False,
) -> Callable[[Any], Tensor]:
    """``vec ↦ H vec`` with ``H`` the Hessian of the model's loss over ``data_loader`` in its
    trainable parameters: the mean of the batches' losses ``loss(model(x), y)``, weighted by
    their numbers of samples.

    Args:
        model: the model; its trainable parameters (``requires_grad``) are differentiated.
        loss: ``loss(outputs, targets)``, reduced to a scalar over a batch.
        data_loader: ``(x, y)`` batches, iterated again at each product unless
            ``precompute_grad``.
        precompute_grad: build the graph of the loss's gradient over all batches now, once,
            and differentiate it again at each product (fast; holds the graphs of all batches
            in memory). Otherwise every product runs through the data again.
        use_average: without ``precompute_grad``, one product per batch, summed with the
            batches' weights (memory of one batch); ``False``: one product of the loss over all
            batches at once (memory of all). Both give the same ``H``; with
            ``precompute_grad`` the option changes nothing. (pyDVL's batch-wise path averages
            the batches without weights, the same when all batches are equally large.)
        reverse_only: without ``precompute_grad``, reverse over reverse mode; ``False``:
            forward over reverse mode where torch can (not with ``track_gradients``, nor for
            losses whose backward pass torch cannot differentiate forward, e.g. ``mse_loss``;
            reverse mode gives the same products then).
        track_gradients: keep the results differentiable with respect to the model's
            parameters (else they are detached).

    Returns:
        A function of a flat vector of ``p`` numbers (or a dict/tuple shaped like the trainable
        parameters, or a ``k × p`` matrix whose rows are multiplied each) returning the flat
        product: a vector of ``p``, or ``k × p``. Parameters are in ``model.named_parameters()``
        order.

    Raises:
        EmptyDataError: the data loader yields no samples.
        InfluenceInputError: its batches are not ``(x, y)`` pairs.
    """
    from .functional import ModelFunctions  # imported here: functional.py re-exports this module

    fn = ModelFunctions(model, loss)  # raises for a model without trainable parameters
    if precompute_grad:
        return _precomputed_hvp_function(model, loss, data_loader, fn.names, track_gradients)

    batch_loss = create_batch_loss_function(model, loss)

    def params() -> dict[str, Tensor]:
        live = dict(model.named_parameters())
        return {n: live[n] if track_gradients else live[n].detach() for n in fn.names}

    def product_of(f: Callable, p: dict[str, Tensor], rows: Tensor) -> list[Tensor]:
        products = _hvp_many(f, p, [fn.unflatten(r) for r in rows], reverse_only)
        return [fn.flatten(d) for d in products]

    def averaged(vec: Any) -> Tensor:
        p = params()
        rows, single = _as_rows(p, vec)
        total, n = None, 0
        for x, y in _batches(data_loader):
            size = len(x)
            products = product_of(lambda q, x=x, y=y: batch_loss(q, x, y), p, rows)
            part = torch.stack(products) * size
            total = part if total is None else total + part
            n += size
        if total is None or n == 0:
            raise _no_data()
        out = total / n
        out = out if track_gradients else out.detach()
        return out[0] if single else out

    def whole(vec: Any) -> Tensor:
        p = params()
        rows, single = _as_rows(p, vec)
        batches = list(_batches(data_loader))
        n = sum(len(x) for x, _ in batches)
        if n == 0:
            raise _no_data()

        def empirical_loss(q: dict[str, Tensor]) -> Tensor:
            return sum(batch_loss(q, x, y) * len(x) for x, y in batches) / n

        out = torch.stack(product_of(empirical_loss, p, rows))
        out = out if track_gradients else out.detach()
        return out[0] if single else out

    return averaged if use_average else whole


def _precomputed_hvp_function(
    model: nn.Module,
    loss: LossType,
    data_loader: Iterable,
    names: list[str],
    track_gradients: bool,
) -> Callable[[Any], Tensor]:
    """The gradient of the mean loss built once with its graph; each product differentiates
    ``⟨∇L, v⟩`` again (one backward pass per vector)."""
    live = dict(model.named_parameters())
    params = [live[n] for n in names]
    batch_loss = create_batch_loss_function(model, loss)
    total, n = None, 0
    with torch.enable_grad():
        for x, y in _batches(data_loader):
            value = batch_loss(dict(zip(names, params)), x, y)
            grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
            flat = flatten_dimensions(
                torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)
            )
            total = flat * len(x) if total is None else total + flat * len(x)
            n += len(x)
    if total is None or n == 0:
        raise _no_data()
    mean_grad = total / n

    def product(vec: Any) -> Tensor:
        rows, single = _as_rows(dict(zip(names, params)), vec)
        if not mean_grad.requires_grad:  # the loss is at most linear in θ: H = 0
            out = torch.zeros_like(rows)
            return out[0] if single else out
        results = []
        with torch.enable_grad():
            for r in rows:
                parts = torch.autograd.grad(
                    mean_grad @ r,
                    params,
                    retain_graph=True,
                    create_graph=track_gradients,
                    allow_unused=True,
                )
                results.append(
                    flatten_dimensions(
                        torch.zeros_like(p) if g is None else g for g, p in zip(parts, params)
                    )
                )
        out = torch.stack(results)
        out = out if track_gradients else out.detach()
        return out[0] if single else out

    return product


# -- operators and their spectra ------------------------------------------------------------------


@dataclass
class LowRankProductRepresentation:
    """``H ≈ V diag(eigen_vals) Vᵀ`` with orthonormal columns ``V = projections`` (``p × r``)."""

    eigen_vals: Tensor
    projections: Tensor

    def __post_init__(self):
        if self.eigen_vals.device != self.projections.device:
            raise InfluenceInputError(
                f"eigen_vals are on {self.eigen_vals.device}, projections on "
                f"{self.projections.device}; both must be on the same device."
            )

    @property
    def device(self) -> torch.device:
        return self.eigen_vals.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projections.dtype

    def to(self, device: Union[str, torch.device]) -> "LowRankProductRepresentation":
        """A copy with both tensors on ``device``."""
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


class MatrixOperator:
    """A matrix ``M`` (``m × p``) as an operator: :meth:`apply` maps a vector ``v`` of ``p``
    numbers to ``M v`` and each row ``v`` of a ``k × p`` matrix to the row ``M v``."""

    def __init__(self, matrix: Tensor):
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise InputRankError(f"MatrixOperator needs a 2-D tensor; got {shape}.")
        self.matrix = matrix

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def input_size(self) -> int:
        """``p``: the length of the vectors the operator takes."""
        return int(self.matrix.shape[-1])

    def to(self, device: Union[str, torch.device]) -> "MatrixOperator":
        """Move the matrix to ``device``; returns ``self``."""
        self.matrix = self.matrix.to(device)
        return self

    def apply(self, tensor: Tensor) -> Tensor:
        """``M v`` for a vector, or ``M`` applied to each row of a ``k × p`` matrix."""
        if tensor.dim() not in (1, 2):
            raise InputRankError(
                f"MatrixOperator.apply takes a vector or a matrix of rows; got shape "
                f"{tuple(tensor.shape)}."
            )
        if tensor.shape[-1] != self.input_size:
            raise ShapeMismatchError(
                f"The operator takes vectors of {self.input_size} numbers; got shape "
                f"{tuple(tensor.shape)}."
            )
        return tensor.to(self.device) @ self.matrix.T


def operator_spectral_approximation(
    operator: Any,
    rank: int = 10,
    krylov_dimension: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    eigen_computation_on_gpu: bool = False,
    torch_seed: Optional[int] = None,
) -> LowRankProductRepresentation:
    """The ``rank`` eigenpairs of largest magnitude of a symmetric operator, by the implicitly
    restarted Lanczos method (ARPACK, through scipy), as ``H ≈ V diag(Λ) Vᵀ``.

    Args:
        operator: anything with ``input_size`` (``p``) and ``apply(v)`` returning ``H v`` for
            a vector ``v`` of ``p`` numbers (e.g. :class:`MatrixOperator`); its ``dtype`` and
            ``device``, if it has them, are those of the vectors it is given and of the result.
            A square tensor is taken as a :class:`MatrixOperator`.
        rank: eigenpairs to compute, at most ``p - 1`` (ARPACK's limit; larger values are
            reduced to it, as pyDVL does).
        krylov_dimension: Lanczos vectors kept (ARPACK's ``ncv``), between ``rank + 1`` and
            ``p``; default ``min(p, max(2·rank + 1, 20))``.
        tol: relative accuracy of the eigenvalues (0: machine precision).
        max_iter: restarts allowed; default ``10·p``. If they run out, the pairs converged
            so far are returned with a warning.
        eigen_computation_on_gpu: run the Lanczos iteration on the CUDA device with cupy
            instead of scipy on the CPU. Raises ``ImportError`` when CUDA or cupy is missing.
        torch_seed: seed of the starting vector; ``None`` lets ARPACK draw it.

    Returns:
        The eigenvalues sorted by decreasing magnitude and their orthonormal eigenvectors as
        the columns of ``projections`` (``p × rank``), in the operator's dtype and on its device.
    """
    if isinstance(operator, Tensor):
        operator = MatrixOperator(operator)
    if isinstance(operator, MatrixOperator) and operator.matrix.shape[0] != operator.input_size:
        raise ShapeMismatchError(
            f"A spectral approximation needs a square matrix; got shape "
            f"{tuple(operator.matrix.shape)}."
        )
    if not hasattr(operator, "input_size") or not callable(getattr(operator, "apply", None)):
        raise InfluenceInputError(
            "operator must have input_size and apply(v) (e.g. MatrixOperator(matrix)); got "
            f"{type(operator).__name__}."
        )
    p = int(operator.input_size)
    dtype = getattr(operator, "dtype", None)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = getattr(operator, "device", None)
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise InvalidRankError(f"rank must be an integer ≥ 1, got {rank!r}.")
    if not (isinstance(tol, numbers.Real) and tol >= 0 and math.isfinite(tol)):
        raise InvalidParameterError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    if max_iter is not None and (not isinstance(max_iter, (int, np.integer)) or max_iter < 1):
        raise InvalidParameterError(f"max_iter must be an integer ≥ 1 or None, got {max_iter!r}.")

    if p == 1:  # ARPACK needs p ≥ 2; a 1 × 1 operator is its own eigenvalue
        vector = torch.ones(1, 1, dtype=dtype, device=device)
        value = operator.apply(vector).reshape(1).to(device=device, dtype=dtype)
        return LowRankProductRepresentation(value, vector)

    k = min(int(rank), p - 1)
    if krylov_dimension is not None and not (k < krylov_dimension <= p):
        raise InvalidParameterError(
            f"krylov_dimension must be between rank + 1 = {k + 1} and the operator's size {p}, "
            f"got {krylov_dimension!r}."
        )
    start = None
    if torch_seed is not None:
        generator = torch.Generator().manual_seed(int(torch_seed))
        start = torch.randn(p, generator=generator, dtype=torch.float64)

    def product(v: Tensor) -> Tensor:
        # in the operator's dtype, back in float64: ARPACK then runs in double precision
        with torch.no_grad():
            out = operator.apply(v.to(device=device, dtype=dtype))
        return out.detach().reshape(-1).to(torch.float64)

    if eigen_computation_on_gpu:
        values, vectors = _gpu_eigsh(product, p, k, krylov_dimension, tol, max_iter, start)
    else:
        values, vectors = _cpu_eigsh(product, p, k, krylov_dimension, tol, max_iter, start)
    order = torch.argsort(values.abs(), descending=True)
    return LowRankProductRepresentation(
        values[order].to(device=device, dtype=dtype),
        vectors[:, order].to(device=device, dtype=dtype),
    )


def _cpu_eigsh(product, p, k, ncv, tol, max_iter, start) -> tuple[Tensor, Tensor]:
    try:
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
    except ImportError as exc:
        raise ImportError(
            "operator_spectral_approximation needs scipy (pip install scipy)."
        ) from exc

    def matvec(x: np.ndarray) -> np.ndarray:
        return product(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).cpu().numpy()

    linear = LinearOperator((p, p), matvec=matvec, dtype=np.float64)
    v0 = None if start is None else start.numpy()
    try:
        values, vectors = eigsh(linear, k=k, ncv=ncv, maxiter=max_iter, tol=tol, v0=v0)
    except ArpackNoConvergence as exc:
        warnings.warn(
            f"ARPACK did not converge (rank={k}, krylov_dimension={ncv}, tol={tol}, "
            f"max_iter={max_iter}); returning the {len(exc.eigenvalues)} eigenpairs that did. "
            "Raise max_iter or krylov_dimension, or loosen tol.",
            RuntimeWarning,
            stacklevel=3,
        )
        values, vectors = exc.eigenvalues, exc.eigenvectors
    return torch.from_numpy(np.asarray(values)), torch.from_numpy(np.asarray(vectors))


def _gpu_eigsh(product, p, k, ncv, tol, max_iter, start) -> tuple[Tensor, Tensor]:
    if not torch.cuda.is_available():
        raise ImportError(
            "eigen_computation_on_gpu=True runs the Lanczos iteration with cupy on a CUDA "
            "device, but torch sees no CUDA device; set eigen_computation_on_gpu=False."
        )
    try:
        import cupy as cp
        from cupyx.scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError as exc:
        raise ImportError(
            "eigen_computation_on_gpu=True needs cupy (https://docs.cupy.dev/en/stable/"
            "install.html); install it or set eigen_computation_on_gpu=False."
        ) from exc

    def matvec(x):
        out = product(torch.from_dlpack(cp.ascontiguousarray(x)))
        return cp.from_dlpack(out.to("cuda").contiguous())

    linear = LinearOperator((p, p), matvec=matvec, dtype=cp.float64)
    v0 = None if start is None else cp.asarray(start.numpy())
    values, vectors = eigsh(linear, k=k, ncv=ncv, maxiter=max_iter, tol=tol, v0=v0)
    return torch.from_dlpack(values), torch.from_dlpack(vectors)
