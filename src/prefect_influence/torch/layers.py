"""Per-sample gradients of ``nn.Linear`` and ``nn.Conv2d`` layers from their two factors.

For such a layer the gradient of one sample's loss, as an ``out × n_in`` matrix ``[W | b]``, is
``Σ_t g_t a_tᵀ``: the sum over positions ``t`` (conv patches, a Linear layer's extra input
dimensions) of outer products of the output gradient ``g_t`` and the input ``a_t`` (a constant 1
appended for the bias). One forward pass with hooks and one backward pass give every layer's
inputs and output gradients for a whole batch (:func:`capture`); a score
``⟨factor, ∇θℓ(z)⟩`` is then a contraction of those factors layer by layer
(:func:`scores`), and the flat ``p``-vector of a sample's gradient is never formed. Memory per
sample is the layers' inputs and outputs, ``Σ(d_in + d_out)``, instead of ``p``.

The batch must be processed sample by sample independently (a model in ``eval()`` mode): the
output gradient of sample ``i`` is taken from ``∇ ℓ(out_i, y_i)`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from ..errors import UnsupportedLayerError

__all__ = [
    "Layer",
    "LayerTerms",
    "FactorColumns",
    "TensorColumns",
    "find_layers",
    "capture",
    "scores",
    "flat_grads",
]


@dataclass
class Layer:
    """One supported layer and where its trainable parameters sit in the flat vector.

    The layer's gradient is handled as an ``out × n_in`` matrix ``[W | b]``: the weight reshaped
    to ``out × (in/groups·kh·kw)`` (row-major, as in the flat vector), then the bias as a last
    column. Either part is absent when that parameter is frozen. A grouped convolution's rows of
    group ``j`` only see the input channels of group ``j``.
    """

    name: str
    module: nn.Module
    weight: Optional[slice]  # slice of the flat vector holding the weight, if trainable
    bias: Optional[slice]  # slice of the flat vector holding the bias, if trainable
    n_out: int
    n_in: int  # columns of the augmented matrix: in/groups·kh·kw (if weight) + 1 (if bias)
    groups: int = 1

    @property
    def n_weight_cols(self) -> int:
        return self.n_in - (1 if self.bias is not None else 0)

    @property
    def numel(self) -> int:
        return self.n_out * self.n_in

    def indices(self, device: torch.device) -> Tensor:
        """Positions of the layer's entries in the flat parameter vector, in flat order."""
        parts = [
            torch.arange(s.start, s.stop, device=device) for s in (self.weight, self.bias) if s
        ]
        return torch.cat(parts).sort().values

    def input_rows(self, inputs: Tensor) -> Tensor:
        """Layer inputs as ``n × T × (in·kh·kw)`` rows, channel-major like the weight."""
        n = inputs.shape[0]
        if isinstance(self.module, nn.Conv2d):
            m = self.module
            patches = F.unfold(
                inputs, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            )
            return patches.transpose(1, 2)
        return inputs.reshape(n, -1, inputs.shape[-1])

    def grouped_activations(self, inputs: Tensor) -> Tensor:
        """Layer inputs as ``n × T × groups × n_in`` rows (bias column included)."""
        a = self.input_rows(inputs)
        n, t = a.shape[:2]
        a = a.reshape(n, t, self.groups, -1)
        parts = [a] if self.weight is not None else []
        if self.bias is not None:
            parts.append(torch.ones(n, t, self.groups, 1, dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=3)

    def activations(self, inputs: Tensor) -> Tensor:
        """Layer inputs as ``n × T × n_in`` rows (ungrouped layers)."""
        return self.grouped_activations(inputs)[:, :, 0]

    def grouped_output_grads(self, g: Tensor) -> Tensor:
        """Gradient with respect to the layer's output as ``n × T × groups × out/groups``."""
        n = g.shape[0]
        if isinstance(self.module, nn.Conv2d):
            g = g.reshape(n, self.n_out, -1).transpose(1, 2)
        else:
            g = g.reshape(n, -1, self.n_out)
        return g.reshape(*g.shape[:2], self.groups, self.n_out // self.groups)

    def output_grads(self, g: Tensor) -> Tensor:
        """Gradient with respect to the layer's output as ``n × T × out`` (ungrouped layers)."""
        return self.grouped_output_grads(g)[:, :, 0]

    def positions(self, inputs: Tensor, out_grads: Tensor) -> int:
        """``T``: the positions summed over in one sample's gradient."""
        return out_grads[0].numel() // self.n_out

    def weight_and_bias_grads(
        self, inputs: Tensor, out_grads: Tensor
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-sample gradients of the weight (``n × out × in/groups·kh·kw``) and of the bias
        (``n × out``), each ``None`` if frozen: no column of ones is appended to the inputs."""
        g = self.grouped_output_grads(out_grads)  # n × T × groups × out/groups
        n, positions = g.shape[:2]
        dw = db = None
        if self.weight is not None:
            a = self.input_rows(inputs)
            if self.groups == 1:
                dw = torch.bmm(g[:, :, 0].transpose(1, 2), a)
            else:
                a = a.reshape(n, positions, self.groups, -1)
                dw = torch.einsum("ntgo,ntgi->ngoi", g, a).reshape(n, self.n_out, -1)
        if self.bias is not None:
            db = g.sum(dim=1).reshape(n, self.n_out)
        return dw, db

    def sample_grads(self, inputs: Tensor, out_grads: Tensor) -> Tensor:
        """Per-sample gradient matrices ``n × out × n_in`` from raw inputs and output grads."""
        dw, db = self.weight_and_bias_grads(inputs, out_grads)
        if db is None:
            return dw
        if dw is None:
            return db.unsqueeze(2)
        return torch.cat([dw, db.unsqueeze(2)], dim=2)

    def to_matrix(self, flat: Tensor) -> Tensor:
        """Rows of the flat vector (``k × p``) to the layer's ``k × out × n_in`` matrices."""
        k = flat.shape[0]
        parts = []
        if self.weight is not None:
            parts.append(flat[:, self.weight].reshape(k, self.n_out, self.n_weight_cols))
        if self.bias is not None:
            parts.append(flat[:, self.bias].reshape(k, self.n_out, 1))
        return torch.cat(parts, dim=2)

    def from_matrix(self, matrix: Tensor, out: Tensor) -> None:
        """Write ``k × out × n_in`` matrices into the layer's slices of ``out`` (``k × p``)."""
        k = matrix.shape[0]
        if self.weight is not None:
            out[:, self.weight] = matrix[:, :, : self.n_weight_cols].reshape(k, -1)
        if self.bias is not None:
            out[:, self.bias] = matrix[:, :, -1]


@dataclass
class LayerTerms:
    """Every layer's raw inputs and output gradients for a batch of ``n`` samples."""

    inputs: list[Tensor]
    out_grads: list[Tensor]

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, *self.out_grads))

    def __sizeof__(self) -> int:
        # what Dask's memory accounting (``dask.sizeof``, falling back to ``sys.getsizeof``)
        # counts for a train operand held between tasks
        return object.__sizeof__(self) + self.nbytes

    def rows(self, start: int, stop: int) -> "LayerTerms":
        return LayerTerms(
            [t[start:stop] for t in self.inputs], [t[start:stop] for t in self.out_grads]
        )


def find_layers(model: nn.Module, names: list[str], numels: list[int]) -> list[Layer]:
    """Group the trainable parameters (flat-vector order) by layer; refuse unsupported ones
    with :class:`UnsupportedLayerError`."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    offsets = torch.tensor([0, *numels]).cumsum(0).tolist()
    slices: dict[str, dict[str, slice]] = {}
    for k, name in enumerate(names):
        shared = owners[id(params[name])]
        if len(shared) > 1:
            raise UnsupportedLayerError(
                f"Shared (tied) parameters are not supported layer by layer; {shared} are the "
                "same tensor."
            )
        prefix, _, local = name.rpartition(".")
        module = modules[prefix]
        check_supported(prefix, module)
        slices.setdefault(prefix, {})[local] = slice(offsets[k], offsets[k + 1])
    layers = []
    for prefix, parts in slices.items():
        module = modules[prefix]
        weight, bias = parts.get("weight"), parts.get("bias")
        n_out = module.weight.shape[0]
        n_in = (module.weight[0].numel() if weight is not None else 0) + (bias is not None)
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        layers.append(Layer(prefix, module, weight, bias, n_out, n_in, groups))
    return layers


def check_supported(name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``module`` is an ``nn.Linear`` or an
    ``nn.Conv2d`` with zero padding given as numbers."""
    label = (
        f"layer {name!r} ({type(module).__name__})"
        if name
        else f"the model ({type(module).__name__})"
    )
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        problems = []
        if module.padding_mode != "zeros":
            problems.append(f"padding_mode={module.padding_mode!r}")
        if isinstance(module.padding, str):
            problems.append(f"padding={module.padding!r}")
        if problems:
            raise UnsupportedLayerError(
                f"Layer-wise gradients support nn.Conv2d with zero padding given as int or "
                f"tuple; {label} has {', '.join(problems)}."
            )
        return
    raise UnsupportedLayerError(
        f"Layer-wise gradients support nn.Linear and nn.Conv2d; {label} has trainable "
        "parameters. Freeze it (requires_grad_(False)) or use another influence method."
    )


class _Hooks:
    """Forward hooks recording each layer's input and output during one forward pass."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.inputs: list[list[Tensor]] = [[] for _ in layers]
        self.outputs: list[list[Tensor]] = [[] for _ in layers]
        self.handles: list = []

    def __enter__(self) -> "_Hooks":
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.module.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            self.inputs[i].append(args[0].detach())
            self.outputs[i].append(output)
            # a fresh tensor downstream, so in-place ops there leave `output` intact
            return output.clone()

        return hook

    def clear(self) -> None:
        for seen in (*self.inputs, *self.outputs):
            seen.clear()

    def recorded(self) -> tuple[list[Tensor], list[Tensor]]:
        """Each layer's one input and output of the last forward pass; refuses a layer called
        other than once."""
        for layer, seen in zip(self.layers, self.inputs):
            if len(seen) != 1:
                raise UnsupportedLayerError(
                    f"Layer-wise gradients need every layer with trainable parameters to be "
                    f"called exactly once per forward pass; layer {layer.name!r} "
                    f"({type(layer.module).__name__}) was called {len(seen)} times. Freeze it "
                    "or use another influence method."
                )
        return [seen[0] for seen in self.inputs], [seen[0] for seen in self.outputs]

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.clear()


def forward_recorded(
    model: nn.Module, layers: list[Layer], x: Tensor
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``model(x)`` with every layer's input (detached) and output (in the graph)."""
    with _Hooks(layers) as hooks, torch.enable_grad():
        out = model(x)
        inputs, outputs = hooks.recorded()
    return out, inputs, outputs


def output_grads_of(
    out: Tensor, layer_outs: list[Tensor], grad_outputs: Tensor, retain_graph: bool = False
) -> list[Tensor]:
    """Gradients of ``⟨out, grad_outputs⟩`` with respect to each layer's output."""
    grads = torch.autograd.grad(
        out, layer_outs, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(o) if g is None else g for o, g in zip(layer_outs, grads)]


def capture(
    model: nn.Module,
    layers: list[Layer],
    loss: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
) -> LayerTerms:
    """Every layer's inputs and per-sample output gradients of ``loss(model(x_i), y_i)``."""
    out, inputs, outputs = forward_recorded(model, layers, x)
    if not isinstance(out, Tensor):
        raise UnsupportedLayerError(
            f"Layer-wise gradients need a model returning one tensor, got {type(out).__name__}."
        )

    def one(o: Tensor, t: Tensor) -> Tensor:
        return loss(o.unsqueeze(0), t.unsqueeze(0))

    d_out = vmap(grad(one))(out.detach(), y)
    grads = output_grads_of(out, outputs, d_out)
    return LayerTerms(inputs, [g.detach() for g in grads])


class FactorColumns(Protocol):
    """Test factors (``n_rows × p``) read by row ranges and column ranges, so a score never needs
    all of them in memory at once: a tensor (:class:`TensorColumns`) or stored chunks."""

    n_rows: int

    def row_tiles(self, max_rows: int) -> list[tuple[int, int]]:
        """Consecutive ``(start, stop)`` row ranges covering every row, each of at most
        ``max_rows`` rows (possibly fewer, e.g. to align with stored chunks)."""
        ...

    def read(self, rows: tuple[int, int], cols: slice) -> Tensor:
        """Rows ``rows`` and columns ``cols`` as a ``rows × cols`` tensor."""
        ...


class TensorColumns:
    """:class:`FactorColumns` of a tensor in memory (reads are views)."""

    def __init__(self, factors: Tensor):
        self.factors = factors
        self.n_rows = int(factors.shape[0])

    def row_tiles(self, max_rows: int) -> list[tuple[int, int]]:
        step = max(1, int(max_rows))
        return [(s, min(s + step, self.n_rows)) for s in range(0, self.n_rows, step)]

    def read(self, rows: tuple[int, int], cols: slice) -> Tensor:
        return self.factors[rows[0] : rows[1], cols]


def scores(
    layers: list[Layer],
    factors: Union[Tensor, FactorColumns],
    terms: LayerTerms,
    budget: int,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``factors @ grads.T`` (``k × n``) with ``grads`` the batch's flat per-sample gradients,
    contracted layer by layer from ``terms``; temporaries stay within about ``budget`` bytes.

    ``factors`` may be a :class:`FactorColumns` (e.g. stored factors): each layer then reads the
    factors' columns it needs in row tiles, and a train sample's gradient blocks are formed once
    for all rows, so many rows cost one pass over the batch."""
    source = TensorColumns(factors) if isinstance(factors, Tensor) else factors
    ref = terms.out_grads[0]
    k, n = source.n_rows, terms.n
    result = torch.zeros(k, n, dtype=ref.dtype, device=ref.device) if out is None else out
    for layer, inputs, out_grads in zip(layers, terms.inputs, terms.out_grads):
        add_layer_scores(layer, source, layer.weight, layer.bias, inputs, out_grads, budget, result)
    return result


def add_layer_scores(
    layer: Layer,
    source: FactorColumns,
    weight_cols: Optional[slice],
    bias_cols: Optional[slice],
    inputs: Tensor,
    out_grads: Tensor,
    budget: int,
    result: Tensor,
) -> None:
    """Add one layer's ``⟨F_k, ∇ℓ_n⟩`` to ``result`` (``k × n``), for factors whose weight part
    (``out·n_w`` columns, row-major like the weight) and bias part (``out`` columns) are the
    columns ``weight_cols`` and ``bias_cols`` of ``source``."""
    k, n = result.shape
    itemsize = result.element_size()
    part = max(1, int(budget) // 3)  # a third each: train temporaries, gradient block, factor tile
    positions = layer.positions(inputs, out_grads)
    if positions == 1 and layer.groups == 1 and k < layer.n_in:
        _add_one_position_scores(
            layer, source, weight_cols, bias_cols, inputs, out_grads, part, result
        )
        return
    per_sample = positions * (layer.n_in * layer.groups + layer.n_out)
    if layer.groups > 1:
        per_sample += layer.numel  # grouped gradients are formed whole, then cut
    step = _rows(part, per_sample * itemsize)
    for s in range(0, n, step):
        train = slice(s, s + step)
        blocks = _gradient_blocks(
            layer, weight_cols, bias_cols, inputs[train], out_grads[train], part
        )
        for cols, grads in blocks:
            for r0, r1 in source.row_tiles(_rows(part, grads.shape[1] * itemsize)):
                result[r0:r1, train].addmm_(source.read((r0, r1), cols), grads.T)


def _add_one_position_scores(
    layer: Layer,
    source: FactorColumns,
    weight_cols: Optional[slice],
    bias_cols: Optional[slice],
    inputs: Tensor,
    out_grads: Tensor,
    part: int,
    result: Tensor,
) -> None:
    """One position per sample: ``⟨F, g aᵀ⟩ = gᵀ (F_w a + F_b)``, without gradient matrices."""
    n = result.shape[1]
    itemsize = result.element_size()
    for r0, r1 in source.row_tiles(_rows(part, layer.numel * itemsize)):
        k = r1 - r0
        fw = None if weight_cols is None else source.read((r0, r1), weight_cols)
        fb = None if bias_cols is None else source.read((r0, r1), bias_cols)
        fw_rows = None if fw is None else fw.reshape(k * layer.n_out, -1)
        step = _rows(part, k * layer.n_out * itemsize)
        for s in range(0, n, step):
            g = layer.output_grads(out_grads[s : s + step])[:, 0]
            if fw_rows is None:
                fa = fb.reshape(1, k, layer.n_out).expand(g.shape[0], k, layer.n_out)
            else:
                a = layer.input_rows(inputs[s : s + step])[:, 0]
                fa = (a @ fw_rows.T).reshape(-1, k, layer.n_out)
                if fb is not None:
                    fa = fa + fb.reshape(1, k, layer.n_out)
            result[r0:r1, s : s + step] += torch.bmm(fa, g.unsqueeze(2))[:, :, 0].T


def _gradient_blocks(
    layer: Layer,
    weight_cols: Optional[slice],
    bias_cols: Optional[slice],
    inputs: Tensor,
    out_grads: Tensor,
    part: int,
) -> Iterator[tuple[slice, Tensor]]:
    """The batch's per-sample gradients in blocks of at most about ``part`` bytes: rows of the
    weight (contiguous columns of the flat vector), then the bias; ``(columns, m × width)``."""
    g = layer.grouped_output_grads(out_grads)  # m × T × groups × out/groups
    m = g.shape[0]
    if weight_cols is not None:
        n_w = layer.n_weight_cols
        rows = _rows(part, m * n_w * g.element_size())
        if layer.groups == 1:
            a, g0, dw = layer.input_rows(inputs), g[:, :, 0], None
        else:
            dw, _ = layer.weight_and_bias_grads(inputs, out_grads)
        for o in range(0, layer.n_out, rows):
            o1 = min(o + rows, layer.n_out)
            block = torch.bmm(g0[:, :, o:o1].transpose(1, 2), a) if dw is None else dw[:, o:o1]
            cols = slice(weight_cols.start + o * n_w, weight_cols.start + o1 * n_w)
            yield cols, block.reshape(m, -1)
    if bias_cols is not None:
        yield bias_cols, g.sum(dim=1).reshape(m, layer.n_out)


def flat_grads(layers: list[Layer], terms: LayerTerms, n_parameters: int) -> Tensor:
    """The batch's flat per-sample gradients (``n × p``) assembled from ``terms``."""
    ref = terms.out_grads[0]
    flat = torch.zeros(terms.n, n_parameters, dtype=ref.dtype, device=ref.device)
    for layer, inputs, out_grads in zip(layers, terms.inputs, terms.out_grads):
        layer.from_matrix(layer.sample_grads(inputs, out_grads), flat)
    return flat


def _rows(budget: int, bytes_per_row: int) -> int:
    return max(1, int(budget) // max(1, bytes_per_row))
