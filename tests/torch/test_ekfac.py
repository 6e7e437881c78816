"""EkfacInfluence against exact Hessians: exact cases, correlation on small nets, errors, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from prefect_influence.errors import (
    InvalidParameterError,
    InvalidRegularizationError,
    NotFittedError,
    NotImplementedLayerRepresentationException,
)
from prefect_influence.torch import DirectInfluence, EkfacInfluence
from prefect_influence.torch.ekfac import UnsupportedLayerError

DTYPE = torch.float64


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def linear_regression(n=40, d_in=3, d_out=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
    w = torch.randn(d_in, d_out, generator=gen, dtype=DTYPE)
    y = x @ w + 0.1 * torch.randn(n, d_out, generator=gen, dtype=DTYPE)
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).to(DTYPE).eval()
    return model, x, y


def train(model, x, y, loss, steps, lr=0.02):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model.eval()


def classification_data(n, shape, n_classes, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=DTYPE)
    w = torch.randn(x[0].numel(), n_classes, generator=gen, dtype=DTYPE)
    y = x.reshape(n, -1) @ w + noise * torch.randn(n, n_classes, generator=gen, dtype=DTYPE)
    return x, y.argmax(1)


def mlp_classifier(seed=0, activation=nn.Tanh):
    x, y = classification_data(220, (2,), 3, noise=0.5, seed=seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), activation(), nn.Linear(8, 3)).to(DTYPE)
    train(net, x[:200], y[:200], F.cross_entropy, steps=300)
    return net, x[:200], y[:200], x[200:], y[200:]


# -- exact cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("update_diagonal", [False, True], ids=["K-FAC", "EK-FAC"])
@pytest.mark.parametrize("d_out", [1, 2])
@pytest.mark.parametrize(
    "loss", [F.mse_loss, nn.MSELoss(reduction="sum")], ids=["F.mse_loss", "MSELoss(sum)"]
)
def test_linear_regression_is_exact(d_out, loss, update_diagonal):
    # H = (2/d)·I ⊗ A (or 2·I ⊗ A for a sum) is itself a Kronecker product: G = (2/d)·I, so the
    # K-FAC eigenvalues (2/d)·λ_A,j are already H's and EK-FAC's diagonal in Q_G ⊗ Q_A equals them.
    model, x, y = linear_regression(d_out=d_out)
    ekfac = EkfacInfluence(model, update_diagonal, loss=loss, regularization=0.0).fit(
        batches(x, y, 16)
    )
    direct = DirectInfluence(model, loss, regularization=0.0).fit(batches(x, y, 40))
    expected = direct.influences(x[:7], y[:7], x, y)
    torch.testing.assert_close(ekfac.influences(x[:7], y[:7], x, y), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        ekfac.influence_factors(x, y), direct.influence_factors(x, y), rtol=1e-6, atol=1e-12
    )


def test_explicit_mse_loss_type_measures_the_scale():
    model, x, y = linear_regression(d_out=2)
    custom = EkfacInfluence(
        model, lambda out, t: 3.0 * ((out - t) ** 2).sum(), 0.0, loss_type="mse"
    ).fit(batches(x, y, 40))
    direct = DirectInfluence(model, lambda out, t: 3.0 * ((out - t) ** 2).sum(), 0.0).fit(
        batches(x, y, 40)
    )
    torch.testing.assert_close(
        custom.influences(x[:5], y[:5], x, y),
        direct.influences(x[:5], y[:5], x, y),
        rtol=1e-6,
        atol=0,
    )


def test_corrected_eigenvalues_are_the_exact_diagonal_in_the_kronecker_basis():
    # Softmax regression: the Hessian equals the Gauss-Newton matrix, and EK-FAC's eigenvalues
    # must be its exact diagonal in the basis Q_G ⊗ Q_A (George et al. 2018, eq. for Λ*).
    x, y = classification_data(60, (4,), 3, noise=1.0, seed=3)
    torch.manual_seed(3)
    model = nn.Linear(4, 3).to(DTYPE).eval()
    ekfac = EkfacInfluence(model, update_diagonal=True, hessian_regularization=1e-3).fit(
        batches(x, y, 25)
    )

    def mean_loss(flat):
        w, b = flat[:12].reshape(3, 4), flat[12:]
        return F.cross_entropy(x @ w.T + b, y)

    flat_params = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    hessian = torch.autograd.functional.hessian(mean_loss, flat_params)
    state = ekfac.fitted_state()
    qa, qg, lam = state["layer0.QA"], state["layer0.QG"], state["layer0.lambda"]
    n_out, n_in = lam.shape  # n_in = 4 inputs + 1 bias column
    # basis vector (i, j) is the matrix qg[:, i] qa[:, j]ᵀ = [W | b], laid out as weight then bias
    basis = torch.einsum("oi,aj->ijoa", qg, qa).reshape(n_out * n_in, n_out, n_in)
    flat = torch.cat([basis[:, :, :-1].reshape(len(basis), -1), basis[:, :, -1]], dim=1)
    projected = torch.einsum("kp,pq,kq->k", flat, hessian, flat).reshape(n_out, n_in)
    torch.testing.assert_close(lam, projected, rtol=1e-9, atol=1e-12)
    # and the solve is the inverse of Σ_k (λ_k + reg) b_k b_kᵀ
    approx = flat.T @ torch.diag(lam.reshape(-1) + 1e-3) @ flat
    eye = torch.eye(len(flat), dtype=DTYPE)
    torch.testing.assert_close(ekfac._solve(approx), eye, rtol=0, atol=1e-8)


def gauss_newton(model, x):
    """Exact mean Gauss-Newton matrix of cross-entropy, from per-sample Jacobians."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def logits(theta, xi):
        pieces = torch.split(theta, sizes)
        new = {n: t.reshape(params[n].shape) for n, t in zip(names, pieces)}
        return functional_call(model, new, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(flat, x)  # n × C × p
    prob = torch.softmax(model(x), dim=1).detach()
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(x)


def kronecker_basis(model, layer_index, qa, qg):
    """The flat vectors of the matrices qg[:, i] qa[:, j]ᵀ = [W | b] of one layer (rows)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in named))
    layer = layers[layer_index]
    mats = torch.einsum("oi,aj->ijoa", qg, qa).reshape(-1, qg.shape[0], qa.shape[0])
    has_bias = any(n == f"{layer}.bias" for n, _ in named)
    rows = []
    for n, p in named:
        if n.rpartition(".")[0] != layer:
            rows.append(torch.zeros(len(mats), p.numel(), dtype=DTYPE))
        elif n.endswith(".bias"):
            rows.append(mats[:, :, -1])
        else:
            w = mats[:, :, :-1] if has_bias else mats
            rows.append(w.reshape(len(mats), -1))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("variant", ["cnn", "dilated, no bias, bias-only Linear"])
def test_corrected_eigenvalues_are_the_gauss_newton_diagonal(variant):
    if variant == "cnn":
        net, x, y, _, _ = cnn_setup()
    else:
        x, y = classification_data(50, (2, 7, 7), 3, noise=0.5, seed=0)
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 3, 3, dilation=2, padding=(1, 2), bias=False)
        net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(105, 3)).to(DTYPE).eval()
        net[3].weight.requires_grad_(False)
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-1).fit(
        batches(x, y, 20)
    )
    ggn = gauss_newton(net, x)
    state = ekfac.fitted_state()
    for i in range(2):
        qa, qg, lam = state[f"layer{i}.QA"], state[f"layer{i}.QG"], state[f"layer{i}.lambda"]
        basis = kronecker_basis(net, i, qa, qg)
        projected = torch.einsum("kp,pq,kq->k", basis, ggn, basis).reshape(lam.shape)
        torch.testing.assert_close(lam, projected, rtol=1e-9, atol=1e-14)


# -- approximation quality on small nets -----------------------------------------------------------
def test_mlp_classifier_correlates_with_direct():
    # Measured (seeds 0-4, out-of-sample test points): Pearson 0.93-0.96 at λ = 0.1, 0.80-0.90
    # at λ = 0.01 and 0.3-0.7 at λ = 0.001: the block-diagonal, Kronecker and Gauss-Newton
    # approximations differ from the exact Hessian most in its small eigenvalues.
    net, x, y, x_test, y_test = mlp_classifier(seed=0)
    for reg, threshold in ((1e-1, 0.9), (1e-2, 0.7)):
        ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=reg).fit(
            batches(x, y, 64)
        )
        direct = DirectInfluence(net, F.cross_entropy, reg).fit(batches(x, y, 200))
        approx = ekfac.influences(x_test, y_test, x, y)
        exact = direct.influences(x_test, y_test, x, y)
        assert approx.shape == exact.shape == (20, 200)
        assert pearson(approx, exact) >= threshold, (reg, pearson(approx, exact))


def cnn_setup():
    x, y = classification_data(120, (1, 6, 6), 3, noise=0.5, seed=1)
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=(1, 1)),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).to(DTYPE)
    net.eval()  # BatchNorm uses (and keeps) its running statistics
    net[1].requires_grad_(False)
    train(net, x[:100], y[:100], F.cross_entropy, steps=200)
    return net, x[:100], y[:100], x[100:], y[100:]


def test_cnn_runs_and_correlates_with_direct():
    net, x, y, x_test, y_test = cnn_setup()
    reg = 1e-1
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=reg).fit(
        batches(x, y, 32)
    )
    direct = DirectInfluence(net, F.cross_entropy, reg).fit(batches(x, y, 100))
    assert ekfac.n_parameters == 4 * 9 + 4 + 36 * 3 + 3
    factors = ekfac.influence_factors(x_test, y_test)
    assert factors.shape == (20, ekfac.n_parameters)
    approx = ekfac.influences(x_test, y_test, x, y)
    assert approx.shape == (20, 100)
    exact = direct.influences(x_test, y_test, x, y)
    # measured: 0.98 (0.90 at λ = 0.01)
    assert pearson(approx, exact) >= 0.9, pearson(approx, exact)


def test_perturbation_mode():
    net, x, y, x_test, y_test = cnn_setup()
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-1).fit(
        batches(x, y, 50)
    )
    direct = DirectInfluence(net, F.cross_entropy, 1e-1).fit(batches(x, y, 100))
    approx = ekfac.influences(x_test[:4], y_test[:4], x[:10], y[:10], mode="perturbation")
    assert approx.shape == (4, 10, 1, 6, 6)
    exact = direct.influences(x_test[:4], y_test[:4], x[:10], y[:10], mode="perturbation")
    assert pearson(approx, exact) >= 0.9, pearson(approx, exact)  # measured: 0.98


# -- structure ------------------------------------------------------------------------------------
def test_fit_does_not_depend_on_batching_and_in_place_ops_are_harmless():
    net, x, y, x_test, y_test = mlp_classifier(seed=1, activation=nn.ReLU)
    ref = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-2).fit(
        batches(x, y, 200)
    )
    expected = ref.influences(x_test, y_test, x, y)
    inplace = nn.Sequential(net[0], nn.ReLU(inplace=True), net[2]).eval()
    other = EkfacInfluence(
        inplace, update_diagonal=True, hessian_regularization=1e-2, loss=nn.CrossEntropyLoss()
    ).fit(batches(x, y, 33))
    torch.testing.assert_close(other.influences(x_test, y_test, x, y), expected)


def test_frozen_layers_are_skipped():
    net, x, y, x_test, y_test = mlp_classifier(seed=2)
    net[0].requires_grad_(False)
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-1).fit(
        batches(x, y, 64)
    )
    direct = DirectInfluence(net, F.cross_entropy, 1e-1).fit(batches(x, y, 200))
    assert ekfac.n_parameters == 8 * 3 + 3
    # softmax regression on fixed features; measured 0.95-0.98 (seeds 0-4)
    assert (
        pearson(ekfac.influences(x_test, y_test, x, y), direct.influences(x_test, y_test, x, y))
        > 0.95
    )


def test_state_round_trip_gives_identical_influences():
    net, x, y, x_test, y_test = cnn_setup()
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-2).fit(
        batches(x, y, 50)
    )
    state = ekfac.fitted_state()
    assert {"layer0.QA", "layer0.QG", "layer0.lambda", "layer1.lambda"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = EkfacInfluence(
        net, update_diagonal=True, hessian_regularization=1e-2
    ).load_fitted_state(state)
    assert torch.equal(
        restored.influences(x_test, y_test, x, y), ekfac.influences(x_test, y_test, x, y)
    )


def test_a_state_loads_under_another_regularization_as_a_fit_at_it():
    """EK-FAC's eigenbases and corrected eigenvalues do not depend on λ: a state fitted at one
    λ, loaded into a model with another, gives that model's fit exactly; a method whose state
    holds λ in its numbers (Direct's factorization) still refuses."""
    from prefect_influence.errors import FittedStateError

    net, x, y, x_test, y_test = mlp_classifier()
    state = (
        EkfacInfluence(net, update_diagonal=True, hessian_regularization=1.0)
        .fit(batches(x, y, 50))
        .fitted_state()
    )
    fitted = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-3).fit(
        batches(x, y, 50)
    )
    loaded = EkfacInfluence(
        net, update_diagonal=True, hessian_regularization=1e-3
    ).load_fitted_state(state)
    torch.testing.assert_close(
        loaded.influences(x_test, y_test, x, y),
        fitted.influences(x_test, y_test, x, y),
        rtol=1e-12,
        atol=0,
    )
    direct = DirectInfluence(net, F.cross_entropy, 1.0).fit(batches(x, y, 50)).fitted_state()
    with pytest.raises(FittedStateError, match="regularization"):
        DirectInfluence(net, F.cross_entropy, 1e-3).load_fitted_state(direct)


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_trainable_layer_is_named_by_fit_not_construction():
    # as in pyDVL, construction accepts the model and fit refuses it
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), nn.Flatten(), nn.Linear(8, 2)
    ).eval()
    x = torch.randn(6, 1, 4, 4)
    y = torch.arange(6) % 2
    model = EkfacInfluence(net, hessian_regularization=1e-2)
    with pytest.raises(NotFittedError):
        model.influence_factors(x, y)
    for call in (lambda: model.fit([(x, y)]), model.check_layers, lambda: model.layer_names):
        with pytest.raises(NotImplementedLayerRepresentationException, match=r"'0\.1' \(Batch"):
            call()
    # also a NotImplementedError, as earlier versions raised at construction
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        model.fit([(x, y)])
    assert not model.is_fitted
    net[0][1].requires_grad_(False)
    EkfacInfluence(net, hessian_regularization=1e-2).fit([(x, y)])  # frozen: fine


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(2, 2, 3, groups=2),
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_unsupported_conv_options(layer):
    net = nn.Sequential(layer).eval()
    model = EkfacInfluence(net, loss=F.mse_loss)
    x = torch.randn(3, 2, 5, 5)
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        model.fit([(x, net(x).detach())])


def test_reused_layer_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    net = Twice().to(DTYPE).eval()
    x, y = classification_data(10, (2,), 2, 0.1, seed=0)
    with pytest.raises(UnsupportedLayerError, match="called 2 times"):
        EkfacInfluence(net, F.cross_entropy, 1e-2).fit([(x, y)])
    lin = nn.Linear(2, 2).to(DTYPE)
    tied = EkfacInfluence(nn.Sequential(lin, nn.Tanh(), lin).eval(), F.cross_entropy, 1e-2)
    with pytest.raises(UnsupportedLayerError, match="tied"):
        tied.fit([(x, y)])


def test_loss_detection():
    model, x, y = linear_regression()
    with pytest.raises(NotImplementedError, match="loss_type"):
        EkfacInfluence(model, F.l1_loss, 1e-2)
    with pytest.raises(InvalidParameterError):
        EkfacInfluence(model, F.mse_loss, 1e-2, loss_type="huber")
    wrong = EkfacInfluence(model, F.l1_loss, 1e-2, loss_type="mse")
    with pytest.raises(ValueError, match="squared error"):
        wrong.fit([(x, y)])


@pytest.mark.parametrize("update_diagonal", [False, True], ids=["K-FAC", "EK-FAC"])
def test_zero_regularization_with_singular_approximation(update_diagonal):
    # the fit does not depend on λ: it succeeds, and a solve refuses λ = 0 on a singular
    # approximation, while a λ > 0 set afterwards serves the same fit
    model, x, y = linear_regression(d_in=3)
    x = torch.cat([x, x[:, :1]], dim=1)  # a duplicated feature: a zero eigenvalue
    model = nn.Linear(4, 1).to(DTYPE).eval()
    ekfac = EkfacInfluence(model, update_diagonal, loss=F.mse_loss).fit([(x, y)])
    assert ekfac.regularization == 0.0  # pyDVL's default
    with pytest.raises(InvalidRegularizationError, match="singular"):
        ekfac.influence_factors(x, y)
    ekfac.hessian_regularization = 1e-3
    expected = EkfacInfluence(model, update_diagonal, 1e-3, loss=F.mse_loss).fit([(x, y)])
    torch.testing.assert_close(ekfac.influence_factors(x, y), expected.influence_factors(x, y))
