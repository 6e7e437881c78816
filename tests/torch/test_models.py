"""Every torch influence method against closed forms (linear regression) and against the exact
DirectInfluence (small MLP and CNN classifiers), plus fitted-state round trips."""

from __future__ import annotations

import pytest
import torch
from problems import (
    DenseOperator,
    linear_regression,
    loader,
    mlp_classifier,
    small_cnn,
    sum_squared_error,
)
from torch.nn.functional import cross_entropy

from prefect_influence import InfluenceMode
from prefect_influence.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NystroemPreconditioner,
    NystroemSketchInfluence,
)

REG = 0.1


def analytic_linear(model, x, y, xt, yt, reg):
    """Closed forms for f(x) = Wx + b with per-sample loss ‖f(x) − y‖² (flat order: W row-major, b)."""
    w, b = model.weight.detach(), model.bias.detach()
    m, d = w.shape

    def grads(xs, ys):
        r = xs @ w.T + b - ys  # n × m
        return torch.cat([2 * (r[:, :, None] * xs[:, None, :]).reshape(len(xs), -1), 2 * r], dim=1)

    sxx = x.T @ x / len(x)
    mu = x.mean(0)
    eye_m = torch.eye(m, dtype=x.dtype)
    hessian = 2 * torch.cat(
        [
            torch.cat([torch.kron(eye_m, sxx), torch.kron(eye_m, mu[:, None])], dim=1),
            torch.cat([torch.kron(eye_m, mu[None, :]), eye_m], dim=1),
        ]
    ) + reg * torch.eye(m * d + m, dtype=x.dtype)
    factors = torch.linalg.solve(hessian, grads(xt, yt).T).T  # n_test × p
    up = factors @ grads(x, y).T
    fw, fb = factors[:, : m * d].reshape(-1, m, d), factors[:, m * d :]
    r = x @ w.T + b - y
    # ∇_x ⟨F, g(x)⟩ with g = (2 r xᵀ, 2 r): 2 (Wᵀ F_W x + F_Wᵀ r + Wᵀ F_b)
    pert = 2 * (
        torch.einsum("md,tmk,nk->tnd", w, fw, x)
        + torch.einsum("tmd,nm->tnd", fw, r)
        + torch.einsum("md,tm->td", w, fb)[:, None, :]
    )
    return factors, up, pert


def linear_methods(model):
    p = sum(q.numel() for q in model.parameters())
    return {
        "cg": CgInfluence(model, sum_squared_error, REG, rtol=1e-12, atol=1e-14),
        "cg-jacobi": CgInfluence(
            model,
            sum_squared_error,
            REG,
            rtol=1e-12,
            atol=1e-14,
            preconditioner=JacobiPreconditioner(num_samples_estimator=4),
        ),
        "cg-nystroem": CgInfluence(
            model,
            sum_squared_error,
            REG,
            rtol=1e-12,
            atol=1e-14,
            preconditioner=NystroemPreconditioner(rank=3),
        ),
        # scale above λ_max(H + λI) (≈ 2·λ_max(E[x̃x̃ᵀ]) + λ < 12 here); full-batch iteration
        "lissa": LissaInfluence(
            model, sum_squared_error, REG, maxiter=20000, scale=15.0, rtol=1e-13, batch_size=1000
        ),
        "arnoldi": ArnoldiInfluence(model, sum_squared_error, REG, rank=p),
        "nystroem": NystroemSketchInfluence(model, sum_squared_error, REG, rank=p),
    }


def test_direct_matches_closed_form_linear_regression():
    model, x, y, xt, yt = linear_regression()
    factors, up, pert = analytic_linear(model, x, y, xt, yt, REG)
    direct = DirectInfluence(model, sum_squared_error, REG).fit(loader(x, y))
    # float64 throughout: agreement is limited by round-off (~1e-13); 1e-5 is the bound
    torch.testing.assert_close(direct.influence_factors(xt, yt), factors, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(direct.influences(xt, yt, x, y), up, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(
        direct.influences(xt, yt, x, y, InfluenceMode.Perturbation), pert, rtol=1e-5, atol=1e-10
    )


@pytest.mark.parametrize("name", list(linear_methods(linear_regression()[0])))
def test_iterative_and_low_rank_methods_match_closed_form(name):
    model, x, y, xt, yt = linear_regression()
    _, up, pert = analytic_linear(model, x, y, xt, yt, REG)
    method = linear_methods(model)[name].fit(loader(x, y))
    # all methods are exact at full rank / convergence; 1e-4 relative to the largest entry is
    # the bound and leaves room for the iterative stopping criteria (≤ 1e-12 here)
    scale = up.abs().max()
    torch.testing.assert_close(method.influences(xt, yt, x, y), up, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(
        method.influences(xt, yt, x, y, InfluenceMode.Perturbation),
        pert,
        rtol=1e-4,
        atol=1e-4 * pert.abs().max(),
    )


def classifier_methods(model, p, lam_max):
    return {
        "cg": CgInfluence(model, cross_entropy, REG, rtol=1e-12, atol=1e-14),
        "cg-nystroem": CgInfluence(
            model,
            cross_entropy,
            REG,
            rtol=1e-12,
            atol=1e-14,
            preconditioner=NystroemPreconditioner(rank=5),
        ),
        "lissa": LissaInfluence(
            model,
            cross_entropy,
            REG,
            maxiter=20000,
            scale=1.2 * lam_max,
            rtol=1e-10,
            batch_size=1000,
        ),
        "arnoldi": ArnoldiInfluence(model, cross_entropy, REG, rank=p),
        "nystroem": NystroemSketchInfluence(model, cross_entropy, REG, rank=p),
    }


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def classifier(request):
    model, x, y, xt, yt = (mlp_classifier if request.param == "mlp" else small_cnn)()
    direct = DirectInfluence(model, cross_entropy, REG).fit(loader(x, y))
    eigenvalues = torch.linalg.eigvalsh(direct.hessian)
    # CG, LiSSA and Nyström assume H + λI ≻ 0: make sure the problem satisfies that
    assert eigenvalues.min() > 0
    return model, x, y, xt, yt, direct, float(eigenvalues.max())


@pytest.mark.parametrize("name", ["cg", "cg-nystroem", "lissa", "arnoldi", "nystroem"])
def test_methods_match_direct_on_classifiers(classifier, name):
    model, x, y, xt, yt, direct, lam_max = classifier
    p = sum(q.numel() for q in model.parameters())
    method = classifier_methods(model, p, lam_max)[name]
    method.fit(loader(x, y))
    expected = direct.influences(xt, yt, x, y)
    got = method.influences(xt, yt, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    exp_p = direct.influences(xt[:2], yt[:2], x[:5], y[:5], InfluenceMode.Perturbation)
    got_p = method.influences(xt[:2], yt[:2], x[:5], y[:5], InfluenceMode.Perturbation)
    assert got_p.shape == (2, 5, *x.shape[1:])
    torch.testing.assert_close(got_p, exp_p, rtol=1e-4, atol=1e-4 * exp_p.abs().max())


def test_low_rank_arnoldi_keeps_dominant_curvature(classifier):
    """Below full rank, Arnoldi agrees with Direct on the dominant eigen-directions."""
    model, x, y, xt, yt, direct, _ = classifier
    arnoldi = ArnoldiInfluence(model, cross_entropy, REG, rank=5, krylov_dimension=40).fit(
        loader(x, y)
    )
    vals, vecs = torch.linalg.eigh(
        direct.hessian - REG * torch.eye(direct.n_parameters, dtype=x.dtype)
    )
    top = torch.argsort(vals.abs(), descending=True)[:5]
    torch.testing.assert_close(
        arnoldi._vals.abs().sort().values, vals[top].abs().sort().values, rtol=1e-6, atol=1e-9
    )


def test_full_rank_arnoldi_is_exact_at_tiny_curvature(classifier):
    """The Lanczos restart test is relative to the operator's size: a loss scaled by 1e-11
    (Hessian norm ~1e-11) still gives Direct's factors at rank = p (it restarted at every step
    and returned random Rayleigh quotients when the test had an absolute floor)."""
    model, x, y, xt, yt, _, _ = classifier
    scale = 1e-11

    def tiny(out, target):
        return scale * cross_entropy(out, target)

    reg = REG * scale
    direct = DirectInfluence(model, tiny, reg).fit(loader(x, y))
    arnoldi = ArnoldiInfluence(model, tiny, reg, rank=direct.n_parameters).fit(loader(x, y))
    expected = direct.influence_factors(xt[:3], yt[:3])
    torch.testing.assert_close(
        arnoldi.influence_factors(xt[:3], yt[:3]),
        expected,
        rtol=1e-6,
        atol=1e-6 * expected.abs().max(),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda m: DirectInfluence(m, cross_entropy, REG),
        lambda m: CgInfluence(m, cross_entropy, REG, preconditioner=JacobiPreconditioner(2)),
        lambda m: LissaInfluence(m, cross_entropy, REG, maxiter=50),
        lambda m: ArnoldiInfluence(m, cross_entropy, REG, rank=4),
        lambda m: NystroemSketchInfluence(m, cross_entropy, REG, rank=4),
    ],
    ids=["direct", "cg-jacobi", "lissa", "arnoldi", "nystroem"],
)
def test_fitted_state_round_trip_gives_identical_influences(make):
    model, x, y, xt, yt = mlp_classifier()
    fitted = make(model).fit(loader(x, y))
    state = fitted.fitted_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = make(model).load_fitted_state({k: v.clone() for k, v in state.items()})
    assert restored.is_fitted
    assert torch.equal(restored.influences(xt, yt, x, y), fitted.influences(xt, yt, x, y))


def test_frozen_parameters_and_buffers():
    """Parameters with requires_grad=False are excluded; BatchNorm buffers in eval mode work."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    net[0].weight.requires_grad_(False)
    net[1].running_mean.fill_(0.3)
    net.eval()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    model = DirectInfluence(net, cross_entropy, REG).fit(loader(x, y))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert model.n_parameters == trainable == 4 + 4 + 4 + 10
    assert model.influence_factors(x[:3], y[:3]).shape == (3, trainable)


def test_dtype_follows_model_float32():
    model, x, y, xt, yt = mlp_classifier()
    model32 = model.float()
    direct = DirectInfluence(model32, cross_entropy, REG).fit(loader(x, y))
    values = direct.influences(xt, yt, x, y)
    assert values.dtype == torch.float32


@pytest.mark.parametrize("problem", [mlp_classifier, small_cnn])
def test_hessian_products_reusing_gradient_graphs_equal_rebuilt_ones(problem, monkeypatch):
    """Inside ``reusing_graphs`` every batch's gradient graph is built once and reused; the
    products (and a whole CG solve) equal those that rebuild the graph each time, and over the
    budget nothing is kept."""
    from prefect_influence.torch.operator import HessianOperator

    model, x, y, xt, yt = problem()
    cg = CgInfluence(model, cross_entropy, REG, rtol=1e-12, atol=1e-14, batch_size=16)
    cg.fit(loader(x, y, 16))
    op = cg._op
    built = []
    original = cg._fn.hvp_function
    monkeypatch.setattr(cg._fn, "hvp_function", lambda *a: built.append(1) or original(*a))
    vectors = torch.randn(
        3, cg.n_parameters, generator=torch.Generator().manual_seed(0), dtype=x.dtype
    )
    rebuilt = op(vectors)
    assert len(built) == op.n_batches >= 3  # 40 or 60 samples in batches of 16
    built.clear()
    with op.reusing_graphs():
        first, second = op(vectors), op(vectors)
        assert len(built) == op.n_batches  # once, by the first product
        assert op._products is not None
    assert op._products is None  # released on exit
    torch.testing.assert_close(first, rebuilt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    # the estimate is a real measurement: it grows with the batch (activations are per sample)
    assert (
        0 < cg._fn.gradient_graph_bytes(x[:8], y[:8]) < cg._fn.gradient_graph_bytes(x[:16], y[:16])
    )

    reused = cg.influence_factors(xt, yt)
    # one vector at a time (a tight budget for the vectors' graphs): the same products
    from prefect_influence.torch import operator

    monkeypatch.setattr(operator, "PRODUCT_VECTOR_BYTES", 1)
    assert op._vectors_at_once() == 1
    torch.testing.assert_close(op(vectors), rebuilt, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(HessianOperator, "graph_budget_bytes", 0)
    built.clear()
    with op.reusing_graphs():
        op(vectors)
    assert op._products is None and len(built) == op.n_batches  # over budget: rebuilt per product
    torch.testing.assert_close(cg.influence_factors(xt, yt), reused, rtol=1e-9, atol=1e-12)


def test_automatic_product_batch_size_follows_the_graph_budget(classifier):
    """Without a fixed batch size, a Hessian product covers as many samples as keep one batch's
    gradient graph within the budget, at least the loader's batch: the same Hessian, fewer
    passes; LiSSA keeps the loader's batches (one per iteration is its method)."""
    from prefect_influence.torch import operator

    model, x, y, xt, yt, direct, lam_max = classifier
    per_sample = CgInfluence(model, cross_entropy, REG)._fn.gradient_graph_bytes(x[:8], y[:8]) / 8
    assert operator.product_batch_size(CgInfluence(model, cross_entropy, REG)._fn, x, y, 8) == len(
        x
    )
    fn = CgInfluence(model, cross_entropy, REG)._fn
    tight = operator.product_batch_size(fn, x, y, 4, budget=int(10 * per_sample))
    assert 4 <= tight <= 10
    assert operator.product_batch_size(fn, x, y, 16, budget=1) == 16  # never below the loader's
    # a batch that is a view of a large training tensor is measured by its own graph, not by
    # the storage it views (which exists anyway): 200 copies change nothing
    big_x, big_y = torch.cat([x] * 200), torch.cat([y] * 200)
    assert fn.gradient_graph_bytes(big_x[:8], big_y[:8]) == fn.gradient_graph_bytes(
        x[:8].clone(), y[:8].clone()
    )

    auto = CgInfluence(model, cross_entropy, REG, rtol=1e-12, atol=1e-14).fit(loader(x, y, 8))
    fixed = CgInfluence(model, cross_entropy, REG, rtol=1e-12, atol=1e-14, batch_size=8)
    fixed.fit(loader(x, y, 8))
    assert auto._op.batch_size == len(x) and fixed._op.batch_size == 8
    torch.testing.assert_close(
        auto.influence_factors(xt, yt), fixed.influence_factors(xt, yt), rtol=1e-9, atol=1e-12
    )
    # the resolved size is part of the fitted state: a loaded model batches identically
    again = CgInfluence(model, cross_entropy, REG, rtol=1e-12, atol=1e-14)
    again.load_fitted_state(auto.fitted_state())
    assert again._op.batch_size == len(x)
    lissa = LissaInfluence(model, cross_entropy, REG, maxiter=2, scale=1.2 * lam_max)
    with pytest.warns(UserWarning, match="LiSSA did not reach"):
        lissa.fit(loader(x, y, 8)).influence_factors(xt, yt)
    assert lissa._op.batch_size == 8


def _zero_residual_regression_float32():
    """A float32 linear regression whose first test target equals the model's output (that
    test point's loss gradient is exactly zero), and the largest eigenvalue of its H + λI."""
    model, x, y, xt, yt = linear_regression()
    lam_max = float(
        torch.linalg.eigvalsh(
            DirectInfluence(model, sum_squared_error, REG).fit(loader(x, y)).hessian
        ).max()
    )
    model, x, y, xt, yt = model.float(), x.float(), y.float(), xt.float(), yt.float()
    with torch.no_grad():
        yt[0] = model(xt[:1])[0]
    return model, x, y, xt, yt, lam_max


def test_a_zero_gradient_in_float32_neither_stalls_lissa_nor_makes_cg_report_nan():
    """Relative changes and residuals of a zero row are 0/0 unless the floor is a float32
    number (1e-300 rounds to 0): LiSSA then never saw its tolerance met (NaN), and CG's
    non-convergence warning printed ``nan``."""
    import warnings

    model, x, y, xt, yt, lam_max = _zero_residual_regression_float32()
    lissa = LissaInfluence(
        model, sum_squared_error, REG, maxiter=5000, scale=1.2 * lam_max, rtol=1e-5
    ).fit(loader(x, y, len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "did not reach rtol" fails the test
        with_zero = lissa.influence_factors(xt, yt)
    assert not bool(with_zero[0].any())
    torch.testing.assert_close(with_zero[1:], lissa.influence_factors(xt[1:], yt[1:]))

    cg = CgInfluence(model, sum_squared_error, REG, maxiter=1).fit(loader(x, y))
    with pytest.warns(UserWarning, match="did not converge") as caught:
        cg.influence_factors(xt, yt)
    message = str(caught[0].message)
    assert "nan" not in message and "worst relative residual" in message


def test_float32_ekfac_is_judged_singular_per_eigenvalue_not_by_parameter_count():
    """EK-FAC divides entrywise by its eigenvalues + λ: a 91k-parameter float32 MLP with
    λ = 1e-3 (≈ λ_max / 900) is well posed, although p·eps(float32) ≈ 0.011 > λ / λ_max."""
    from prefect_influence.torch import EkfacInfluence

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(300, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)
    ).eval()
    x = torch.randn(64, 300, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    factors32 = (
        EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-3)
        .fit([(x, y)])
        .influence_factors(x[:4], y[:4])
    )
    net64 = net.double()
    factors64 = (
        EkfacInfluence(net64, update_diagonal=True, hessian_regularization=1e-3)
        .fit([(x.double(), y)])
        .influence_factors(x[:4].double(), y[:4])
    )
    # float32 rounding (eps 6e-8) amplified by cond ≈ 900 and the eigendecompositions: ~1e-4
    error = (factors32.double() - factors64).norm() / factors64.norm()
    assert error < 1e-3, error


def test_nystroem_without_curvature_gives_the_gradient_over_lambda():
    """A loss linear in the parameters has H = 0: the Nyström sketch keeps no eigenpair, the
    sketch influence is the complement term v/λ alone and the preconditioner is the identity
    (both used to fail reducing an empty tensor)."""
    model, x, _, xt, _ = linear_regression()
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(len(x), 2, generator=gen, dtype=x.dtype)
    tt = torch.randn(len(xt), 2, generator=gen, dtype=x.dtype)

    def linear_loss(out, target):
        return (out * target).sum()

    expected = DirectInfluence(model, linear_loss, REG).fit(loader(x, t)).influence_factors(xt, tt)
    sketch = NystroemSketchInfluence(model, linear_loss, REG, rank=4).fit(loader(x, t))
    torch.testing.assert_close(sketch.influence_factors(xt, tt), expected)
    cg = CgInfluence(model, linear_loss, REG, preconditioner=NystroemPreconditioner(rank=4))
    torch.testing.assert_close(cg.fit(loader(x, t)).influence_factors(xt, tt), expected)


def test_nystroem_preconditioner_ignores_directions_without_positive_curvature():
    """With λ = 0 a sketched eigenvalue clamped to 0 made the preconditioner's scale 0/0."""
    hessian = torch.diag(torch.tensor([4.0, 1.0, -1e-3, 0.5], dtype=torch.float64))
    pre = NystroemPreconditioner(rank=4)
    pre.fit(DenseOperator(hessian), 0.0)
    out = pre.solve(torch.ones(2, 4, dtype=torch.float64))
    assert bool(torch.isfinite(out).all())
    # the kept directions are scaled by smallest / eigenvalue (0.5/4, 0.5/1, 0.5/0.5); the
    # rest passes through unchanged
    torch.testing.assert_close(out[0], torch.tensor([0.125, 0.5, 1.0, 1.0], dtype=torch.float64))


def test_self_influences_go_in_slices_within_the_memory_budget(classifier, monkeypatch):
    """A small budget: the gradients are computed in slices of at most the budget's rows (at
    least 64), and the values equal the diagonal of the full influence matrix."""
    model, x, y, xt, yt, direct, _ = classifier
    x, y = torch.cat([x, xt, x]), torch.cat([y, yt, y])  # more than two slices of 64
    sizes = []
    grads = direct._fn.per_sample_grads

    def counted(xs, ys):
        sizes.append(len(xs))
        return grads(xs, ys)

    monkeypatch.setattr(direct._fn, "per_sample_grads", counted)
    monkeypatch.setattr(direct, "self_influence_budget_bytes", 1)
    values = direct.self_influences(x, y)
    assert max(sizes) == 64 and sum(sizes) == len(x) and len(sizes) == -(-len(x) // 64)
    full = direct.influences(x, y, x, y)
    torch.testing.assert_close(values, torch.diagonal(full), rtol=1e-9, atol=1e-12)
