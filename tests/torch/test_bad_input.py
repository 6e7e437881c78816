"""Each bad input to an influence model raises a named ValueError subclass with a clear message."""

from __future__ import annotations

import pytest
import torch
from problems import linear_regression, loader, mlp_classifier, sum_squared_error
from torch.nn.functional import cross_entropy

from prefect_influence import (
    EmptyDataError,
    InfluenceInputError,
    InputRankError,
    InvalidParameterError,
    InvalidRankError,
    InvalidRegularizationError,
    NonFiniteError,
    NotFittedError,
    ShapeMismatchError,
    UnsupportedInfluenceModeError,
)
from prefect_influence.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    LissaInfluence,
    NystroemPreconditioner,
    NystroemSketchInfluence,
)


@pytest.fixture(scope="module")
def problem():
    return mlp_classifier()


@pytest.fixture(scope="module")
def fitted(problem):
    model, x, y, _, _ = problem
    return DirectInfluence(model, cross_entropy, 0.1).fit(loader(x, y))


def test_all_errors_are_value_errors():
    for cls in (
        EmptyDataError,
        InputRankError,
        InvalidRankError,
        InvalidRegularizationError,
        NonFiniteError,
        ShapeMismatchError,
        InvalidParameterError,
    ):
        assert issubclass(cls, InfluenceInputError) and issubclass(cls, ValueError)


def test_not_fitted(problem):
    model, x, y, xt, yt = problem
    m = DirectInfluence(model, cross_entropy, 0.1)
    assert not m.is_fitted
    for call in (
        lambda: m.influence_factors(xt, yt),
        lambda: m.influences(xt, yt),
        lambda: m.influences_from_factors(torch.zeros(1, m.n_parameters), x, y),
        lambda: m.fitted_state(),
    ):
        with pytest.raises(NotFittedError, match="fit"):
            call()


def test_length_mismatch(problem, fitted):
    model, x, y, xt, yt = problem
    with pytest.raises(ShapeMismatchError, match="5 samples but y has 4"):
        fitted.influence_factors(xt[:5], yt[:4])
    with pytest.raises(ShapeMismatchError, match="samples but y has"):
        DirectInfluence(model, cross_entropy, 0.1).fit([(x[:10], y[:9])])


def test_empty_data(problem, fitted):
    model, x, y, xt, yt = problem
    with pytest.raises(EmptyDataError, match="no samples"):
        DirectInfluence(model, cross_entropy, 0.1).fit(loader(x[:0], y[:0]))
    with pytest.raises(EmptyDataError, match="no samples"):
        DirectInfluence(model, cross_entropy, 0.1).fit([])
    with pytest.raises(EmptyDataError, match="no samples"):
        fitted.influence_factors(xt[:0], yt[:0])


def test_wrong_input_rank(problem, fitted):
    model, x, y, xt, yt = problem
    with pytest.raises(InputRankError, match="shape"):
        fitted.influence_factors(xt[:, :, None], yt)
    with pytest.raises(InputRankError):
        fitted.influence_factors(xt[0], yt[0])  # one sample without batch dimension
    with pytest.raises(InputRankError, match="cannot be evaluated"):
        DirectInfluence(model, cross_entropy, 0.1).fit([(x[:, :2], y)])
    with pytest.raises(ShapeMismatchError, match=r"shape \(3,\)"):
        fitted.influence_factors(xt[:, :3], yt)


def test_non_finite_inputs_and_loss(problem, fitted):
    model, x, y, xt, yt = problem
    bad = xt.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        fitted.influence_factors(bad, yt)
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteError):
        DirectInfluence(model, cross_entropy, 0.1).fit(
            loader(torch.cat([x, bad]), torch.cat([y, yt]))
        )
    lin, lx, ly, lxt, lyt = linear_regression()  # squared error of huge inputs overflows
    lin_fit = DirectInfluence(lin, sum_squared_error, 0.1).fit(loader(lx, ly))
    with pytest.raises(NonFiniteError, match="gradients"):
        lin_fit.influence_factors(torch.full_like(lxt, 1e200), lyt)


def test_regularization_checks(problem):
    model = problem[0]
    with pytest.raises(InvalidRegularizationError, match="≥ 0"):
        DirectInfluence(model, cross_entropy, -1.0)
    with pytest.raises(InvalidRegularizationError, match="≥ 0"):
        CgInfluence(model, cross_entropy, float("nan"))
    with pytest.raises(InvalidRegularizationError, match="regularization > 0"):
        NystroemSketchInfluence(model, cross_entropy, 0.0, rank=2)


def test_singular_hessian_needs_regularization():
    lin = torch.nn.Linear(3, 1).double().eval()
    x = torch.zeros(10, 3, dtype=torch.float64)  # no curvature along the weights
    y = torch.zeros(10, 1, dtype=torch.float64)
    with pytest.raises(InvalidRegularizationError, match="singular"):
        DirectInfluence(lin, torch.nn.functional.mse_loss, 0.0).fit(loader(x, y))


def test_rank_checks(problem):
    model = problem[0]
    p = sum(q.numel() for q in model.parameters())
    with pytest.raises(
        InvalidRankError, match=f"exceeds the number of trainable parameters \\({p}\\)"
    ):
        ArnoldiInfluence(model, cross_entropy, 0.1, rank=p + 1)
    with pytest.raises(InvalidRankError):
        NystroemSketchInfluence(model, cross_entropy, 0.1, rank=p + 1)
    with pytest.raises(InvalidParameterError, match="rank must be an integer"):
        ArnoldiInfluence(model, cross_entropy, 0.1, rank=0)
    _, x, y, _, _ = problem
    with pytest.raises(InvalidRankError):
        CgInfluence(model, cross_entropy, 0.1, preconditioner=NystroemPreconditioner(p + 1)).fit(
            loader(x, y)
        )


def test_option_checks(problem):
    model = problem[0]
    with pytest.raises(InvalidParameterError, match="maxiter"):
        CgInfluence(model, cross_entropy, 0.1, maxiter=0)
    with pytest.raises(InvalidParameterError, match="both be 0"):
        CgInfluence(model, cross_entropy, 0.1, rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="scale"):
        LissaInfluence(model, cross_entropy, 0.1, scale=0)
    with pytest.raises(InvalidParameterError, match="preconditioner"):
        CgInfluence(model, cross_entropy, 0.1, preconditioner="jacobi")


def test_factor_shape_and_mode(problem, fitted):
    _, x, y, xt, yt = problem
    with pytest.raises(ShapeMismatchError, match=f"\\(n_test, {fitted.n_parameters}\\)"):
        fitted.influences_from_factors(torch.zeros(2, 3), x, y)
    with pytest.raises(UnsupportedInfluenceModeError, match="Up"):
        fitted.influences(xt, yt, x, y, mode="sideways")
    with pytest.raises(InfluenceInputError, match="y is missing"):
        fitted.influences(xt, yt, x)


def test_one_shot_iterators_are_refused_before_a_silently_empty_second_pass(problem):
    """fit() reads the data more than once (count, then fit): a generator would be empty on the
    second pass, which made Direct's Hessian zero (factors = gradients / λ) without an error."""
    model, x, y, _, _ = problem
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, len(x), 10)]
    for one_shot in ((b for b in batches), iter(batches), zip([x], [y])):
        with pytest.raises(InfluenceInputError, match="one-shot iterator"):
            DirectInfluence(model, cross_entropy, 0.1).fit(one_shot)


def test_data_that_changes_between_passes_is_refused(problem):
    model, x, y, _, _ = problem

    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            n = len(x) if self.passes == 1 else len(x) // 2
            return iter([(x[:n], y[:n])])

    with pytest.raises(InfluenceInputError, match="on its first pass and"):
        DirectInfluence(model, cross_entropy, 0.1).fit(Shrinking())


def test_fit_leaves_a_train_mode_models_buffers_alone():
    """Fitting runs the user's model (the input probe, the fit's own passes); in train mode
    those forward passes update BatchNorm's running statistics, whether the fit then succeeds
    or fails (torch.func refuses train-mode batch norm)."""
    import warnings

    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Conv2d(1, 2, 3),
            torch.nn.BatchNorm2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 3),
        )
        .double()
        .train()
    )
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    before = {n: b.clone() for n, b in net.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning is expected here
        model = DirectInfluence(net, cross_entropy, 1.0)
    try:
        model.fit([(x, y)])
    except Exception:
        pass  # whether a train-mode model can be fitted is not the point here
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name]), name
