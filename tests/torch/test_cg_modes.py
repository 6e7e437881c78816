"""pyDVL's switches of the iterative and low-rank methods: CG per right-hand side or block CG,
Arnoldi with or without the Woodbury form, and the preconditioners' fit(operator, λ)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from problems import DenseOperator, loader, mlp_classifier
from torch.nn.functional import cross_entropy

from prefect_influence.errors import (
    InvalidParameterError,
    InvalidRegularizationError,
    NotFittedError,
)
from prefect_influence.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    JacobiPreconditioner,
    NystroemPreconditioner,
)
from prefect_influence.torch.operator import HessianOperator

REG = 0.1


@pytest.fixture(scope="module")
def classifier():
    model, x, y, xt, yt = mlp_classifier()
    direct = DirectInfluence(model, cross_entropy, REG).fit(loader(x, y))
    return model, x, y, xt, yt, direct


@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
@pytest.mark.parametrize("solve_simultaneously", [False, True], ids=["per-rhs", "block"])
def test_cg_modes_agree_with_direct(classifier, solve_simultaneously, preconditioner):
    model, x, y, xt, yt, direct = classifier
    make = {
        None: lambda: None,
        "jacobi": lambda: JacobiPreconditioner(num_samples_estimator=4),
        "nystroem": lambda: NystroemPreconditioner(rank=5),
    }[preconditioner]
    cg = CgInfluence(
        model,
        cross_entropy,
        REG,
        rtol=1e-10,
        atol=1e-14,
        preconditioner=make(),
        solve_simultaneously=solve_simultaneously,
    )
    assert cg.solve_simultaneously is solve_simultaneously
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges: no warning
        cg.fit(loader(x, y))
        factors = cg.influence_factors(xt, yt)
    # residual ≤ 1e-10·‖b‖ on H + λI with cond ≲ 1e3 (float64): factors within ~1e-7
    torch.testing.assert_close(factors, direct.influence_factors(xt, yt), rtol=1e-6, atol=1e-9)
    single = cg.influence_factors(xt[:1], yt[:1])  # one right-hand side, either mode
    torch.testing.assert_close(single, factors[:1], rtol=1e-6, atol=1e-9)


def test_cg_default_is_one_solve_per_right_hand_side(classifier, monkeypatch):
    """pyDVL's default: each right-hand side gets its own recurrence, so a batch's result is
    the rows solved one at a time; block CG couples them (the same solution, other rounding)."""
    model, x, y, xt, yt, _ = classifier
    cg = CgInfluence(model, cross_entropy, REG, rtol=1e-10, atol=1e-14).fit(loader(x, y))
    assert cg.solve_simultaneously is False
    batch = cg.influence_factors(xt, yt)
    one_by_one = torch.cat([cg.influence_factors(xt[i : i + 1], yt[i : i + 1]) for i in range(6)])
    # separate recurrences in one batched product: the same arithmetic but for the product's
    # summation order (measured 5e-13 relative; block CG's coupled rows differ by ~1e-10)
    error = (batch - one_by_one).norm(dim=1) / one_by_one.norm(dim=1)
    assert float(error.max()) < 1e-11, error
    calls = []
    monkeypatch.setattr(cg, "_block_cg", lambda *args: calls.append(args))
    cg.influence_factors(xt, yt)
    assert not calls


def test_cg_warn_on_max_iteration_false_logs_instead(classifier, caplog):
    model, x, y, xt, yt, _ = classifier
    quiet = CgInfluence(model, cross_entropy, REG, maxiter=1, warn_on_max_iteration=False)
    quiet.fit(loader(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.DEBUG, logger="prefect_influence.torch.iterative"):
            quiet.influence_factors(xt, yt)
    assert any("did not converge for 6 of 6" in r.getMessage() for r in caplog.records)
    loud = CgInfluence(model, cross_entropy, REG, maxiter=1).fit(loader(x, y))
    with pytest.warns(UserWarning, match=r"did not converge for 6 of 6 .* in 1 iterations"):
        loud.influence_factors(xt, yt)


@pytest.mark.parametrize("flag", ["solve_simultaneously", "warn_on_max_iteration", "progress"])
def test_cg_flags_must_be_booleans(classifier, flag):
    model = classifier[0]
    with pytest.raises(InvalidParameterError, match=flag):
        CgInfluence(model, cross_entropy, REG, **{flag: "yes"})


# -- Arnoldi ----------------------------------------------------------------------------------
def test_arnoldi_woodbury_agrees_with_the_plain_form_at_full_rank(classifier):
    model, x, y, xt, yt, direct = classifier
    p = direct.n_parameters
    expected = direct.influence_factors(xt, yt)
    for use_woodbury in (False, True):
        arnoldi = ArnoldiInfluence(model, cross_entropy, REG, rank=p, use_woodbury=use_woodbury)
        factors = arnoldi.fit(loader(x, y)).influence_factors(xt, yt)
        # the full Lanczos eigendecomposition in float64: exact up to rounding
        torch.testing.assert_close(factors, expected, rtol=1e-8, atol=1e-11)


def test_arnoldi_woodbury_is_the_exact_inverse_of_the_low_rank_approximation(classifier):
    """At rank < p: ``(UΛUᵀ + λI)⁻¹ v`` with Woodbury, its restriction ``U(Λ + λ)⁻¹Uᵀv``
    without; the two differ by exactly ``(v − UUᵀv)/λ``."""
    model, x, y, xt, yt, _ = classifier
    plain = ArnoldiInfluence(model, cross_entropy, REG, rank=5).fit(loader(x, y))
    woodbury = ArnoldiInfluence(model, cross_entropy, REG, rank=5, use_woodbury=True)
    woodbury.fit(loader(x, y))
    assert plain.use_woodbury is False  # pyDVL's default
    state = woodbury.fitted_state()
    vals, vecs = state["eigenvalues"], state["eigenvectors"]
    assert torch.equal(vecs, plain.fitted_state()["eigenvectors"])  # the same seeded Lanczos
    grads = woodbury.per_sample_grads(xt, yt)
    low_rank = vecs @ torch.diag(vals) @ vecs.T + REG * torch.eye(len(vecs), dtype=vecs.dtype)
    expected = torch.linalg.solve(low_rank, grads.T).T
    # a float64 solve with cond = (λ_max + λ)/λ ≲ 1e2
    torch.testing.assert_close(woodbury.influence_factors(xt, yt), expected, rtol=1e-9, atol=1e-12)
    complement = (grads - grads @ vecs @ vecs.T) / REG
    torch.testing.assert_close(
        woodbury.influence_factors(xt, yt) - plain.influence_factors(xt, yt),
        complement,
        rtol=1e-9,
        atol=1e-12,
    )


def test_arnoldi_woodbury_needs_positive_regularization(classifier):
    model = classifier[0]
    ArnoldiInfluence(model, cross_entropy, 0.0, rank=3)  # the plain form allows λ = 0
    with pytest.raises(InvalidRegularizationError, match="use_woodbury=True needs"):
        ArnoldiInfluence(model, cross_entropy, 0.0, rank=3, use_woodbury=True)
    with pytest.raises(InvalidParameterError, match="use_woodbury"):
        ArnoldiInfluence(model, cross_entropy, REG, rank=3, use_woodbury=1)


# -- preconditioners --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make", [lambda: JacobiPreconditioner(3), lambda: NystroemPreconditioner(4)], ids=["J", "N"]
)
def test_preconditioner_fit_signature_and_is_fitted(make):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    matrix = u @ u.T + torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    pre = make()
    assert not pre.is_fitted and pre.regularization is None
    with pytest.raises(NotFittedError):
        pre.solve(torch.ones(8, dtype=torch.float64))
    assert pre.fit(DenseOperator(matrix), 0.5) is pre
    assert pre.is_fitted and pre.regularization == 0.5
    assert not pre.modify_regularization_requires_fit
    rows = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    solved = pre.solve(rows)
    assert solved.shape == rows.shape
    # a vector is one row
    torch.testing.assert_close(pre.solve(rows[0]), solved[0], rtol=1e-14, atol=0)
    # changing λ equals fitting at it (the same seeded draws)
    pre.regularization = 2.0
    refit = make().fit(DenseOperator(matrix), 2.0)
    torch.testing.assert_close(pre.solve(rows), refit.solve(rows), rtol=1e-14, atol=0)
    # None is no regularization, as in pyDVL
    assert make().fit(DenseOperator(matrix)).regularization == 0.0
    with pytest.raises(InvalidRegularizationError):
        make().fit(DenseOperator(matrix), -1.0)
    with pytest.raises(InvalidParameterError, match="apply"):
        make().fit(matrix, 0.5)


@pytest.mark.parametrize(
    "make", [lambda: JacobiPreconditioner(3), lambda: NystroemPreconditioner(4)], ids=["J", "N"]
)
def test_a_hessian_operator_is_fitted_to_without_its_lambda(classifier, make):
    """CgInfluence fits its preconditioner to the training data's HessianOperator: the Hessian
    without the operator's λ (λ is the preconditioner's own argument), as a dense matrix gives."""
    model, x, y, _, _, _ = classifier
    fn = CgInfluence(model, cross_entropy, REG)._fn
    op = HessianOperator(fn, (x, y), None, regularization=5.0)
    dense = op.hessian_matmul(torch.eye(fn.n_parameters, dtype=torch.float64))
    rows = torch.randn(3, fn.n_parameters, generator=torch.Generator().manual_seed(1)).double()
    from_op = make().fit(op, REG).solve(rows)
    from_dense = make().fit(DenseOperator(0.5 * (dense + dense.T)), REG).solve(rows)
    # the same seeded probes of the same matrix; products summed in another order
    torch.testing.assert_close(from_op, from_dense, rtol=1e-9, atol=1e-12)


# -- ranks and Hessian blocks -----------------------------------------------------------------
def test_a_rank_larger_than_a_block_is_reduced_to_the_block(classifier):
    """The rank is one number for every block: a block smaller than it is decomposed (or
    sketched) whole, which is exact, instead of failing or dividing by zero."""
    model, x, y, xt, yt, _ = classifier
    blocks = BlockMode.PARAMETER_WISE  # blocks of 24, 6, 18 and 3 parameters
    direct = DirectInfluence(model, cross_entropy, REG, block_structure=blocks).fit(loader(x, y))
    expected = direct.influence_factors(xt, yt)
    for use_woodbury in (False, True):
        arnoldi = ArnoldiInfluence(
            model, cross_entropy, REG, rank=24, use_woodbury=use_woodbury, block_structure=blocks
        )
        # every block at full rank: exact up to float64 rounding
        torch.testing.assert_close(
            arnoldi.fit(loader(x, y)).influence_factors(xt, yt), expected, rtol=1e-8, atol=1e-11
        )
    pre = NystroemPreconditioner(rank=20)
    cg = CgInfluence(
        model,
        cross_entropy,
        REG,
        rtol=1e-10,
        atol=1e-14,
        preconditioner=pre,
        block_structure=blocks,
    )
    # CG to a 1e-10 relative residual on blocks with cond ≲ 1e3
    torch.testing.assert_close(
        cg.fit(loader(x, y)).influence_factors(xt, yt), expected, rtol=1e-6, atol=1e-9
    )
    assert pre.rank == 20  # each block fits its own copy
