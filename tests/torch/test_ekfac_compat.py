"""EkfacInfluence's pyDVL surface: K-FAC vs EK-FAC eigenvalues, results by layer, exploring λ,
the default loss and the positional forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import linear_regression, loader, mlp_classifier, small_cnn
from test_ekfac import gauss_newton, kronecker_basis
from torch import nn

from prefect_influence import InfluenceMode
from prefect_influence.errors import (
    FittedStateError,
    InfluenceInputError,
    InvalidParameterError,
    InvalidRegularizationError,
    ShapeMismatchError,
)
from prefect_influence.torch import EkfacInfluence

DTYPE = torch.float64


def softmax_regression(n=50, d=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=gen)
    torch.manual_seed(seed)
    return nn.Linear(d, classes).to(DTYPE).eval(), x, y


def test_kfac_is_the_kronecker_product_of_the_factors():
    """K-FAC for softmax regression in closed form: ``A = mean [x; 1][x; 1]ᵀ``,
    ``G = mean (diag p − p pᵀ)`` (the logit Hessian of cross-entropy), and the solve is
    ``(G ⊗ A + λI)⁻¹`` on the ``[W | b]`` matrix read row by row."""
    model, x, y = softmax_regression()
    reg = 1e-2
    kfac = EkfacInfluence(model, hessian_regularization=reg).fit(loader(x, y, 16))
    assert not kfac.update_diagonal  # pyDVL's default

    a_rows = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1)
    factor_a = a_rows.T @ a_rows / len(x)
    p = torch.softmax(model(x), dim=1).detach()
    factor_g = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(dim=0)
    state = kfac.fitted_state()
    expected_eigenvalues = torch.outer(
        torch.linalg.eigvalsh(factor_g).clamp_min(0), torch.linalg.eigvalsh(factor_a)
    )
    # float64 eigendecompositions of 3×3 and 5×5 matrices: agreement to ~1e-15 relative
    torch.testing.assert_close(state["layer0.lambda"], expected_eigenvalues, rtol=1e-10, atol=1e-13)

    # row-major [W | b] (3 × 5) → flat order (W row-major, then b) of the model's parameters
    n_out, n_in = 3, 5
    matrix_to_flat = torch.cat(
        [torch.arange(n_out * n_in).reshape(n_out, n_in)[:, :-1].reshape(-1)]
        + [torch.arange(n_out * n_in).reshape(n_out, n_in)[:, -1]]
    )
    dense = torch.kron(factor_g, factor_a) + reg * torch.eye(n_out * n_in, dtype=DTYPE)
    dense = dense[matrix_to_flat][:, matrix_to_flat]
    grads = kfac.per_sample_grads(x[:6], y[:6])
    expected = torch.linalg.solve(dense, grads.T).T
    # a well-conditioned 15 × 15 solve (cond ≲ 1e3) in float64
    torch.testing.assert_close(kfac.influence_factors(x[:6], y[:6]), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("update_diagonal", [False, True], ids=["K-FAC", "EK-FAC"])
def test_both_variants_are_exact_for_linear_regression(update_diagonal):
    # MSE on one Linear layer: H = (2/m)·I ⊗ A, a Kronecker product, so both are exact
    model, x, y, xt, yt = linear_regression()
    ekfac = EkfacInfluence(model, update_diagonal, 0.0, loss=F.mse_loss).fit(loader(x, y))
    a_rows = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1)
    hessian_w = 2 / y.shape[1] * a_rows.T @ a_rows / len(x)  # per output row of [W | b]
    grads = ekfac.per_sample_grads(xt, yt)
    m, d = y.shape[1], x.shape[1]
    w_grads, b_grads = grads[:, : m * d].reshape(-1, m, d), grads[:, m * d :]
    rows = torch.cat([w_grads, b_grads[:, :, None]], dim=2)  # k × m × (d+1)
    solved = torch.linalg.solve(hessian_w, rows.transpose(1, 2)).transpose(1, 2)
    expected = torch.cat([solved[:, :, :-1].reshape(len(xt), -1), solved[:, :, -1]], dim=1)
    # float64, cond(A) ~ 10: exact up to rounding
    torch.testing.assert_close(ekfac.influence_factors(xt, yt), expected, rtol=1e-9, atol=1e-12)


def test_ekfac_fits_the_gauss_newton_blocks_at_least_as_well_as_kfac():
    """Both share the eigenbasis ``Q_G ⊗ Q_A``; EK-FAC's eigenvalues are the Gauss-Newton
    matrix's diagonal in it, the diagonal nearest in Frobenius norm (George et al. 2018)."""
    model, x, y, _, _ = mlp_classifier()
    kfac = EkfacInfluence(model, False, 0.1).fit(loader(x, y))
    ekfac = EkfacInfluence(model, True, 0.1).fit(loader(x, y))
    ggn = gauss_newton(model, x)
    k_state, e_state = kfac.fitted_state(), ekfac.fitted_state()
    start = 0
    for i in range(2):
        qa, qg = k_state[f"layer{i}.QA"], k_state[f"layer{i}.QG"]
        assert torch.equal(qa, e_state[f"layer{i}.QA"]) and torch.equal(qg, e_state[f"layer{i}.QG"])
        basis = kronecker_basis(model, i, qa, qg)
        width = basis.shape[0]
        block = ggn[start : start + width, start : start + width]
        local = basis[:, start : start + width]  # orthonormal rows spanning the layer's block
        errors = {}
        for name, state in (("K-FAC", k_state), ("EK-FAC", e_state)):
            approx = local.T @ torch.diag(state[f"layer{i}.lambda"].reshape(-1)) @ local
            errors[name] = float((approx - block).norm())
        # a theorem, up to float64 rounding of norms of size ~1
        assert errors["EK-FAC"] <= errors["K-FAC"] + 1e-12, errors
        start += width
    assert start == kfac.n_parameters


@pytest.fixture(scope="module")
def cnn_ekfac():
    model, x, y, xt, yt = small_cnn()
    ekfac = EkfacInfluence(model, True, 0.1).fit(loader(x, y))
    return ekfac, x, y, xt, yt


@pytest.mark.parametrize("mode", list(InfluenceMode), ids=lambda m: m.value)
def test_results_by_layer_sum_to_the_totals(cnn_ekfac, mode):
    ekfac, x, y, xt, yt = cnn_ekfac
    assert ekfac.layer_names == ["0", "3"]  # module names, as pyDVL keys them
    factors = ekfac.influence_factors(xt, yt)
    by_layer = ekfac.influence_factors_by_layer(xt, yt)
    assert list(by_layer) == ekfac.layer_names
    assert [f.shape[1] for f in by_layer.values()] == [2 * 9 + 2, 32 * 3 + 3]
    # the layers' columns in flat order are the whole factor matrix: exactly equal
    assert torch.equal(torch.cat(list(by_layer.values()), dim=1), factors)

    # the per-layer products are partial sums of the same dot products: float64 rounding only
    close = dict(rtol=1e-10, atol=1e-12)
    total = ekfac.influences(xt, yt, x, y, mode=mode)
    parts = ekfac.influences_by_layer(xt, yt, x, y, mode=mode)
    assert list(parts) == ekfac.layer_names
    assert all(p.shape == total.shape for p in parts.values())
    torch.testing.assert_close(sum(parts.values()), total, **close)
    from_factors = ekfac.influences_from_factors_by_layer(by_layer, x, y, mode=mode)
    for name in parts:
        torch.testing.assert_close(from_factors[name], parts[name], **close)

    symmetric = ekfac.influences_by_layer(x[:7], y[:7], mode=mode.value)  # a str mode too
    torch.testing.assert_close(
        sum(symmetric.values()), ekfac.influences(x[:7], y[:7], mode=mode), **close
    )


def test_factors_by_layer_are_checked(cnn_ekfac):
    ekfac, x, y, xt, yt = cnn_ekfac
    by_layer = ekfac.influence_factors_by_layer(xt, yt)
    with pytest.raises(InfluenceInputError, match="dict"):
        ekfac.influences_from_factors_by_layer(list(by_layer.values()), x, y)
    with pytest.raises(InfluenceInputError, match=r"\['0'\].*\['0', '3'\]"):
        ekfac.influences_from_factors_by_layer({"0": by_layer["0"]}, x, y)
    wrong = dict(by_layer, **{"3": by_layer["3"][:, :-1]})
    with pytest.raises(ShapeMismatchError, match=r"z_test_factors\['3'\].*\(4, 99\)"):
        ekfac.influences_from_factors_by_layer(wrong, x, y)
    with pytest.raises(InfluenceInputError, match="y is missing"):
        ekfac.influences_by_layer(xt, yt, x=x)


def test_explore_hessian_regularization_equals_fits_at_each_value(cnn_ekfac):
    ekfac, x, y, _, _ = cnn_ekfac
    model = ekfac.model
    explored = ekfac.explore_hessian_regularization(x[:9], y[:9], [0.01, 1.0])
    assert list(explored) == [0.01, 1.0]
    assert ekfac.regularization == 0.1  # left unchanged
    for reg, by_layer in explored.items():
        refit = EkfacInfluence(model, True, reg).fit(loader(x, y))
        # same eigenvalues, same products: float64 rounding only
        torch.testing.assert_close(
            sum(by_layer.values()), refit.influences(x[:9], y[:9]), rtol=1e-10, atol=1e-12
        )
        assert all(v.shape == (9, 9) for v in by_layer.values())
    with pytest.raises(InvalidRegularizationError):
        ekfac.explore_hessian_regularization(x[:3], y[:3], [0.1, -1.0])
    with pytest.raises(InvalidParameterError, match="iterable"):
        ekfac.explore_hessian_regularization(x[:3], y[:3], 0.1)


def test_default_loss_and_positional_forms():
    model, x, y = softmax_regression()
    default = EkfacInfluence(model)
    assert default.loss is F.cross_entropy and default.regularization == 0.0
    assert not default.update_diagonal and not default.progress
    pydvl_form = EkfacInfluence(model, True, 0.1, False).fit(loader(x, y))
    keyword_form = EkfacInfluence(
        model, update_diagonal=True, hessian_regularization=0.1, loss=nn.CrossEntropyLoss()
    ).fit(loader(x, y))
    assert torch.equal(pydvl_form.influences(x, y), keyword_form.influences(x, y))
    # the positional form of earlier versions: (model, loss, λ), now K-FAC
    older = EkfacInfluence(model, F.cross_entropy, 0.1)
    assert older.loss is F.cross_entropy and not older.update_diagonal
    assert older.regularization == 0.1 and older.hessian_regularization == 0.1
    with pytest.raises(InvalidParameterError, match="given twice"):
        EkfacInfluence(model, F.cross_entropy, loss=F.cross_entropy)
    with pytest.raises(InvalidParameterError, match="update_diagonal"):
        EkfacInfluence(model, "yes")
    with pytest.raises(InvalidParameterError, match="not both"):
        EkfacInfluence(model, False, 0.1, regularization=0.1)


def test_progress_logs_each_pass(caplog):
    model, x, y = softmax_regression()
    with caplog.at_level("INFO", logger="prefect_influence.torch.ekfac"):
        EkfacInfluence(model, True, 0.1, progress=True).fit(loader(x, y))
    messages = [r.getMessage() for r in caplog.records]
    assert any("Kronecker factors from 50 samples" in m for m in messages), messages
    assert any("corrected eigenvalues from 50 samples" in m for m in messages), messages


def test_a_state_of_the_other_variant_is_refused():
    model, x, y = softmax_regression()
    kfac_state = EkfacInfluence(model, False, 0.1).fit(loader(x, y)).fitted_state()
    assert int(kfac_state["update_diagonal"]) == 0
    with pytest.raises(FittedStateError, match="K-FAC.*EK-FAC"):
        EkfacInfluence(model, True, 0.1).load_fitted_state(kfac_state)
    # a state without the flag (exported before it existed) loads
    older = {k: v for k, v in kfac_state.items() if k != "update_diagonal"}
    loaded = EkfacInfluence(model, False, 0.1).load_fitted_state(older)
    assert loaded.is_fitted
