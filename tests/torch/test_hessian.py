"""The structured Hessian of nn.Linear networks equals the one from products with the identity
(float64, to round-off), and every model it does not fit falls back to those products."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from prefect_influence.torch.functional import ModelFunctions
from prefect_influence.torch.hessian import (
    _by_rows,
    dense_hessian,
    exact_hessian,
    linear_layers_hessian,
    linear_layout,
    symmetrize_,
)


def sum_squared_error(out, target):
    return ((out - target) ** 2).sum()


class TiedWeights(nn.Module):
    """A layer's weight also used outside the layer: not the structure the fast path assumes."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) @ self.inner.weight)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


STRUCTURED = {
    "mlp": lambda: nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)),
    "deep, no bias in the middle": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5, bias=False), nn.Softplus(), nn.Linear(5, 3)
    ),
    "no bias": lambda: nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)),
    # few outputs on many inputs: blocks taken one output unit at a time (with and without the
    # second term, which couples a layer to an earlier one)
    "wide head": lambda: nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 3)),
    "narrow, then wide": lambda: nn.Sequential(
        nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 30), nn.Tanh(), nn.Linear(30, 3, bias=False)
    ),
}
FALLBACK = {
    "conv": lambda: nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(6, 3)),
    "a layer called twice": Twice,
    "tied weights": TiedWeights,
}


def data(net, n=30, regression=False):
    gen = torch.Generator().manual_seed(0)
    shape = (
        (n, 1, 4) if isinstance(net, nn.Sequential) and isinstance(net[0], nn.Conv1d) else (n, 4)
    )
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if regression:
        return x, torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def batches(x, y):
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # two unequal batches: the sum is per sample


@pytest.mark.parametrize("loss", [F.cross_entropy, F.mse_loss, sum_squared_error])
@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_hessian_equals_products_with_the_identity(name, loss):
    torch.manual_seed(0)
    net = STRUCTURED[name]().double().eval()
    x, y = data(net, regression=loss is not F.cross_entropy)
    fn = ModelFunctions(net, loss)
    layers = linear_layout(fn, x, y)
    assert layers is not None
    if name in ("wide head", "narrow, then wide"):
        assert _by_rows(layers[-1], layers[-1]) and _by_rows(layers[-1], layers[0]) == (
            name != "wide head"
        )
    structured = linear_layers_hessian(fn, batches(x, y), len(x), layers)
    reference = dense_hessian(fn, batches(x, y), len(x))
    torch.testing.assert_close(structured, reference, rtol=1e-10, atol=1e-12)
    assert torch.equal(structured, structured.T)


def test_frozen_parameters_leave_their_rows_out():
    torch.manual_seed(0)
    net = STRUCTURED["deep, no bias in the middle"]().double().eval()
    net[0].bias.requires_grad_(False)
    net[2].weight.requires_grad_(False)  # a layer without any trainable parameter
    x, y = data(net)
    fn = ModelFunctions(net, F.cross_entropy)
    assert linear_layout(fn, x, y) is not None
    got = exact_hessian(fn, batches(x, y), len(x))
    assert got.shape == (fn.n_parameters, fn.n_parameters)
    torch.testing.assert_close(
        got, dense_hessian(fn, batches(x, y), len(x)), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", list(FALLBACK))
def test_other_models_get_products_with_the_identity(name):
    torch.manual_seed(0)
    net = FALLBACK[name]().double().eval()
    x, y = data(net)
    fn = ModelFunctions(net, F.cross_entropy)
    # the tied model has the structure's shape: only the check against products finds it out
    assert (linear_layout(fn, x, y) is None) == (name != "tied weights")
    reference = dense_hessian(fn, batches(x, y), len(x))
    assert torch.equal(exact_hessian(fn, batches(x, y), len(x)), reference)


def test_symmetrize_in_tiles():
    a = torch.randn(7, 7, dtype=torch.float64)
    expected = 0.5 * (a + a.T)
    torch.testing.assert_close(symmetrize_(a.clone(), tile=3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "narrow, then wide"])
def test_chunks_of_samples_do_not_change_the_result(name, monkeypatch):
    from prefect_influence.torch import hessian as module

    torch.manual_seed(0)
    net = STRUCTURED[name]().double().eval()
    x, y = data(net)
    fn = ModelFunctions(net, F.cross_entropy)
    whole = linear_layers_hessian(fn, batches(x, y), len(x), linear_layout(fn, x, y))
    monkeypatch.setattr(module, "CHUNK_BYTES", 4096)  # chunks and pieces of a few samples
    chunked = linear_layers_hessian(fn, batches(x, y), len(x), linear_layout(fn, x, y))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
