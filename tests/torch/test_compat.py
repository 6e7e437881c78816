"""pyDVL's helpers (Hessian-vector product closures, spectral approximation, structure alignment),
datasets in pyDVL's forms as dask arrays, and pyDVL's module paths and error names."""

from __future__ import annotations

import importlib
import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prefect_influence.errors import (
    EmptyDataError,
    InfluenceInputError,
    InputRankError,
    InvalidParameterError,
    InvalidRankError,
    NotFittedError,
    NotFittedException,
    NotImplementedLayerRepresentationException,
    ShapeMismatchError,
    TorchLinalgEighException,
    UnsupportedInfluenceModeError,
    UnsupportedInfluenceModeException,
)
from prefect_influence.torch.compat import (
    LowRankProductRepresentation,
    MatrixOperator,
    align_structure,
    align_with_model,
    create_batch_hvp_function,
    create_hvp_function,
    flatten_dimensions,
    get_model_parameters,
    hvp,
    operator_spectral_approximation,
    reshape_vector_to_tensors,
    safe_torch_linalg_eigh,
)
from prefect_influence.torch.util import torch_dataset_to_dask_array

DTYPE = torch.float64

# Hessian-vector products in float64 of a linear model: sums of O(1) products over 40 samples,
# a few ulps (≈1e-15) relative each; rtol=1e-10 leaves a wide margin and still catches a wrong
# weight, a missing batch or a transposed block.
RTOL, ATOL = 1e-10, 1e-12


# -- a linear model with an analytic Hessian -----------------------------------------------------


def linear_problem(n=40, d=3, m=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, m).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(torch.randn(m, d, generator=gen, dtype=DTYPE))
        model.bias.copy_(torch.randn(m, generator=gen, dtype=DTYPE))
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    y = torch.randn(n, m, generator=gen, dtype=DTYPE)
    return model, x, y


def mse_hessian(x: torch.Tensor, m: int) -> torch.Tensor:
    """Hessian of ``mse_loss(W x + b, y)`` (mean over the n·m entries) in ``(vec W, b)``, W
    row-major: ``2/(n·m)`` times ``I_m ⊗ [[XᵀX, Xᵀ1], [1ᵀX, n]]``, rearranged into that order."""
    n, d = x.shape
    c = 2.0 / (n * m)
    eye = torch.eye(m, dtype=x.dtype)
    col = x.sum(dim=0).reshape(d, 1)
    h = torch.zeros(m * d + m, m * d + m, dtype=x.dtype)
    h[: m * d, : m * d] = c * torch.kron(eye, x.T @ x)
    h[: m * d, m * d :] = c * torch.kron(eye, col)
    h[m * d :, : m * d] = h[: m * d, m * d :].T
    h[m * d :, m * d :] = c * n * eye
    return h


@pytest.fixture(scope="module")
def linear():
    model, x, y = linear_problem()
    return model, x, y, mse_hessian(x, 2)


def vectors(p: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- Hessian-vector products ----------------------------------------------------------------------


@pytest.mark.parametrize("precompute_grad", [True, False])
@pytest.mark.parametrize("use_average", [True, False])
@pytest.mark.parametrize("reverse_only", [True, False])
def test_hvp_function_is_the_hessian_of_the_mean_loss(
    linear, precompute_grad, use_average, reverse_only
):
    model, x, y, h = linear
    # uneven batches (16, 16, 8): each batch's mean loss weighs by its size, so the product is
    # the Hessian of the mean over all 40 samples
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    product = create_hvp_function(
        model,
        mse_loss,
        loader,
        precompute_grad=precompute_grad,
        use_average=use_average,
        reverse_only=reverse_only,
    )
    v = vectors(h.shape[0], 3)
    one = product(v[0])
    assert one.shape == (h.shape[0],) and not one.requires_grad
    torch.testing.assert_close(one, h @ v[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(product(v), v @ h, rtol=RTOL, atol=ATOL)  # rows, k × p
    as_dict = align_structure(get_model_parameters(model), v[1])
    torch.testing.assert_close(product(as_dict), h @ v[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reverse_only", [True, False])
def test_batch_hvp_function_is_the_hessian_of_one_batch(linear, reverse_only):
    model, x, y, _ = linear
    params = get_model_parameters(model)
    batch_hvp = create_batch_hvp_function(model, mse_loss, reverse_only=reverse_only)
    h = mse_hessian(x[:10], 2)
    v = vectors(h.shape[0], 2)
    torch.testing.assert_close(
        batch_hvp(params, x[:10], y[:10], v[0]), h @ v[0], rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(batch_hvp(params, x[:10], y[:10], v), v @ h, rtol=RTOL, atol=ATOL)
    # only the weight: the top-left block of the Hessian
    weight = {"weight": params["weight"]}
    torch.testing.assert_close(
        batch_hvp(weight, x[:10], y[:10], v[0, :6]), h[:6, :6] @ v[0, :6], rtol=RTOL, atol=ATOL
    )


def test_hvp_of_a_quadratic():
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DTYPE)

    def f(p):
        z = p["z"]
        return 0.5 * z @ a @ z

    params = {"z": torch.tensor([0.3, -1.0], dtype=DTYPE)}
    v = {"z": torch.tensor([1.0, 2.0], dtype=DTYPE)}
    for reverse_only in (True, False):
        torch.testing.assert_close(hvp(f, params, v, reverse_only)["z"], a @ v["z"])


def test_tracked_products_are_differentiable():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    x, y = torch.randn(10, 3, dtype=DTYPE), torch.randn(10, 1, dtype=DTYPE)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    v = vectors(21, 1)[0]
    for precompute_grad in (True, False):
        tracked = create_hvp_function(
            net, mse_loss, data, precompute_grad=precompute_grad, track_gradients=True
        )(v)
        assert tracked.requires_grad  # a tanh network's Hessian depends on its parameters
        grads = torch.autograd.grad(tracked.sum(), list(net.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_hvp_functions_leave_the_model_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DTYPE).train()
    x, y = torch.randn(12, 3, dtype=DTYPE), torch.randn(12, 1, dtype=DTYPE)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    v = vectors(sum(p.numel() for p in net.parameters()), 1)[0]
    # two batches: the second one's forward pass must not change what the first one's saved
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    results = []
    for precompute_grad in (True, False):
        for use_average in (True, False):
            for reverse_only in (True, False):
                results.append(
                    create_hvp_function(
                        net,
                        mse_loss,
                        data,
                        precompute_grad=precompute_grad,
                        use_average=use_average,
                        reverse_only=reverse_only,
                    )(v)
                )
    create_batch_hvp_function(net, mse_loss)(get_model_parameters(net), x, y, v)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    for r in results[1:]:  # the same Hessian by every path, up to float64 rounding
        torch.testing.assert_close(r, results[0], rtol=RTOL, atol=ATOL)


def test_hvp_function_errors(linear):
    model, x, y, h = linear
    p = h.shape[0]
    with pytest.raises(EmptyDataError, match="no samples"):
        create_hvp_function(model, mse_loss, [])
    once = create_hvp_function(model, mse_loss, ((x, y) for _ in range(1)), precompute_grad=False)
    once(torch.zeros(p, dtype=DTYPE))
    with pytest.raises(EmptyDataError, match="generator"):  # exhausted by the first product
        once(torch.zeros(p, dtype=DTYPE))
    with pytest.raises(InfluenceInputError, match=r"\(x, y\) pairs"):
        create_hvp_function(model, mse_loss, [x])
    product = create_hvp_function(model, mse_loss, [(x, y)])
    with pytest.raises(ShapeMismatchError, match=f"{p} trainable"):
        product(torch.zeros(p + 1, dtype=DTYPE))
    with pytest.raises(InputRankError):
        product(torch.zeros(1, 1, p, dtype=DTYPE))
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        create_hvp_function(frozen, mse_loss, [(x, y)])


# -- spectral approximation -------------------------------------------------------------------------


def symmetric_matrix(p=40, seed=0, dtype=DTYPE):
    """``Q diag(λ) Qᵀ`` with four well separated dominant eigenvalues (one negative) and the rest
    in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=DTYPE))
    values = torch.cat(
        [
            torch.tensor([10.0, -8.0, 6.0, 4.5], dtype=DTYPE),
            torch.rand(p - 4, generator=gen, dtype=DTYPE),
        ]
    )
    return ((q * values) @ q.T).to(dtype)


def test_spectral_approximation_finds_the_dominant_eigenpairs():
    h = symmetric_matrix()
    approx = operator_spectral_approximation(MatrixOperator(h), rank=4, tol=1e-12, torch_seed=0)
    assert isinstance(approx, LowRankProductRepresentation)
    assert approx.eigen_vals.shape == (4,) and approx.projections.shape == (40, 4)
    values, vecs = torch.linalg.eigh(h)
    top = torch.argsort(values.abs(), descending=True)[:4]
    # ARPACK converged to tol=1e-12 on eigenvalues separated by ≥ 1.5: agreement to ~1e-10
    torch.testing.assert_close(approx.eigen_vals, values[top], rtol=1e-9, atol=1e-10)
    overlap = (approx.projections.T @ vecs[:, top]).abs()  # eigenvectors up to their sign
    torch.testing.assert_close(overlap, torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-8)
    low_rank = approx.projections @ torch.diag(approx.eigen_vals) @ approx.projections.T
    reference = vecs[:, top] @ torch.diag(values[top]) @ vecs[:, top].T
    torch.testing.assert_close(low_rank, reference, rtol=0, atol=1e-8)


def test_spectral_approximation_dtype_seed_and_sizes():
    h32 = symmetric_matrix(dtype=torch.float32)
    a = operator_spectral_approximation(MatrixOperator(h32), rank=3, torch_seed=5)
    b = operator_spectral_approximation(h32, rank=3, torch_seed=5)  # a tensor is an operator
    assert a.dtype == torch.float32 and a.eigen_vals.dtype == torch.float32
    assert torch.equal(a.eigen_vals, b.eigen_vals) and torch.equal(a.projections, b.projections)
    # float32 products, ARPACK in float64: eigenvalues of size ~10 to a few float32 ulps
    torch.testing.assert_close(a.eigen_vals, torch.tensor([10.0, -8.0, 6.0]), rtol=1e-5, atol=1e-5)

    five = operator_spectral_approximation(symmetric_matrix(p=5), rank=10)
    assert five.eigen_vals.shape == (4,)  # ARPACK's limit p - 1, as in pyDVL
    single = operator_spectral_approximation(MatrixOperator(torch.tensor([[2.5]])))
    assert torch.equal(single.eigen_vals, torch.tensor([2.5]))
    assert torch.equal(single.projections, torch.ones(1, 1))
    assert single.to("cpu").device == torch.device("cpu")


def test_spectral_approximation_warns_when_arpack_stops_early():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(200, 200, generator=gen, dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="ARPACK did not converge"):
        approx = operator_spectral_approximation(
            m + m.T, rank=10, tol=0, max_iter=1, krylov_dimension=21, torch_seed=0
        )
    assert approx.eigen_vals.shape[0] < 10


def test_spectral_approximation_errors():
    op = MatrixOperator(symmetric_matrix(p=6))
    with pytest.raises(InvalidRankError, match="rank"):
        operator_spectral_approximation(op, rank=0)
    with pytest.raises(InvalidParameterError, match="krylov_dimension"):
        operator_spectral_approximation(op, rank=3, krylov_dimension=3)
    with pytest.raises(InvalidParameterError, match="tol"):
        operator_spectral_approximation(op, tol=-1.0)
    with pytest.raises(InvalidParameterError, match="max_iter"):
        operator_spectral_approximation(op, max_iter=0)
    with pytest.raises(InfluenceInputError, match="input_size"):
        operator_spectral_approximation(object())
    with pytest.raises(ShapeMismatchError, match="square"):
        operator_spectral_approximation(torch.ones(3, 4))
    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match="eigen_computation_on_gpu=False"):
            operator_spectral_approximation(op, rank=2, eigen_computation_on_gpu=True)


def test_matrix_operator():
    m = torch.arange(6.0, dtype=DTYPE).reshape(2, 3)
    op = MatrixOperator(m)
    assert op.input_size == 3 and op.dtype == DTYPE and op.to("cpu") is op
    v = torch.tensor([1.0, -1.0, 2.0], dtype=DTYPE)
    torch.testing.assert_close(op.apply(v), m @ v)
    torch.testing.assert_close(op.apply(torch.stack([v, 2 * v])), torch.stack([m @ v, 2 * m @ v]))
    with pytest.raises(ShapeMismatchError, match="3 numbers"):
        op.apply(torch.ones(2, dtype=DTYPE))
    with pytest.raises(InputRankError):
        op.apply(torch.ones(1, 1, 3, dtype=DTYPE))
    with pytest.raises(InputRankError, match="2-D"):
        MatrixOperator(torch.ones(3))


# -- structures ---------------------------------------------------------------------------------


def source():
    return {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def test_align_structure_accepts_the_three_forms():
    flat = torch.arange(10.0)
    aligned = align_structure(source(), flat)
    assert list(aligned) == ["a", "b"]
    assert torch.equal(aligned["a"], flat[:6].reshape(2, 3)) and torch.equal(aligned["b"], flat[6:])
    for target in ((torch.ones(2, 3), torch.ones(4)), [torch.ones(2, 3), torch.ones(4)]):
        assert [t.shape for t in align_structure(source(), target).values()] == [(2, 3), (4,)]
    same = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    assert align_structure(source(), same) == same


@pytest.mark.parametrize(
    "target, error, message",
    [
        ({"a": torch.ones(2, 3), "c": torch.ones(4)}, ShapeMismatchError, r"missing \['b'\]"),
        ({"b": torch.ones(4), "a": torch.ones(2, 3)}, ShapeMismatchError, "order"),
        ({"a": torch.ones(2, 3), "b": torch.ones(5)}, ShapeMismatchError, r"at \['b'\]"),
        ((torch.ones(2, 3),), ShapeMismatchError, "tuple"),
        (torch.ones(11), ShapeMismatchError, "hold 10 numbers"),
        (torch.ones(2, 5), InputRankError, "1-D"),
        ("unsupported", InfluenceInputError, "got str"),
    ],
)
def test_align_structure_errors(target, error, message):
    with pytest.raises(error, match=message):
        align_structure(source(), target)
    with pytest.raises(ValueError):  # pyDVL raises ValueError; ours are ValueErrors too
        align_structure(source(), target)


def test_flatten_reshape_and_model_alignment():
    tensors = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]])]
    assert torch.equal(flatten_dimensions(tensors), torch.arange(1, 9))
    assert torch.equal(
        flatten_dimensions(tensors, shape=(2, 2), concat_at=0), torch.arange(1, 9).reshape(4, 2)
    )
    with pytest.raises(EmptyDataError):
        flatten_dimensions([])
    pieces = reshape_vector_to_tensors(torch.arange(7.0), [(2, 2), (3,)])
    assert [p.shape for p in pieces] == [(2, 2), (3,)]
    model = nn.Linear(2, 3)
    model.bias.requires_grad_(False)
    aligned = align_with_model(torch.zeros(6), model)  # trainable parameters only
    assert list(aligned) == ["weight"] and aligned["weight"].shape == (3, 2)
    assert list(get_model_parameters(model, require_grad_only=False)) == ["weight", "bias"]
    assert get_model_parameters(model, detach=False)["weight"] is model.weight


def test_safe_eigh(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=DTYPE)
    a = a @ a.T
    values, vecs = safe_torch_linalg_eigh(a)
    expected_values, expected_vecs = torch.linalg.eigh(a)
    assert torch.equal(values, expected_values) and torch.equal(vecs, expected_vecs)

    def failing(*args, **kwargs):
        raise RuntimeError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(TorchLinalgEighException, match="failed to converge") as caught:
        safe_torch_linalg_eigh(a)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "92141" in str(pickle.loads(pickle.dumps(caught.value)))


# -- datasets in pyDVL's forms ----------------------------------------------------------------------


class NoLength(Dataset):
    """(x, y) pairs without ``__len__``; ``IndexError`` past the end; counts item reads."""

    def __init__(self, n=11):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=gen)
        self.y = torch.randn(n, generator=gen)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_dataset_without_len_is_counted(caplog):
    data = NoLength()
    with caplog.at_level(logging.WARNING, logger="prefect_influence.torch.util"):
        da_x, da_y = torch_dataset_to_dask_array(data, chunk_size=4)
    assert "no len()" in caplog.text
    assert da_x.shape == (11, 2) and da_x.chunks[0] == (4, 4, 3)
    np.testing.assert_array_equal(da_x.compute(scheduler="synchronous"), data.x.numpy())
    np.testing.assert_array_equal(da_y.compute(scheduler="synchronous"), data.y.numpy())

    data = NoLength()
    da_x, _ = torch_dataset_to_dask_array(data, chunk_size=4, total_size=7)
    assert data.reads == 1 and da_x.shape == (7, 2)  # no counting with total_size
    np.testing.assert_array_equal(da_x.compute(scheduler="synchronous"), data.x[:7].numpy())


def test_one_tensor_dataset_gives_a_one_tuple():
    x = torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(0))
    for data in (TensorDataset(x), list(x)):  # 1-tuples, and bare tensors
        arrays = torch_dataset_to_dask_array(data, chunk_size=4)
        assert isinstance(arrays, tuple) and len(arrays) == 1
        assert arrays[0].shape == (10, 3, 2) and arrays[0].chunks == ((4, 4, 2), (3,), (2,))
        np.testing.assert_array_equal(arrays[0].compute(scheduler="synchronous"), x.numpy())
    with pytest.raises(InvalidParameterError, match="total_size"):
        torch_dataset_to_dask_array(TensorDataset(x), chunk_size=4, total_size=11)


def test_dataset_of_three_parts():
    x = torch.randn(5, 2, dtype=DTYPE)
    w = torch.rand(5, dtype=DTYPE)
    labels = torch.arange(5)
    da_x, da_w, da_l = torch_dataset_to_dask_array(TensorDataset(x, w, labels), chunk_size=2)
    assert (da_x.dtype, da_w.dtype, da_l.dtype) == (np.float32, np.float32, np.int64)
    np.testing.assert_array_equal(da_l.compute(scheduler="synchronous"), labels.numpy())


def test_dataset_part_errors():
    ragged = [(torch.ones(2), torch.ones(1)), (torch.ones(2),)]
    (da_x, _) = torch_dataset_to_dask_array(ragged, chunk_size=2)
    with pytest.raises(ShapeMismatchError, match="1 part"):
        da_x.compute(scheduler="synchronous")
    uneven = [torch.ones(2), torch.ones(3)]
    (da_x,) = torch_dataset_to_dask_array(uneven, chunk_size=2)
    with pytest.raises(ShapeMismatchError, match="different shapes"):
        da_x.compute(scheduler="synchronous")
    with pytest.raises(InfluenceInputError, match="cannot be indexed"):
        torch_dataset_to_dask_array(iter([1, 2]), chunk_size=2)
    with pytest.raises(EmptyDataError):
        torch_dataset_to_dask_array(NoLength(n=0), chunk_size=2)


# -- pyDVL's names ----------------------------------------------------------------------------------


def test_pydvl_error_names():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, RuntimeError)
    assert NotFittedException is NotFittedError
    assert UnsupportedInfluenceModeException is UnsupportedInfluenceModeError
    assert issubclass(NotImplementedLayerRepresentationException, InfluenceInputError)
    assert issubclass(NotImplementedLayerRepresentationException, ValueError)


@pytest.mark.parametrize(
    "alias, names, origin",
    [
        ("types", ["InfluenceMode", "UnsupportedInfluenceModeException"], None),
        (
            "base_influence_function_model",
            ["InfluenceFunctionModel", "NotImplementedLayerRepresentationException"],
            None,
        ),
        (
            "influence_calculator",
            [
                "DaskInfluenceCalculator",
                "SequentialInfluenceCalculator",
                "DisableClientSingleThreadCheck",
                "InvalidDimensionChunksError",
                "UnalignedChunksError",
                "ThreadSafetyViolationError",
            ],
            None,
        ),
        ("torch.influence_function_model", None, "torch"),
        ("torch.preconditioner", None, "torch.preconditioners"),
        (
            "torch.util",
            ["BlockMode", "SecondOrderMode", "ModelParameterDictBuilder", "align_structure"],
            None,
        ),
    ],
)
def test_pydvl_module_paths(alias, names, origin):
    module = importlib.import_module(f"prefect_influence.{alias}")
    if origin is not None:  # every name of the original module, the same objects
        original = importlib.import_module(f"prefect_influence.{origin}")
        names = list(original.__all__)
        assert module.__all__ == names
        assert all(getattr(module, n) is getattr(original, n) for n in names)
    assert all(n in module.__all__ and hasattr(module, n) for n in names)
