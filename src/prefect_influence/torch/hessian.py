"""Exact dense Hessians of the mean training loss, ``p × p``.

Two ways to the same matrix. :func:`dense_hessian` takes Hessian-vector products with blocks of
the identity and works for any model. When every trainable parameter is the weight or bias of an
``nn.Linear`` layer applied once per sample (MLPs, linear heads), :func:`linear_layers_hessian`
uses the layers' structure instead: a parameter of a layer acts on the loss only through the
layer's output ``s = W a + b``, so with ``δ = ∂ℓ/∂s``, ``T = ∂²ℓ/∂s ∂s'`` and ``U = ∂a/∂s'``
(per sample, over the outputs of all layers),

    H[W, W'] = Σ_i T_i ⊗ a_i a'_iᵀ  +  Σ_i δ_i ⊗ U_i ⊗ a'_i        (layer W after or equal to W')

and each term is one matrix product over the samples (``2·n·p_l·p_m`` flops for a pair of
layers, about a quarter of the products with the identity, at the machine's GEMM rate).
:func:`exact_hessian` picks the structured path where it applies and checks it against two
Hessian-vector products before trusting it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from .functional import PRODUCT_VECTOR_BYTES, ModelFunctions, check_finite

__all__ = [
    "exact_hessian",
    "empirical_fisher",
    "dense_hessian",
    "linear_layers_hessian",
    "linear_layers_flops",
    "linear_layout",
    "symmetrize_",
]

logger = logging.getLogger(__name__)

#: per-sample derivatives and matrix-product operands of one chunk of samples in
#: :func:`linear_layers_hessian`
CHUNK_BYTES = 128 * 2**20
#: the sums over samples of :func:`linear_layers_hessian` run in float64 whatever the model's
#: dtype: in float32 the error of an ill-conditioned fit would depend on the order of
#: summation, and so on the chunk sizes
ACCUMULATE = torch.float64

Batches = Iterable[tuple[Tensor, Tensor]]


def exact_hessian(fn: ModelFunctions, data: Batches, n: int) -> Tensor:
    """The mean Hessian of the loss over ``data`` (``n`` samples in all), in ``fn``'s dtype:
    structured for ``nn.Linear`` networks (verified), by products with the identity otherwise."""
    batches = list(data)
    if fn.second_order == "gauss_newton":
        return empirical_fisher(fn, batches, n)
    structured = fn.second_order == "hessian" and fn.is_whole
    layers = linear_layout(fn, *batches[0]) if batches and structured else None
    if layers is not None:
        hessian = linear_layers_hessian(fn, batches, n, layers)
        if _agrees_with_products(fn, batches, n, hessian):
            return hessian
        logger.warning(
            "The structured Hessian of this nn.Linear network disagrees with Hessian-vector "
            "products (a weight shared outside its layer?); forming it column by column instead."
        )
        del hessian
    return dense_hessian(fn, batches, n)


def empirical_fisher(fn: ModelFunctions, data: Batches, n: int) -> Tensor:
    """``(1/n) Σ ∇ℓᵢ ∇ℓᵢᵀ`` (pyDVL's Gauss-Newton matrix): one ``Gᵀ G`` product per batch."""
    p = fn.n_parameters
    matrix = torch.zeros(p, p, dtype=fn.dtype, device=fn.device)
    for x, y in data:
        grads = fn.per_sample_grads(x, y)
        matrix.addmm_(grads.T, grads)
    matrix /= n
    return symmetrize_(matrix)


# -- any model: products with the identity --------------------------------------------------------


def dense_hessian(fn: ModelFunctions, data: Batches, n: int) -> Tensor:
    """Exact mean Hessian ``p × p`` by Hessian-vector products with column blocks of ``I``."""
    p = fn.n_parameters
    hessian = torch.zeros(p, p, dtype=fn.dtype, device=fn.device)
    for x, y in data:
        # the batch's graph, reused by every column block; the columns differentiated at once
        # stay within PRODUCT_VECTOR_BYTES of vector graphs (each about the batch's graph)
        at_once = max(1, PRODUCT_VECTOR_BYTES // max(1, fn.gradient_graph_bytes(x, y)))
        product = fn.hvp_function(x, y, at_once)
        cols = max(1, min(p, 2**16 // max(1, x.shape[0])))
        for start in range(0, p, cols):
            eye = torch.zeros(min(cols, p - start), p, dtype=fn.dtype, device=fn.device)
            eye[:, start : start + eye.shape[0]].fill_diagonal_(1.0)
            hessian[start : start + eye.shape[0]] += product(eye)
    hessian /= n
    check_finite(hessian, "the Hessian of the training loss")
    return symmetrize_(hessian)


def symmetrize_(matrix: Tensor, tile: int = 1024) -> Tensor:
    """``(A + Aᵀ) / 2`` in place, tile by tile (no second ``p × p`` matrix)."""
    p = matrix.shape[0]
    for i in range(0, p, tile):
        for j in range(i, p, tile):
            upper = matrix[i : i + tile, j : j + tile]
            mean = 0.5 * (upper + matrix[j : j + tile, i : i + tile].T)
            upper.copy_(mean)
            matrix[j : j + tile, i : i + tile].copy_(mean.T)
    return matrix


# -- nn.Linear networks: the layers' structure ----------------------------------------------------


@dataclass
class LinearLayer:
    """A trainable ``nn.Linear`` and where its weight and bias sit in the flat parameter vector."""

    module: nn.Linear
    weight: Optional[slice]
    bias: Optional[slice]

    @property
    def n_out(self) -> int:
        return self.module.out_features

    @property
    def n_features(self) -> int:
        """Columns of the layer's parameters: the inputs (weight) and a constant 1 (bias)."""
        return (self.module.in_features if self.weight is not None else 0) + (self.bias is not None)


def linear_layout(fn: ModelFunctions, x: Tensor, y: Tensor) -> Optional[list[LinearLayer]]:
    """The trainable ``nn.Linear`` layers in the order a sample passes them, or ``None`` unless
    every trainable parameter belongs to one, each is called exactly once per sample on a
    ``(1, in_features)`` input, and none overrides ``forward``."""
    named = dict(fn.model.named_parameters())
    flat: dict[int, slice] = {}
    offset = 0
    for name, numel in zip(fn.names, fn.numels):
        flat[id(named[name])] = slice(offset, offset + numel)
        offset += numel
    layers, covered = [], set()
    for module in fn.model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = flat.get(id(module.weight))
        bias = flat.get(id(module.bias)) if module.bias is not None else None
        if weight is None and bias is None:
            continue
        if type(module).forward is not nn.Linear.forward:
            return None
        layers.append(LinearLayer(module, weight, bias))
        own = ((module.weight, weight), (module.bias, bias))
        covered |= {id(t) for t, place in own if place is not None}
    if not layers or covered != set(flat):
        return None
    calls: list[tuple[int, tuple]] = []
    hooks = [
        layer.module.register_forward_hook(
            lambda m, args, out, i=i: calls.append((i, tuple(args[0].shape) if args else ()))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            fn.sample_loss(fn.params(), x[0], y[0])
    except Exception:  # the generic path reports whatever is wrong with the model or data
        return None
    finally:
        for hook in hooks:
            hook.remove()
    order = [i for i, _ in calls]
    if sorted(order) != list(range(len(layers))):
        return None
    if any(shape != (1, layers[i].module.in_features) for i, shape in calls):
        return None
    return [layers[i] for i in order]


def linear_layers_hessian(
    fn: ModelFunctions, data: Batches, n: int, layers: list[LinearLayer]
) -> Tensor:
    """Exact mean Hessian of a network whose trainable parameters all sit in ``layers`` (see
    :func:`linear_layout` and the module's docstring).

    Samples are taken in chunks as large as :data:`CHUNK_BYTES` allows (long matrix products);
    their per-sample derivatives in smaller pieces (each differentiates every layer output)."""
    dtype, device = fn.dtype, fn.device
    itemsize = torch.finfo(dtype).bits // 8
    n_outs = [layer.n_out for layer in layers]
    starts = [sum(n_outs[:i]) for i in range(len(layers))]
    n_total = sum(n_outs)
    inputs = sum(layer.module.in_features for layer in layers)
    perturbed = _Perturbed(fn, layers)
    terms = perturbed.terms()
    eps = torch.zeros(n_total, dtype=dtype, device=device)
    # per sample: the derivatives kept for a chunk, and the largest matrix-product operand
    kept = n_total * (n_total + inputs) + n_total + inputs + len(layers)
    operand = max(
        _operand_size(row, col) for l, row in enumerate(layers) for col in layers[: l + 1]
    )
    chunk = max(1, CHUNK_BYTES // ((kept + operand) * itemsize))
    piece = max(1, CHUNK_BYTES // (3 * n_total * (n_total + inputs) * itemsize))
    hessian = torch.zeros(fn.n_parameters, fn.n_parameters, dtype=dtype, device=device)
    sums: dict[tuple[int, int, int], Tensor] = {}
    x_all, y_all = (torch.cat(t) for t in zip(*data))
    with perturbed.hooks():
        for start in range(0, x_all.shape[0], chunk):
            x, y = x_all[start : start + chunk], y_all[start : start + chunk]
            parts = [
                terms(eps, x[i : i + piece], y[i : i + piece]) for i in range(0, len(x), piece)
            ]
            jac, value = (tuple(torch.cat(t) for t in zip(*side)) for side in zip(*parts))
            _accumulate(sums, hessian, layers, starts, jac, value)
    for l in range(len(layers)):
        for m in range(l + 1):
            if (1, l, m) in sums:
                block = sums.pop((1, l, m)).view(n_outs[l], n_outs[m], -1, layers[m].n_features)
                block = block.permute(0, 2, 1, 3)
                if (2, l, m) in sums:
                    second = sums.pop((2, l, m))
                    second = second.view(-1, n_outs[m], n_outs[l], layers[m].n_features)
                    block = block + second.permute(2, 0, 1, 3)
                _write_block(hessian, block, layers[l], layers[m])
            if l != m:
                _mirror_block(hessian, layers[l], layers[m])
    hessian /= n
    check_finite(hessian, "the Hessian of the training loss")
    return symmetrize_(hessian)


def linear_layers_flops(layers: list[LinearLayer], n: int) -> int:
    """Floating-point operations of the matrix products :func:`linear_layers_hessian` runs for
    ``n`` samples (both terms of every block; the per-sample derivatives come on top)."""
    flops = 0
    for l, row in enumerate(layers):
        for m in range(l + 1):
            col = layers[m]
            flops += 2 * n * row.n_out * col.n_out * row.n_features * col.n_features
            if m < l and row.weight is not None:
                flops += 2 * n * row.n_features * col.n_out * row.n_out * col.n_features
    return flops


class _Perturbed:
    """The network with an output perturbation ``ε`` added to every layer (forward hooks), as a
    per-sample function of ``ε``: its loss and the input each layer saw."""

    def __init__(self, fn: ModelFunctions, layers: list[LinearLayer]):
        self.fn, self.layers = fn, layers
        self.sizes = [layer.n_out for layer in layers]
        self._eps: tuple[Tensor, ...] = ()
        self._inputs: list[Optional[Tensor]] = []

    @contextmanager
    def hooks(self) -> Iterator[None]:
        def hook(i: int):
            def add(module, args, out):
                self._inputs[i] = args[0][0]
                return out + self._eps[i]

            return add

        handles = [
            layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def terms(self):
        """``(eps, x, y) ↦ ((∂δ/∂ε, ∂a_1/∂ε, ∂a_2/∂ε, …), (δ, a_0, a_1, …))`` per sample,
        vectorized over a chunk: ``δ = ∂ℓ/∂ε`` over the outputs of all layers, ``a_l`` the input
        of layer ``l`` (in the order samples pass them)."""
        params = self.fn.params()

        def loss(eps: Tensor, x: Tensor, y: Tensor):
            self._eps = torch.split(eps, self.sizes)
            self._inputs = [None] * len(self.layers)
            value = self.fn.sample_loss(params, x, y)
            return value, list(self._inputs)

        def first_order(eps: Tensor, x: Tensor, y: Tensor):
            delta, inputs = grad(loss, has_aux=True)(eps, x, y)
            # the first layer's input comes before every perturbation: nothing to differentiate
            return (delta, *inputs[1:]), (delta, *inputs)

        # reverse over reverse, as the products with the identity: forward over reverse fails
        # inside some losses' derivatives (F.mse_loss: "ZeroTensors are immutable")
        return vmap(jacrev(first_order, has_aux=True), in_dims=(None, 0, 0))


def _features(layer: LinearLayer, inputs: Tensor) -> Tensor:
    """Per sample, the values the layer's parameters multiply: inputs (weight), 1 (bias)."""
    parts = [inputs] if layer.weight is not None else []
    if layer.bias is not None:
        parts.append(torch.ones(inputs.shape[0], 1, dtype=inputs.dtype, device=inputs.device))
    return torch.cat(parts, dim=1)


def _by_rows(row: LinearLayer, col: LinearLayer) -> bool:
    """Whether block ``(row, col)`` is clearly cheaper one output unit of ``row`` at a time
    (operands ``o_m·f_m`` per unit and sample, ``o_l`` products) than as one product over pairs
    of units (operands ``o_l·o_m + f_l·f_m`` per sample): for wide inputs and few outputs, e.g.
    a linear head."""
    return 2 * row.n_out * col.n_out < row.n_features


def _operand_size(row: LinearLayer, col: LinearLayer) -> int:
    """Numbers per sample of block ``(row, col)``'s largest matrix-product operands."""
    if _by_rows(row, col):
        return 2 * col.n_out * col.n_features
    return (
        row.n_out * col.n_out
        + row.n_features * col.n_features
        + row.n_features * col.n_out
        + row.n_out * col.n_features
    )


def _accumulate(sums: dict, hessian: Tensor, layers: list[LinearLayer], starts, jac, value) -> None:
    """Add one chunk's two terms of every block ``(l, m)``, ``m ≤ l``, as matrix products over
    its samples: ``T_lm ⊗ a_l a_mᵀ`` and, for ``m < l``, ``δ_l ⊗ (∂a_l/∂s_m) ⊗ a_m``. Blocks
    taken by rows go straight into the Hessian; the others into ``sums``, in layouts
    ``(o_l o_m) × (f_l f_m)`` and ``(f_l o_m) × (o_l f_m)``."""
    second, delta = jac[0], value[0]
    b = second.shape[0]
    feats = [_features(layer, value[1 + i]) for i, layer in enumerate(layers)]
    for l, row in enumerate(layers):
        rows = slice(starts[l], starts[l] + row.n_out)
        for m in range(l + 1):
            col = layers[m]
            cols = slice(starts[m], starts[m] + col.n_out)
            # how layer l's inputs move with layer m's outputs; its bias column is constant
            moves = None
            if m < l and row.weight is not None:
                moves = jac[l][:, :, cols]
                if row.bias is not None:
                    moves = torch.cat([moves, moves.new_zeros(b, 1, col.n_out)], dim=1)
            if _by_rows(row, col):
                _add_by_rows(
                    hessian,
                    row,
                    col,
                    second[:, rows, cols],
                    feats[l],
                    feats[m],
                    moves,
                    delta[:, rows],
                )
                continue
            t_lm = second[:, rows, cols].reshape(b, -1)
            outer = (feats[l][:, :, None] * feats[m][:, None, :]).reshape(b, -1)
            _addmm(sums, (1, l, m), t_lm, outer)
            if moves is not None:
                weighted = (delta[:, rows, None] * feats[m][:, None, :]).reshape(b, -1)
                _addmm(sums, (2, l, m), moves.reshape(b, -1), weighted)


def _add_by_rows(
    hessian: Tensor,
    row: LinearLayer,
    col: LinearLayer,
    t_lm: Tensor,
    feats_l: Tensor,
    feats_m: Tensor,
    moves: Optional[Tensor],
    delta_l: Tensor,
) -> None:
    """Block ``(row, col)`` one output unit ``r`` of ``row`` at a time: its rows of the Hessian,
    ``(f_l) × (o_m, f_m)``, are ``F_lᵀ (T[:, r, :] ⊗ F_m)`` plus ``(∂a_l/∂s_m)ᵀ (δ_r F_m)``."""
    b = t_lm.shape[0]
    feats_l, t_lm, feats_m, delta_l = (t.to(ACCUMULATE) for t in (feats_l, t_lm, feats_m, delta_l))
    for r in range(row.n_out):
        unit = feats_l.T @ (t_lm[:, r, :, None] * feats_m[:, None, :]).reshape(b, -1)
        unit = unit.view(row.n_features, col.n_out, col.n_features)
        if moves is not None:
            moved = moves.reshape(b, -1).T.to(ACCUMULATE) @ (delta_l[:, r, None] * feats_m)
            unit += moved.view_as(unit)
        for r_cols, r_flat in _parts(row):
            width = r_cols.stop - r_cols.start  # a unit's rows: its weight row, its bias
            target = slice(r_flat.start + r * width, r_flat.start + (r + 1) * width)
            for c_cols, c_flat in _parts(col):
                hessian[target, c_flat] += unit[r_cols, :, c_cols].reshape(width, -1)


def _addmm(sums: dict, key, left: Tensor, right: Tensor) -> None:
    left, right = left.to(ACCUMULATE), right.to(ACCUMULATE)
    if key in sums:
        sums[key].addmm_(left.T, right)
    else:
        sums[key] = left.T @ right


def _write_block(hessian: Tensor, block: Tensor, row: LinearLayer, col: LinearLayer) -> None:
    """Write a ``(o_l, f_l, o_m, f_m)`` block into the flat Hessian."""
    for r_cols, r_flat in _parts(row):
        for c_cols, c_flat in _parts(col):
            part = block[:, r_cols, :, c_cols]
            hessian[r_flat, c_flat] = part.reshape(r_flat.stop - r_flat.start, -1)


def _mirror_block(hessian: Tensor, row: LinearLayer, col: LinearLayer) -> None:
    """Block ``(col, row)`` of the symmetric Hessian from block ``(row, col)``."""
    for _, r_flat in _parts(row):
        for _, c_flat in _parts(col):
            hessian[c_flat, r_flat] = hessian[r_flat, c_flat].T


def _parts(layer: LinearLayer) -> list[tuple[slice, slice]]:
    """(feature columns, flat range) of the layer's weight and bias."""
    parts = []
    if layer.weight is not None:
        parts.append((slice(0, layer.module.in_features), layer.weight))
    if layer.bias is not None:
        first = layer.module.in_features if layer.weight is not None else 0
        parts.append((slice(first, first + 1), layer.bias))
    return parts


def _agrees_with_products(fn: ModelFunctions, batches: list, n: int, hessian: Tensor) -> bool:
    """``H v`` equals the Hessian-vector product for two seeded random ``v`` (to ``√eps``)."""
    gen = torch.Generator().manual_seed(0)
    probes = torch.randn(2, fn.n_parameters, generator=gen, dtype=torch.float64)
    probes = probes.to(dtype=fn.dtype, device=fn.device)
    products = torch.zeros_like(probes)
    for x, y in batches:
        products += fn.hvp_function(x, y)(probes)
    products /= n
    got = probes @ hessian  # rows; H is symmetric
    scale = products.norm(dim=1).clamp_min(torch.finfo(fn.dtype).tiny)
    tolerance = torch.finfo(fn.dtype).eps ** 0.5
    return bool(((got - products).norm(dim=1) / scale <= tolerance).all())
