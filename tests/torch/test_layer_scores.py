"""Layer-wise scores (from layer inputs and output gradients) against flat per-sample gradients,
EK-FAC's layer-wise paths against its flat solve, and the sampled Fisher against the exact one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prefect_influence.blocks import train_operand
from prefect_influence.errors import InvalidParameterError, UnsupportedLayerError
from prefect_influence.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    NystroemSketchInfluence,
)
from prefect_influence.torch.functional import ModelFunctions
from prefect_influence.torch.layers import (
    TensorColumns,
    capture,
    find_layers,
    flat_grads,
    scores,
)

DTYPE = torch.float64
#: float64 contractions of a few thousand terms in another order: rounding is ~1e-15 relative
TIGHT = dict(rtol=1e-11, atol=1e-12)


def conv_net(conv: nn.Conv2d, flat: int) -> nn.Module:
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)).to(DTYPE).eval()


CONVS = {
    "plain": (nn.Conv2d(2, 4, 3), 4 * 4 * 4),
    "stride-padding": (nn.Conv2d(2, 4, 3, stride=2, padding=1), 4 * 3 * 3),
    "rectangular-dilated": (nn.Conv2d(2, 3, (3, 2), padding=(2, 1), dilation=(2, 1)), 3 * 6 * 7),
    "groups": (nn.Conv2d(4, 6, 3, groups=2, padding=1), 6 * 6 * 6),
    "depthwise-no-bias": (nn.Conv2d(4, 4, 3, groups=4, bias=False), 4 * 4 * 4),
    "no-bias": (nn.Conv2d(2, 4, 1, bias=False), 4 * 6 * 6),
}


def check_against_flat(net: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: int) -> None:
    fn = ModelFunctions(net, F.cross_entropy)
    layers = find_layers(net, fn.names, fn.numels)
    terms = capture(net, layers, F.cross_entropy, x, y)
    reference = fn.per_sample_grads(x, y)
    torch.testing.assert_close(flat_grads(layers, terms, fn.n_parameters), reference, **TIGHT)
    factors = torch.randn(5, fn.n_parameters, generator=torch.Generator().manual_seed(1)).to(DTYPE)
    got = scores(layers, factors, terms, budget)
    torch.testing.assert_close(got, factors @ reference.T, **TIGHT)
    # the same factors read in tiles (as stored factors are): rows in pieces of at most two,
    # columns only within the flat vector, and equal scores
    source = PiecewiseFactors(factors)
    torch.testing.assert_close(scores(layers, source, terms, budget), got, **TIGHT)
    assert source.reads and all(0 <= c.start < c.stop <= fn.n_parameters for c in source.reads)


class PiecewiseFactors(TensorColumns):
    """Factors handed out in row tiles of at most two rows, each read copied and recorded."""

    def __init__(self, factors: torch.Tensor):
        super().__init__(factors)
        self.reads: list[slice] = []

    def row_tiles(self, max_rows: int) -> list[tuple[int, int]]:
        return super().row_tiles(min(max_rows, 2))

    def read(self, rows: tuple[int, int], cols: slice) -> torch.Tensor:
        assert rows[1] - rows[0] <= 2
        self.reads.append(cols)
        return super().read(rows, cols).clone()


@pytest.mark.parametrize("budget", [1, 2**24], ids=["one-row-chunks", "one-chunk"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_scores_equal_full_gradient_scores(name, budget):
    torch.manual_seed(0)
    conv, flat = CONVS[name]
    net = conv_net(conv, flat)
    x = torch.randn(7, conv.in_channels, 6, 6, dtype=DTYPE)
    y = torch.randint(0, 3, (7,))
    check_against_flat(net, x, y, budget)


@pytest.mark.parametrize("budget", [1, 2**24], ids=["one-row-chunks", "one-chunk"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_scores_equal_full_gradient_scores(bias, budget):
    torch.manual_seed(0)
    # a wide layer (the factored ⟨F, g aᵀ⟩ = gᵀFa path: fewer factors than inputs) and a narrow
    # one (formed gradient matrices), with a frozen layer in between
    net = nn.Sequential(
        nn.Linear(12, 5, bias=bias), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DTYPE)
    net[2].requires_grad_(False)
    x, y = torch.randn(9, 12, dtype=DTYPE), torch.randint(0, 3, (9,))
    check_against_flat(net.eval(), x, y, budget)


def test_linear_over_extra_dimensions_sums_the_positions():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # x: n × 5 tokens × 4
            return self.head(torch.tanh(self.proj(x)).mean(dim=1))

    torch.manual_seed(0)
    net = Tokens().to(DTYPE).eval()
    x, y = torch.randn(6, 5, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    check_against_flat(net, x, y, 2**20)


def test_unsupported_layers_are_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DTYPE)
    fn = ModelFunctions(net, F.cross_entropy)
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(LayerNorm\)"):
        find_layers(net, fn.names, fn.numels)


# -- EK-FAC's layer-wise paths --------------------------------------------------------------------
def cnn(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(DTYPE)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3, 8, 8, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (48,), generator=gen)
    return net.eval(), x, y


@pytest.mark.parametrize("fisher", ["exact", "sampled"])
@pytest.mark.parametrize("budget", [1, 256 * 2**20], ids=["one-row-chunks", "default"])
def test_ekfac_layerwise_paths_equal_the_flat_solve(fisher, budget):
    net, x, y = cnn()
    model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-2, fisher=fisher)
    model.fit([(x[:24], y[:24]), (x[24:], y[24:])])
    model.memory_budget_bytes = budget
    grads = ModelFunctions(net, F.cross_entropy).per_sample_grads(x, y)
    flat = model.factors_from_grads(grads)  # the solve on flat gradients
    torch.testing.assert_close(model.influence_factors(x, y), flat, **TIGHT)
    torch.testing.assert_close(model.influences_from_factors(flat[:5], x, y), flat[:5] @ grads.T)
    # scored without flat factors (the Linear layers in the eigenbasis)
    torch.testing.assert_close(model.influences(x[:5], y[:5], x, y), flat[:5] @ grads.T)
    torch.testing.assert_close(model.influences(x[:5], y[:5]), flat[:5] @ grads[:5].T)
    torch.testing.assert_close(model.self_influences(x, y), (flat * grads).sum(dim=1), **TIGHT)
    terms = model.layer_terms(x, y)
    assert terms.nbytes < grads.nbytes  # fewer numbers per sample than p
    torch.testing.assert_close(model.influences_from_terms(flat[:5], terms), flat[:5] @ grads.T)
    torch.testing.assert_close(model.self_influences_from_terms(terms), (flat * grads).sum(1))


# -- every method's layer-wise scores -------------------------------------------------------------
METHODS = {
    "direct": lambda net: DirectInfluence(net, F.cross_entropy, 0.1),
    "cg": lambda net: CgInfluence(net, F.cross_entropy, 0.1, rtol=1e-12, atol=0.0, maxiter=500),
    "arnoldi": lambda net: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=8),
    "nystroem": lambda net: NystroemSketchInfluence(net, F.cross_entropy, 0.1, rank=8),
    "datainf": lambda net: InverseHarmonicMeanInfluence(net, F.cross_entropy, 0.1),
}


@pytest.mark.parametrize("budget", [1, 256 * 2**20], ids=["one-row-chunks", "default"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_scores_layer_by_layer_as_from_gradients(name, budget):
    """Any method's factors score against a batch's layer terms (no per-sample gradients) as
    against its gradients, and its self-influences follow from the terms; float64, so the
    sums in another order agree to rounding."""
    net, x, y = cnn()
    model = METHODS[name](net).fit([(x, y)])
    model.memory_budget_bytes = budget
    assert model.scores_layer_by_layer
    factors = model.influence_factors(x[:5], y[:5])
    terms = model.layer_terms(x, y)
    want = model.influences_from_factors(factors, x, y)
    torch.testing.assert_close(model.influences_from_terms(factors, terms), want, **TIGHT)
    tiles = TensorColumns(factors)  # as the pipeline hands stored factors, in tiles
    torch.testing.assert_close(model.influences_from_terms(tiles, terms), want, **TIGHT)
    self_want = model.self_influences(x, y)
    # CG solves the assembled gradients, which differ from vmap's in the last bits
    tol = dict(rtol=1e-9, atol=1e-12) if name == "cg" else TIGHT
    torch.testing.assert_close(model.self_influences_from_terms(terms), self_want, **tol)


def test_models_of_other_layers_form_gradients_instead():
    """A trainable layer of another kind, or a layer called twice per forward pass, cannot be
    scored layer by layer: the model says so, ``layer_terms`` names the layer, and a train
    operand asked for layer terms holds gradients instead."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 2, (6,))
    norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DTYPE).eval()
    model = DirectInfluence(norm, F.cross_entropy, 0.1).fit([(x, y)])
    assert not model.scores_layer_by_layer
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(LayerNorm\)"):
        model.layer_terms(x, y)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.shared(self.shared(x).tanh()))

    model = DirectInfluence(Twice().to(DTYPE).eval(), F.cross_entropy, 0.1).fit([(x, y)])
    assert model.scores_layer_by_layer  # known only once a forward pass calls the layer twice
    operand = train_operand(model, x, y, "up", by_layer=True)
    assert operand.terms is None
    torch.testing.assert_close(operand.grads, model.per_sample_grads(x, y), **TIGHT)
    assert not model.scores_layer_by_layer
    with pytest.raises(UnsupportedLayerError, match="'shared' .* called 2 times"):
        model.layer_terms(x, y)


# -- sampled Fisher -------------------------------------------------------------------------------
def fitted(net, x, y, **options) -> EkfacInfluence:
    model = EkfacInfluence(net, update_diagonal=False, hessian_regularization=1e-2, **options)
    return model.fit([(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sampled_fisher_converges_to_the_exact_expectation():
    """K-FAC's output-gradient factor from sampled labels is an unbiased estimate of the exact
    one: the error of its approximate inverse falls as labels per sample grow (as ~1/√m)."""
    net, x, y = cnn(seed=3)
    exact = fitted(net, x, y).influences(x[:8], y[:8], x, y)
    errors = {
        m: relative(
            fitted(net, x, y, fisher="sampled", fisher_samples=m).influences(x[:8], y[:8], x, y),
            exact,
        )
        for m in (1, 16, 256)
    }
    # measured: {1: 0.13, 16: 0.009, 256: 0.004} (seeded); 16× more labels must at least halve it
    assert errors[16] < errors[1] / 2 and errors[256] < errors[16] / 2, errors
    assert errors[256] < 0.02, errors


def test_sampled_fisher_is_seeded():
    net, x, y = cnn(seed=4)
    one = fitted(net, x, y, fisher="sampled", seed=7).fitted_state()
    again = fitted(net, x, y, fisher="sampled", seed=7).fitted_state()
    other = fitted(net, x, y, fisher="sampled", seed=8).fitted_state()
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["layer0.lambda"], other["layer0.lambda"])


def test_sampled_mse_fisher_converges_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE).eval()
    x = torch.randn(64, 3, dtype=DTYPE)
    y = torch.randn(64, 2, dtype=DTYPE)
    exact = fitted(net, x, y, loss=F.mse_loss).influences(x[:8], y[:8], x, y)
    rough = fitted(net, x, y, loss=F.mse_loss, fisher="sampled", fisher_samples=4)
    fine = fitted(net, x, y, loss=F.mse_loss, fisher="sampled", fisher_samples=1024)
    assert relative(fine.influences(x[:8], y[:8], x, y), exact) < 0.05
    assert relative(fine.influences(x[:8], y[:8], x, y), exact) < relative(
        rough.influences(x[:8], y[:8], x, y), exact
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fisher": "monte-carlo"}, "fisher must be one of"),
        ({"fisher_samples": 0}, "fisher_samples must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_fisher_options_are_refused(options, message):
    net, _, _ = cnn()
    with pytest.raises(InvalidParameterError, match=message):
        EkfacInfluence(net, **options)


@pytest.mark.parametrize("update_diagonal", [False, True], ids=["K-FAC", "EK-FAC"])
def test_a_fit_in_chunks_of_its_batches_equals_one_in_whole_batches(update_diagonal):
    """A loader batch larger than the memory budget allows is fitted chunk by chunk: the
    Kronecker factors and corrected eigenvalues are sums over samples, so only rounding
    differs."""
    net, x, y = cnn(seed=5)
    whole = EkfacInfluence(net, update_diagonal=update_diagonal, hessian_regularization=1e-2)
    chunked = EkfacInfluence(net, update_diagonal=update_diagonal, hessian_regularization=1e-2)
    chunked.memory_budget_bytes = 1  # one sample a chunk
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    whole.fit(batches)
    chunked.fit(batches)
    # eigenvectors amplify rounding by 1/gap (measured 4e-11 relative here), so the invariant
    # quantity is compared: the influences
    torch.testing.assert_close(
        chunked.influences(x[:5], y[:5], x, y),
        whole.influences(x[:5], y[:5], x, y),
        rtol=1e-9,
        atol=1e-9 * float(whole.influences(x[:5], y[:5], x, y).abs().max()),
    )
