"""Block-diagonal Hessians, the Gauss-Newton modes and DataInf, against closed forms and dense
float64 matrices built independently of the library (full Jacobians and Hessians by autograd)."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from problems import DTYPE, linear_regression, loader, sum_squared_error
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.nn.functional import cross_entropy

from prefect_influence import InfluenceMode
from prefect_influence.errors import (
    FittedStateError,
    InvalidParameterError,
    InvalidRegularizationError,
)
from prefect_influence.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from prefect_influence.torch.util import ModelParameterDictBuilder

# float64 throughout: direct solves agree with the dense reference to rounding (~1e-13 on these
# sizes); iterative methods to their stopping tolerance
EXACT = 1e-10


def _mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (40,), generator=gen)
    xt = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    yt = torch.randint(0, 3, (6,), generator=gen)
    return net, x, y, xt, yt


class _Reference:
    """Dense float64 curvature matrices of ``net`` at its parameters, from autograd alone."""

    def __init__(self, net, loss, x, y):
        self.net, self.loss = net, loss
        self.params = {n: p.detach() for n, p in net.named_parameters()}
        self.theta = torch.cat([p.reshape(-1) for p in self.params.values()])
        self.x, self.y = x, y

    def unflat(self, v):
        out, i = {}, 0
        for n, p in self.params.items():
            out[n] = v[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out

    def sample_loss(self, v, a, b):
        return self.loss(functional_call(self.net, self.unflat(v), (a[None],)), b[None])

    def grads(self, x, y):
        return vmap(grad(self.sample_loss), in_dims=(None, 0, 0))(self.theta, x, y)

    def hessian(self):
        mean = lambda v: vmap(self.sample_loss, in_dims=(None, 0, 0))(v, self.x, self.y).mean()  # noqa: E731
        return torch.func.hessian(mean)(self.theta)

    def gauss_newton(self):
        g = self.grads(self.x, self.y)
        return g.T @ g / len(self.x)

    def generalized_gauss_newton(self):
        outputs = lambda v: functional_call(self.net, self.unflat(v), (self.x,))  # noqa: E731
        jac = jacrev(outputs)(self.theta)
        out_hessian = vmap(hessian(lambda o, t: self.loss(o[None], t[None])))(
            outputs(self.theta).detach(), self.y
        )
        return torch.einsum("nop,noq,nqr->pr", jac, out_hessian, jac) / len(self.x)


def _block_mask(sizes):
    p = sum(sizes)
    mask = torch.zeros(p, p, dtype=torch.bool)
    start = 0
    for size in sizes:
        mask[start : start + size, start : start + size] = True
        start += size
    return mask


SIZES = {
    BlockMode.FULL: [43],
    BlockMode.LAYER_WISE: [25, 18],
    BlockMode.PARAMETER_WISE: [20, 5, 15, 3],
}
MATRICES = {
    SecondOrderMode.HESSIAN: "hessian",
    SecondOrderMode.GAUSS_NEWTON: "gauss_newton",
    SecondOrderMode.GENERALIZED_GAUSS_NEWTON: "generalized_gauss_newton",
}


@pytest.mark.parametrize("mode", list(SecondOrderMode), ids=lambda m: m.value)
@pytest.mark.parametrize("blocks", list(BlockMode), ids=lambda b: b.value)
@pytest.mark.parametrize("method", ["direct", "cg"])
def test_blocks_and_modes_equal_the_dense_block_diagonal_inverse(method, blocks, mode):
    net, x, y, xt, yt = _mlp()
    ref = _Reference(net, cross_entropy, x, y)
    lam = 0.1
    matrix = getattr(ref, MATRICES[mode])()
    damped = torch.where(_block_mask(SIZES[blocks]), matrix, 0.0) + lam * torch.eye(43, dtype=DTYPE)
    expected = ref.grads(xt, yt) @ torch.linalg.solve(damped, ref.grads(x, y).T)
    kwargs = {"rtol": 1e-12, "atol": 1e-14} if method == "cg" else {}
    cls = CgInfluence if method == "cg" else DirectInfluence
    model = cls(net, cross_entropy, lam, block_structure=blocks, second_order_mode=mode, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the indefinite Hessian warns; expected here
        got = model.fit(loader(x, y, 10)).influences(xt, yt, x, y)
    torch.testing.assert_close(got, expected, rtol=EXACT, atol=EXACT * float(expected.abs().max()))


@pytest.mark.parametrize("mode", [SecondOrderMode.GAUSS_NEWTON, "generalized_gauss_newton"])
def test_gauss_newton_modes_converge_for_lissa_and_low_rank(mode):
    """Both Gauss-Newton matrices are PSD: LiSSA converges and low-rank methods of full rank
    are exact, where the indefinite Hessian would need a larger λ."""
    net, x, y, xt, yt = _mlp()
    lam = 0.1
    direct = DirectInfluence(net, cross_entropy, lam, second_order_mode=mode).fit(loader(x, y))
    expected = direct.influences(xt, yt, x, y)
    scale = float(expected.abs().max())
    for model, tol in (
        (ArnoldiInfluence(net, cross_entropy, lam, rank=43, second_order_mode=mode), 1e-8),
        (NystroemSketchInfluence(net, cross_entropy, lam, rank=43, second_order_mode=mode), 1e-6),
        # LiSSA's fixed-point iteration stops at its own residual: 1e-6 relative is its reach
        (
            LissaInfluence(
                net, cross_entropy, lam, maxiter=20000, scale=10, rtol=1e-9, second_order_mode=mode
            ),
            1e-5,
        ),
    ):
        # one batch of all samples: LiSSA then iterates with the whole matrix, not a sample
        got = model.fit(loader(x, y, 40)).influences(xt, yt, x, y)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale)


def test_generalized_gauss_newton_of_a_linear_model_with_squared_loss_is_its_hessian():
    model, x, y, xt, yt = linear_regression()
    fitted = {
        m: DirectInfluence(model, sum_squared_error, 1e-3, second_order_mode=m).fit(loader(x, y))
        for m in (SecondOrderMode.HESSIAN, SecondOrderMode.GENERALIZED_GAUSS_NEWTON)
    }
    a, b = (f.influences(xt, yt, x, y) for f in fitted.values())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_layer_wise_equals_full_where_cross_layer_blocks_vanish():
    """Two linear heads on disjoint inputs with separate squared errors: the Hessian has no
    cross-layer block, so the block-diagonal approximation is exact."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Linear(2, 1), nn.Linear(3, 1)

        def forward(self, x):
            return torch.cat([self.left(x[:, :2]), self.right(x[:, 2:])], dim=1)

    torch.manual_seed(0)
    net = TwoHeads().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(30, 5, generator=gen, dtype=DTYPE),
        torch.randn(30, 2, generator=gen, dtype=DTYPE),
    )
    full = DirectInfluence(net, sum_squared_error, 1e-3).fit(loader(x, y))
    layered = DirectInfluence(net, sum_squared_error, 1e-3, block_structure=BlockMode.LAYER_WISE)
    layered.fit(loader(x, y))
    assert list(layered.parameter_blocks) == ["left", "right"]
    a, b = full.influences(x[:4], y[:4], x, y), layered.influences(x[:4], y[:4], x, y)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", [InfluenceMode.Up, InfluenceMode.Perturbation])
def test_influences_by_block_sum_to_the_influences(mode):
    net, x, y, xt, yt = _mlp()
    blocks = OrderedDict([("first", ["0.weight", "0.bias"]), ("last", ["2.bias", "2.weight"])])
    model = CgInfluence(net, cross_entropy, {"first": 0.1, "last": 0.2}, block_structure=blocks)
    model.fit(loader(x, y))
    by_block = model.influences_by_block(xt, yt, x[:7], y[:7], mode=mode)
    assert list(by_block) == ["first", "last"]
    total = model.influences(xt, yt, x[:7], y[:7], mode=mode)
    torch.testing.assert_close(sum(by_block.values()), total, rtol=1e-12, atol=1e-14)
    factors = model.influence_factors_by_block(xt, yt)
    assert {k: tuple(v.shape) for k, v in factors.items()} == {"first": (6, 25), "last": (6, 18)}
    again = model.influences_from_factors_by_block(factors, x[:7], y[:7], mode=mode)
    for block in by_block:
        torch.testing.assert_close(again[block], by_block[block], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["direct", "ekfac"])
def test_a_full_model_reports_one_block_named_empty(method):
    """EK-FAC splits by layer under its own names; by block it is one block like the rest."""
    net, x, y, xt, yt = _mlp()
    if method == "ekfac":
        model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1)
    else:
        model = DirectInfluence(net, cross_entropy, 0.1)
    model.fit(loader(x, y))
    by_block = model.influences_by_block(xt, yt, x, y)
    assert list(by_block) == [""]
    torch.testing.assert_close(by_block[""], model.influences(xt, yt, x, y))


def test_blocks_fitted_state_round_trips_and_refuses_another_structure():
    net, x, y, xt, yt = _mlp()
    model = DirectInfluence(net, cross_entropy, 0.1, block_structure=BlockMode.PARAMETER_WISE)
    state = model.fit(loader(x, y)).fitted_state()
    restored = DirectInfluence(net, cross_entropy, 0.1, block_structure="parameter_wise")
    restored.load_fitted_state(state)
    assert torch.equal(restored.influences(xt, yt, x, y), model.influences(xt, yt, x, y))
    with pytest.raises(FittedStateError, match="lacks"):
        DirectInfluence(net, cross_entropy, 0.1).load_fitted_state(state)
    with pytest.raises(FittedStateError, match="regularization"):
        DirectInfluence(
            net, cross_entropy, 0.2, block_structure=BlockMode.PARAMETER_WISE
        ).load_fitted_state(state)


def test_datainf_on_one_sample_is_sherman_morrison():
    net, x, y, xt, yt = _mlp()
    ref = _Reference(net, cross_entropy, x[:1], y[:1])
    g, gt = ref.grads(x[:1], y[:1])[0], ref.grads(xt, yt)
    lam = 0.05
    expected = torch.linalg.solve(torch.outer(g, g) + lam * torch.eye(43, dtype=DTYPE), gt.T).T
    model = InverseHarmonicMeanInfluence(net, cross_entropy, lam).fit(loader(x[:1], y[:1]))
    torch.testing.assert_close(model.influence_factors(xt, yt), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("blocks", list(BlockMode), ids=lambda b: b.value)
def test_datainf_is_the_mean_of_the_damped_rank_one_inverses(blocks):
    net, x, y, xt, yt = _mlp()
    ref = _Reference(net, cross_entropy, x, y)
    grads, gt = ref.grads(x, y), ref.grads(xt, yt)
    model = InverseHarmonicMeanInfluence(net, cross_entropy, 0.1, block_structure=blocks)
    got = model.fit(loader(x, y, 7)).influence_factors(xt, yt)  # uneven batches: 7 × 5 + 5
    expected = torch.zeros_like(gt)
    start = 0
    for size in SIZES[blocks]:
        part = slice(start, start + size)
        for g in grads[:, part]:
            damped = torch.outer(g, g) + 0.1 * torch.eye(size, dtype=DTYPE)
            expected[:, part] += torch.linalg.solve(damped, gt[:, part].T).T / len(x)
        start += size
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # the state holds gradients and norms only, so it loads under another λ
    other = InverseHarmonicMeanInfluence(net, cross_entropy, 0.3, block_structure=blocks)
    fresh = InverseHarmonicMeanInfluence(net, cross_entropy, 0.3, block_structure=blocks)
    torch.testing.assert_close(
        other.load_fitted_state(model.fitted_state()).influence_factors(xt, yt),
        fresh.fit(loader(x, y)).influence_factors(xt, yt),
    )


def test_parameter_dict_builder_groups_trainable_parameters():
    net, *_ = _mlp()
    net[0].weight.requires_grad_(False)
    try:
        builder = ModelParameterDictBuilder(net)
        assert list(builder.build_from_block_mode(BlockMode.LAYER_WISE)) == ["0", "2"]
        assert list(builder.build_from_block_mode(BlockMode.LAYER_WISE)["0"]) == ["0.bias"]
        assert list(builder.build_from_block_mode(BlockMode.FULL)[""]) == [
            "0.bias",
            "2.weight",
            "2.bias",
        ]
        params = builder.build_from_block_mode(BlockMode.PARAMETER_WISE)
        assert all(not p.requires_grad for block in params.values() for p in block.values())
    finally:
        net[0].weight.requires_grad_(True)


# -- bad input: refused at construction, before any work ----------------------------------------


def test_unknown_parameter_in_a_block_is_named():
    net, *_ = _mlp()
    with pytest.raises(InvalidParameterError, match=r"'0\.wieght'.*not a parameter"):
        DirectInfluence(net, cross_entropy, 0.1, block_structure={"a": ["0.wieght"]})


def test_parameter_in_two_blocks_is_refused():
    net, *_ = _mlp()
    blocks = {"a": ["0.weight", "0.bias"], "b": ["0.bias"]}
    with pytest.raises(InvalidParameterError, match=r"'0\.bias' is in block 'a' and in block 'b'"):
        CgInfluence(net, cross_entropy, 0.1, block_structure=blocks)


def test_unknown_block_mode_and_second_order_mode_are_refused():
    net, *_ = _mlp()
    with pytest.raises(InvalidParameterError, match="block_structure must be one of"):
        DirectInfluence(net, cross_entropy, 0.1, block_structure="by_row")
    with pytest.raises(InvalidParameterError, match="second_order_mode must be one of"):
        DirectInfluence(net, cross_entropy, 0.1, second_order_mode="fisher")


@pytest.mark.parametrize(
    "regularization, match",
    [
        ({"0": 0.1}, "block '2'.*none was given"),
        ({"0": 0.1, "2": 0.0}, "block '2'.*got 0"),
        ({"0": 0.1, "2": -1.0}, "block '2'.*≥ 0"),
        ({"0": 0.1, "2": 0.1, "3": 0.1}, r"names blocks \['3'\]"),
    ],
)
def test_datainf_needs_a_positive_regularization_for_every_block(regularization, match):
    net, *_ = _mlp()
    with pytest.raises(InvalidRegularizationError, match=match):
        InverseHarmonicMeanInfluence(
            net, cross_entropy, regularization, block_structure=BlockMode.LAYER_WISE
        )


def test_to_moves_a_fitted_model_and_keeps_its_results():
    net, x, y, xt, yt = _mlp()
    model = CgInfluence(net, cross_entropy, 0.1, block_structure=BlockMode.LAYER_WISE)
    before = model.fit(loader(x, y)).influences(xt, yt, x, y)
    assert model.to("cpu") is model and model.is_fitted
    torch.testing.assert_close(model.influences(xt, yt, x, y), before, rtol=1e-10, atol=1e-14)
