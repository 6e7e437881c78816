"""The damped Hessian as a matrix-free operator over training data kept as tensors, and how
many samples a batch of Hessian-vector products may hold."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .compat import MatrixOperator  # noqa: F401  (pyDVL's module path for it)
from .functional import PRODUCT_VECTOR_BYTES, ModelFunctions

__all__ = ["HessianOperator", "product_batch_size", "buffers_kept", "PRODUCT_GRAPH_BYTES"]

#: one batch's gradient graph when the number of samples per Hessian-vector product is automatic
PRODUCT_GRAPH_BYTES = 64 * 2**20


def product_batch_size(
    fn: ModelFunctions,
    x: Tensor,
    y: Tensor,
    minimum: Optional[int],
    budget: int = PRODUCT_GRAPH_BYTES,
) -> int:
    """Samples per Hessian-vector product when the caller does not fix it: as many as keep one
    batch's gradient graph within ``budget`` (measured on the first ``minimum`` samples), at
    least ``minimum`` (the loader's batch size), at most all of them.

    The products are sums over samples, so this only changes rounding; it saves the fixed cost
    of a product per batch (on a 610-parameter MLP, 782 batches of 256 made a 200k-sample
    Arnoldi fit take 112 s). Deterministic for a given model and data shape.
    """
    n = int(x.shape[0])
    probe = max(1, min(minimum or n, n))
    per_sample = -(-fn.gradient_graph_bytes(x[:probe], y[:probe]) // probe)
    return int(min(n, max(probe, budget // max(per_sample, 1))))


class HessianOperator:
    """Matrix-free ``(mean Hessian + λI) V`` over training data kept as tensors.

    Inside :meth:`reusing_graphs` each batch's gradient graph is built once and every product
    reuses it: a product then costs one backward pass per batch instead of a forward, a
    backward and their derivatives. The graphs are held
    only within that block and only if they fit ``graph_budget_bytes`` (estimated by
    :meth:`~prefect_influence.torch.functional.ModelFunctions.gradient_graph_bytes`);
    otherwise products rebuild them.
    """

    #: largest estimated size of all batches' gradient graphs that :meth:`reusing_graphs` keeps
    graph_budget_bytes: int = 256 * 2**20

    def __init__(
        self,
        fn: ModelFunctions,
        data: tuple[Tensor, Tensor],
        batch_size: Optional[int],
        regularization: float,
    ):
        self.fn = fn
        self.x, self.y = data
        self.n = int(self.x.shape[0])
        self.batch_size = int(batch_size or self.n)
        self.regularization = regularization
        self._products: Optional[list[Optional[Callable[[Tensor], Tensor]]]] = None
        self._graph_bytes: Optional[int] = None

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, self.n, self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]

    def graph_bytes(self) -> int:
        """Estimated bytes of all batches' gradient graphs (measured on up to 256 samples and
        scaled by the number of samples: an upper bound, parameter-sized parts count per sample)."""
        if self._graph_bytes is None:
            probe = min(self.n, 256)
            measured = self.fn.gradient_graph_bytes(self.x[:probe], self.y[:probe])
            self._graph_bytes = -(-measured * self.n // probe)
        return self._graph_bytes

    def _vectors_at_once(self) -> int:
        """Vectors differentiated together in one product: their graphs stay within
        ``PRODUCT_VECTOR_BYTES`` (block CG and Nyström apply the operator to many at once)."""
        per_batch = -(-self.graph_bytes() // self.n_batches)
        return max(1, PRODUCT_VECTOR_BYTES // max(per_batch, 1))

    @contextmanager
    def reusing_graphs(self) -> Iterator["HessianOperator"]:
        """Products inside the block reuse each batch's gradient graph (if within budget),
        built when a product first needs it."""
        if self._products is not None or self.graph_bytes() > self.graph_budget_bytes:
            yield self
            return
        self._products = [None] * self.n_batches
        try:
            yield self
        finally:
            self._products = None

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _summed_product(self, index: int, vectors: Tensor) -> Tensor:
        """Summed Hessian of batch ``index`` times each row of ``vectors``."""
        products = self._products
        if products is not None and products[index] is not None:
            return products[index](vectors)
        start = index * self.batch_size
        x, y = self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
        product = self.fn.hvp_function(x, y, self._vectors_at_once())
        if products is not None:
            products[index] = product
        return product(vectors)

    def batch_hessian_matmul(self, index: int, vectors: Tensor) -> Tensor:
        """Mean Hessian (without λ) of batch ``index`` times each row of ``vectors``."""
        vectors = vectors.to(device=self.fn.device, dtype=self.fn.dtype)
        size = min(self.batch_size, self.n - index * self.batch_size)
        return self._summed_product(index, vectors) / size

    def hessian_matmul(self, vectors: Tensor) -> Tensor:
        """Mean Hessian (without λ) times each row of ``vectors`` (cast to the model's dtype)."""
        vectors = vectors.to(device=self.fn.device, dtype=self.fn.dtype)
        out = torch.zeros_like(vectors)
        for index in range(self.n_batches):
            out += self._summed_product(index, vectors)
        return out / self.n

    def __call__(self, vectors: Tensor) -> Tensor:
        return self.hessian_matmul(vectors) + self.regularization * vectors


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers on exit: forward passes of a model left in train mode update
    them (BatchNorm running statistics), and computing influences must not change the model."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
