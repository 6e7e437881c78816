"""Derivatives of a model's loss with ``torch.func``: per-sample gradients, Hessian-vector
products, dense Hessians and mixed (input × parameter) derivatives, over flat parameter vectors.

Only parameters with ``requires_grad=True`` are differentiated ("trainable"); frozen parameters
and buffers (e.g. BatchNorm running statistics) are passed through unchanged. Flat vectors follow
the order of ``model.named_parameters()``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from ..errors import EmptyDataError, NonFiniteError

# pyDVL keeps these helpers in its functional module; code written for it imports them here
from .compat import (  # noqa: F401
    LowRankProductRepresentation,
    create_batch_hvp_function,
    create_batch_loss_function,
    create_hvp_function,
    hvp,
    operator_spectral_approximation,
)

__all__ = ["LossFunction", "ModelFunctions", "iterate_batches"]

LossFunction = Callable[[Tensor, Tensor], Tensor]

#: curvature matrices a :class:`ModelFunctions` forms products with: the Hessian, the empirical
#: Fisher ``Σ ∇ℓᵢ∇ℓᵢᵀ`` (pyDVL's "Gauss-Newton") and the generalized Gauss-Newton ``Σ Jᵢᵀ Hᵢ Jᵢ``
SECOND_ORDER = ("hessian", "gauss_newton", "generalized_gauss_newton")

#: what the vectors of one Hessian-vector product may add (each needs about one more graph)
PRODUCT_VECTOR_BYTES = 256 * 2**20

#: per-parameter temporaries of one slice of :meth:`ModelFunctions.per_sample_grads`
GRADIENT_SLICE_BYTES = 32 * 2**20


class ModelFunctions:
    """Functional view of ``(model, loss)`` with derivatives of the per-sample loss.

    The per-sample loss is ``loss(model(x_i[None]), y_i[None])``, so a loss with ``mean`` or
    ``sum`` reduction gives the same value. Batch quantities are sums over samples; callers
    divide by the number of samples to get means.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        names: Optional[Sequence[str]] = None,
        second_order: str = "hessian",
    ):
        self.model = model
        self.loss = loss
        named = list(model.named_parameters())
        trainable = [n for n, p in named if p.requires_grad]
        if not trainable:
            raise ValueError(
                "The model has no trainable parameters (all have requires_grad=False)."
            )
        #: differentiated parameters: all trainable ones, or the subset of a Hessian block
        #: (the others are held fixed, as frozen parameters are)
        chosen = set(trainable if names is None else names)
        self.names = [n for n in trainable if n in chosen]
        self.is_whole = len(self.names) == len(trainable)
        by_name = dict(named)
        self.shapes = [by_name[n].shape for n in self.names]
        self.numels = [by_name[n].numel() for n in self.names]
        first = by_name[self.names[0]]
        self.dtype = first.dtype
        self.device = first.device
        if second_order not in SECOND_ORDER:
            raise ValueError(f"second_order must be one of {SECOND_ORDER}, got {second_order!r}.")
        self.second_order = second_order

    def restricted(self, names: Sequence[str]) -> "ModelFunctions":
        """The same model, loss and curvature over the parameters ``names`` only."""
        return ModelFunctions(self.model, self.loss, names, self.second_order)

    # -- parameters ---------------------------------------------------------------------------
    @property
    def n_parameters(self) -> int:
        return int(sum(self.numels))

    def _fixed(self) -> dict[str, Tensor]:
        own = set(self.names)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in own}
        frozen.update(dict(self.model.named_buffers()))
        return frozen

    def params(self) -> dict[str, Tensor]:
        """Trainable parameters, detached, by name."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def flat_params(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params().values()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (last dimension ``p``) into a dict shaped like the parameters."""
        pieces = torch.split(flat, self.numels, dim=-1)
        lead = flat.shape[:-1]
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, pieces, self.shapes)}

    @staticmethod
    def flatten(
        tensors: dict[str, Tensor], n_lead: int = 0, out: Optional[Tensor] = None
    ) -> Tensor:
        """Concatenate a dict of tensors (keeping ``n_lead`` leading dimensions) into flat rows
        (into ``out`` when given)."""
        return torch.cat(
            [t.reshape(*t.shape[:n_lead], -1) for t in tensors.values()], dim=n_lead, out=out
        )

    # -- losses -------------------------------------------------------------------------------
    def sample_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Loss of one sample (``x`` and ``y`` without batch dimension)."""
        out = functional_call(self.model, {**params, **self._fixed()}, (x.unsqueeze(0),))
        return self.loss(out, y.unsqueeze(0))

    def summed_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Sum of the per-sample losses of a batch."""
        return vmap(self.sample_loss, in_dims=(None, 0, 0))(params, x, y).sum()

    # -- first derivatives --------------------------------------------------------------------
    def per_sample_grads(
        self, x: Tensor, y: Tensor, *, budget: int = GRADIENT_SLICE_BYTES
    ) -> Tensor:
        """Flat gradient of every sample's loss: shape ``n × p``. Raises on non-finite values.

        Computed in slices of :func:`rows_within` rows (per-parameter temporaries of about
        ``budget`` bytes) written into the result, so the temporaries stay small instead of
        doubling the ``n × p`` result.
        """
        params = self.params()
        per_sample = vmap(grad(self.sample_loss), in_dims=(None, 0, 0))
        n = x.shape[0]
        flat = torch.empty(n, self.n_parameters, dtype=self.dtype, device=self.device)
        step = rows_within(self.n_parameters, flat.element_size(), budget)
        for start in range(0, n, step):
            grads = per_sample(params, x[start : start + step], y[start : start + step])
            self.flatten(grads, n_lead=1, out=flat[start : start + step])
        check_finite(flat, "per-sample gradients of the loss")
        return flat

    # -- second derivatives -------------------------------------------------------------------
    def hvp_function(
        self, x: Tensor, y: Tensor, vectors_at_once: Optional[int] = None
    ) -> Callable[[Tensor], Tensor]:
        """``V ↦ Σ_i ∇²θ ℓ(x_i, y_i) v`` for every row ``v`` of ``V`` (``k × p → k × p``).

        The graph of the batch's gradient is built here, once, and every call only
        differentiates it again (reverse over reverse: ``H`` is symmetric, so the
        vector-Jacobian product of the gradient is the Hessian-vector product). Holding the
        function holds that graph (about :meth:`gradient_graph_bytes`); each vector
        differentiated at once needs about as much again, so ``vectors_at_once`` bounds them.
        """
        if self.second_order == "gauss_newton":
            return self._gauss_newton_product(x, y)
        if self.second_order == "generalized_gauss_newton":
            return self._generalized_gauss_newton_product(x, y, vectors_at_once)
        _, pullback = vjp(grad(lambda p: self.summed_loss(p, x, y)), self.params())

        def product(vectors: Tensor) -> Tensor:
            one = lambda v: self.flatten(pullback(self.unflatten(v))[0])  # noqa: E731
            return vmap(one, chunk_size=vectors_at_once)(vectors)

        return product

    def _gauss_newton_product(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """``V ↦ Σ_i ∇ℓᵢ (∇ℓᵢᵀ v)``: two matrix products with the batch's gradients."""
        grads = self.per_sample_grads(x, y)
        return lambda vectors: (vectors @ grads.T) @ grads

    def _generalized_gauss_newton_product(
        self, x: Tensor, y: Tensor, vectors_at_once: Optional[int]
    ) -> Callable[[Tensor], Tensor]:
        """``V ↦ Σ_i Jᵢᵀ Hᵢ Jᵢ v``: a forward-mode product through the model (``Jᵢ v``), the
        loss's Hessian in the outputs (``m × m`` per sample) and a reverse-mode product back,
        so the Jacobian is never formed."""
        params, fixed = self.params(), self._fixed()

        def outputs(p: dict[str, Tensor]) -> Tensor:
            return functional_call(self.model, {**p, **fixed}, (x,))

        out, pullback = vjp(outputs, params)
        m = out[0].numel()

        def sample_loss(o: Tensor, t: Tensor) -> Tensor:
            return self.loss(o.reshape(out.shape[1:]).unsqueeze(0), t.unsqueeze(0))

        curvature = vmap(hessian(sample_loss))(out.detach().reshape(len(x), m), y)

        def one(v: Tensor) -> Tensor:
            _, jv = jvp(outputs, (params,), (self.unflatten(v),))
            hjv = torch.einsum("nij,nj->ni", curvature, jv.reshape(len(x), m))
            return self.flatten(pullback(hjv.reshape(out.shape))[0])

        return lambda vectors: vmap(one, chunk_size=vectors_at_once)(vectors)

    def gradient_graph_bytes(self, x: Tensor, y: Tensor) -> int:
        """Bytes of activations autograd keeps to differentiate the gradient of the loss over
        the batch ``(x, y)`` again (parameters and the inputs themselves excluded): what
        :meth:`hvp_function` holds.

        Measured, not modelled: one plain-autograd pass over the batch with
        ``create_graph=True`` and a saved-tensor hook counting distinct storages
        (``torch.func`` transforms do not run such hooks, and build the same graph).
        """
        params = {n: p.detach().requires_grad_(True) for n, p in self.params().items()}
        own = {p.untyped_storage().data_ptr() for p in params.values()}
        own |= {t.untyped_storage().data_ptr() for t in self._fixed().values()}
        own |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}  # held anyway
        seen: set[int] = set()
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = functional_call(self.model, {**params, **self._fixed()}, (x,))
            try:  # the whole batch at once, as the vmapped per-sample loss computes it
                loss = self.loss(out, y).sum()
            except (RuntimeError, ValueError, IndexError):  # a loss for single samples only
                loss = sum(self.loss(out[i : i + 1], y[i : i + 1]).sum() for i in range(len(x)))
            torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        return total

    def mixed_products(self, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``∇_{x_j} ⟨f_i, ∇θ ℓ(x_j, y_j)⟩`` for factors ``k × p``: shape ``k × n × *x.shape[1:]``."""
        params = self.params()

        def scores(x_j: Tensor, y_j: Tensor) -> Tensor:
            g = self.flatten(grad(self.sample_loss)(params, x_j, y_j))
            return factors @ g

        jac = vmap(jacrev(scores, argnums=0))(x, y)  # n × k × *d
        return jac.transpose(0, 1)


def rows_within(
    n_parameters: int,
    itemsize: int,
    budget: int = GRADIENT_SLICE_BYTES,
    *,
    copies: float = 1.0,
    minimum: int = 64,
) -> int:
    """Rows of ``p`` numbers that fit in ``budget`` bytes when each row is held ``copies`` times
    at once (at least ``minimum``): the slice size for row-wise work on ``n × p`` matrices."""
    return max(minimum, int(budget // max(1.0, n_parameters * itemsize * copies)))


def check_finite(t: Tensor, what: str) -> None:
    # a finite sum implies finite entries (NaN and ±Inf propagate): one reduction instead of a
    # boolean mask over a large gradient matrix; the mask only when the sum is not finite
    if bool(torch.isfinite(t.sum())):
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return  # the sum overflowed, the entries are fine
    raise NonFiniteError(
        f"{what} contain {int((~finite).sum())} non-finite value(s) (NaN or Inf); check the "
        "inputs, the labels (e.g. class indices out of range) and the model's numerical stability."
    )


def iterate_batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(x, y)`` slices of at most ``batch_size`` samples."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def count_samples(batches: Iterable[tuple[Tensor, Tensor]]) -> int:
    n = sum(int(b[0].shape[0]) for b in batches)
    if n == 0:
        raise EmptyDataError("The training data holds no samples.")
    return n
