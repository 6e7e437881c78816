"""Every computing method under a budget of a few gradients (so inputs go in many chunks) gives
the results of the default budget (one chunk), and a large call's peak memory follows the budget,
not the size of its input."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from problems import DTYPE, loader, mlp_classifier
from torch import nn
from torch.nn.functional import cross_entropy

from prefect_influence import InfluenceMode
from prefect_influence.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    TorchInfluenceFunctionModel,
)

REG = 0.1
# LiSSA's λ: H + λI then has eigenvalues in [0.999, 1.389], a contraction of 0.43 per iteration
LISSA_REG = 1.0
# iterative solvers stop at this relative residual (CG) or relative change (LiSSA)
RTOL = 1e-10
# Chunking only regroups rows in matrix products (other BLAS blocking, other summation order);
# in float64 on p = 51 parameters that moves an entry by ~1e-15 of the largest entry (observed
# ≤ 1e-15), so 1e-12 is float rounding with a wide margin.
ROUNDING = 1e-12
# the tiny budget: this many gradients' worth of bytes, with no floor on the rows of a chunk
BUDGET_GRADIENTS = 8


@pytest.fixture(scope="module")
def problem():
    model, x, y, xt, yt = mlp_classifier(n_train=24, n_test=5)
    # H + λI of this problem has eigenvalues in [0.0986, 0.489] at λ = 0.1 (condition ≈ 5)
    eigenvalues = torch.linalg.eigvalsh(
        DirectInfluence(model, cross_entropy, REG).fit(loader(x, y)).hessian
    )
    return model, x, y, xt, yt, eigenvalues


def _methods(model, eigenvalues):
    largest = float(eigenvalues.max())
    return {
        "direct": DirectInfluence(model, cross_entropy, REG),
        "direct-layer-wise": DirectInfluence(
            model, cross_entropy, REG, block_structure=BlockMode.LAYER_WISE
        ),
        "cg": CgInfluence(model, cross_entropy, REG, rtol=RTOL, atol=1e-14),
        "block-cg": CgInfluence(
            model, cross_entropy, REG, rtol=RTOL, atol=1e-14, solve_simultaneously=True
        ),
        # scale above the largest eigenvalue of H + λI, for a contraction of 1 − λ_min/scale
        "lissa": LissaInfluence(
            model,
            cross_entropy,
            LISSA_REG,
            maxiter=5000,
            rtol=RTOL,
            scale=1.25 * (largest + LISSA_REG - REG),
        ),
        "arnoldi": ArnoldiInfluence(model, cross_entropy, REG, rank=10),
        "arnoldi-woodbury": ArnoldiInfluence(model, cross_entropy, REG, rank=10, use_woodbury=True),
        "nystroem": NystroemSketchInfluence(model, cross_entropy, REG, rank=10),
        "datainf-layer-wise": InverseHarmonicMeanInfluence(
            model, cross_entropy, REG, block_structure=BlockMode.LAYER_WISE
        ),
    }


def _factor_error(name, method, rhs, factors, eigenvalues):
    """Per row, a bound on ``‖f − f'‖`` between two converged solves of the same right-hand side
    (0 for the direct methods, whose rows are solved independently)."""
    norms = rhs.norm(dim=1)
    if name in ("cg", "block-cg"):
        # each solve ends with ‖b − A f‖ ≤ max(rtol·‖b‖, atol), so ‖f − A⁻¹b‖ ≤ that / λ_min;
        # twice for the two solves, twice again for the recurrence's residual drifting from the
        # true one in rounding. One CG per row only sees the products' rounding change (observed
        # ~1e-13 relative) but CG amplifies it, so it gets the same solver bound.
        residual = torch.clamp(method.rtol * norms, min=method.atol)
        return 4 * residual / float(eigenvalues.abs().min())
    if name == "lissa":
        # it stops once every row's step is ≤ rtol·‖h‖; with contraction ρ = max|1 − λ/scale|
        # the remaining error is ≤ ρ/(1 − ρ) times the step; twice for the two solves, twice
        # again as a margin
        shifted = eigenvalues + method.regularization - REG
        rho = float((1 - shifted / method.scale).abs().max())
        return 4 * rho / (1 - rho) * method.rtol * factors.norm(dim=1)
    return torch.zeros_like(norms)


def _assert_close(expected, actual, slack=0.0):
    """Entrywise ``|expected − actual| ≤ rounding + slack`` (slack broadcast against them)."""
    tolerance = ROUNDING * float(expected.abs().max()) + slack
    excess = (actual - expected).abs() - tolerance
    assert bool((excess <= 0).all()), f"exceeds the tolerance by up to {float(excess.max()):.3g}"


def _counting(model, monkeypatch):
    """Counts the solves, gradient chunks and mixed-product chunks ``model`` goes through."""
    calls = collections.Counter()
    for owner, name in (
        (model, "_apply_whole"),
        (model._fn, "per_sample_grads"),
        (model._fn, "mixed_products"),
    ):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def _everything(model, x, y, xt, yt, calls, factors):
    """Every computing method's result, and whether each went in more than one chunk
    (``influences_from_factors`` of the given ``factors``)."""
    chunked = {}

    def run(key, counter, fn, whole=1):
        # ``whole``: the calls of ``counter`` the method makes when it goes in one chunk
        before = calls[counter]
        result = fn()
        chunked[key] = calls[counter] - before > whole
        return result

    up, pert = InfluenceMode.Up, InfluenceMode.Perturbation
    train_grads = model.per_sample_grads(x, y)
    results = {
        "influence_factors": run(
            "influence_factors", "_apply_whole", lambda: model.influence_factors(xt, yt)
        ),
        "influences_up": run(
            "influences_up", "per_sample_grads", lambda: model.influences(xt, yt, x, y, up), 2
        ),
        "influences_perturbation": run(
            "influences_perturbation",
            "mixed_products",
            lambda: model.influences(xt, yt, x, y, pert),
        ),
        "self_influences": run(
            "self_influences", "_apply_whole", lambda: model.self_influences(x, y)
        ),
        "factors_from_grads": run(
            "factors_from_grads", "_apply_whole", lambda: model.factors_from_grads(train_grads[:6])
        ),
        "influences_by_block": run(
            "influences_by_block",
            "per_sample_grads",
            lambda: model.influences_by_block(xt, yt, x, y),
            2,
        ),
    }
    results["from_factors_up"] = run(
        "from_factors_up",
        "per_sample_grads",
        lambda: model.influences_from_factors(factors, x, y, up),
    )
    results["from_factors_perturbation"] = run(
        "from_factors_perturbation",
        "mixed_products",
        lambda: model.influences_from_factors(factors, x, y, pert),
    )
    return results, chunked


@pytest.mark.parametrize(
    "name",
    [
        "direct",
        "direct-layer-wise",
        "cg",
        "block-cg",
        "lissa",
        "arnoldi",
        "arnoldi-woodbury",
        "nystroem",
        "datainf-layer-wise",
    ],
)
def test_a_budget_of_a_few_gradients_gives_the_results_of_one_chunk(problem, name, monkeypatch):
    model, x, y, xt, yt, eigenvalues = problem
    loaders = {"lissa": loader(x, y, batch_size=len(x))}  # full batches: deterministic LiSSA
    method = _methods(model, eigenvalues)[name]
    method.fit(loaders.get(name, loader(x, y)))
    calls = _counting(method, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every solve converges
        # one set of factors for influences_from_factors under both budgets, so that there only
        # the training side's chunking differs
        factors = method.influence_factors(xt, yt)
        whole, whole_chunked = _everything(method, x, y, xt, yt, calls, factors)
        assert not any(whole_chunked.values()), whole_chunked
        # one chunk is one solve of all rows, as without chunking
        test_grads = method.per_sample_grads(xt, yt)
        assert torch.equal(whole["influence_factors"], method._apply_whole(test_grads))
        method.memory_budget_bytes = BUDGET_GRADIENTS * method.n_parameters * DTYPE.itemsize
        method._min_chunk_rows = 1
        tiny, tiny_chunked = _everything(method, x, y, xt, yt, calls, factors)
    assert all(tiny_chunked.values()), tiny_chunked

    train_grads = method.per_sample_grads(x, y)
    # ‖∂g/∂x_j‖_F of each training sample's gradient, which bounds how far a factor error moves
    # its Perturbation influences: the mixed products of the identity's rows
    identity = torch.eye(method.n_parameters, dtype=DTYPE)
    jacobians = method._fn.mixed_products(identity, x, y).transpose(0, 1).flatten(1).norm(dim=1)
    test_error = _factor_error(name, method, test_grads, whole["influence_factors"], eigenvalues)
    train_factors = whole["factors_from_grads"]
    six_error = _factor_error(name, method, train_grads[:6], train_factors, eigenvalues)
    self_factors = method.factors_from_grads(train_grads)
    self_error = _factor_error(name, method, train_grads, self_factors, eigenvalues)
    up_slack = test_error[:, None] * train_grads.norm(dim=1)[None, :]
    pert_slack = (test_error[:, None] * jacobians[None, :])[:, :, None]

    _assert_close(whole["influence_factors"], tiny["influence_factors"], test_error[:, None])
    _assert_close(whole["influences_up"], tiny["influences_up"], up_slack)
    _assert_close(whole["influences_perturbation"], tiny["influences_perturbation"], pert_slack)
    _assert_close(
        whole["self_influences"], tiny["self_influences"], self_error * train_grads.norm(dim=1)
    )
    _assert_close(whole["factors_from_grads"], tiny["factors_from_grads"], six_error[:, None])
    assert list(whole["influences_by_block"]) == list(tiny["influences_by_block"])
    for block, expected in whole["influences_by_block"].items():
        _assert_close(expected, tiny["influences_by_block"][block], up_slack)
    # the same factors under both budgets: rounding only
    _assert_close(whole["from_factors_up"], tiny["from_factors_up"])
    _assert_close(whole["from_factors_perturbation"], tiny["from_factors_perturbation"])


def test_the_budget_is_per_instance_and_the_old_name_is_a_deprecated_alias(problem):
    model, x, y, *_ = problem
    method = DirectInfluence(model, cross_entropy, REG)
    assert TorchInfluenceFunctionModel.memory_budget_bytes == 256 * 2**20
    with pytest.warns(DeprecationWarning, match="memory_budget_bytes"):
        assert method.self_influence_budget_bytes == 256 * 2**20
    with pytest.warns(DeprecationWarning, match="memory_budget_bytes"):
        method.self_influence_budget_bytes = 2**20
    assert method.memory_budget_bytes == 2**20
    assert TorchInfluenceFunctionModel.memory_budget_bytes == 256 * 2**20


def test_a_chunk_holds_at_least_64_rows_only_while_they_take_at_most_4_mib():
    small = DirectInfluence(nn.Linear(3, 2).to(DTYPE).eval(), cross_entropy, REG)
    small.memory_budget_bytes = 1
    assert small._rows_per_chunk(3.0) == 64
    # 3 copies of 198,450 float32 parameters take 2.4 MB a row: one row fits 4 MiB, two do not
    large = ArnoldiInfluence(_large_network(), cross_entropy, REG, rank=2)
    large.memory_budget_bytes = 1
    assert large._rows_per_chunk(3.0) == 1
    large.memory_budget_bytes = 32 * 2**20
    assert large._rows_per_chunk(3.0) == 32 * 2**20 // (3 * 198_450 * 4)


def _large_network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(440, 440), nn.Tanh(), nn.Linear(440, 10)).eval()


# Run in a fresh interpreter, so that the peak resident set size is this test's; prints JSON.
MEASURE = textwrap.dedent(
    """
    import ctypes, gc, json, resource, sys
    import torch
    from torch import nn
    from prefect_influence.torch import ArnoldiInfluence, EkfacInfluence

    n, budget, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def measured(call):
        gc.collect()
        try:  # hand back what glibc kept of freed memory, so that no call reuses another's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # reset the peak to the present, so that it is this call's (Linux ≥ 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # the earlier peak then counts too: an overestimate
        before = resident()
        call()
        return high_water() - before

    def high_water():
        # VmHWM, this process's own peak (reset by clear_refs); ru_maxrss would also count the
        # RSS of the process this one was forked from (a large pytest process)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(440, 440), nn.Tanh(), nn.Linear(440, 10)).eval()
    x, y = torch.randn(n, 440), torch.randint(0, 10, (n,))
    if method == "ekfac":  # self-influences and scores layer by layer, never flat gradients
        model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1)
    else:
        model = ArnoldiInfluence(
            net, nn.functional.cross_entropy, 0.1, rank=4, krylov_dimension=8
        )
    model.fit([(x[:64], y[:64])])
    model.memory_budget_bytes = budget
    factors = model.influence_factors(x[:4], y[:4])
    growth = {
        "self_influences": measured(lambda: model.self_influences(x, y)),
        "influences_from_factors": measured(lambda: model.influences_from_factors(factors, x, y)),
    }
    if method == "ekfac":  # 2,000 rows of factors (1.6 GB) read in tiles, as stored ones are
        class Generated:
            n_rows = 2000

            def row_tiles(self, max_rows):
                return [(s, min(s + max_rows, self.n_rows)) for s in range(0, self.n_rows, max_rows)]

            def read(self, rows, cols):
                gen = torch.Generator().manual_seed(rows[0] * 1_000_003 + cols.start)
                return torch.randn(rows[1] - rows[0], cols.stop - cols.start, generator=gen)

        terms = model.layer_terms(x[:256], y[:256])
        growth["influences_from_terms (2,000 rows in tiles)"] = measured(
            lambda: model.influences_from_terms(Generated(), terms)
        )
        # a 3 × 3 convolution's unfolded inputs are nine times its recorded ones: 2,000 rows
        # of them, as they are and rotated, would take 290 MB beside 16 MB of terms
        conv = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)
        ).eval()
        xc, yc = torch.randn(2000, 8, 16, 16), torch.randint(0, 10, (2000,))
        on_conv = EkfacInfluence(conv, hessian_regularization=0.1)
        on_conv.fit([(xc[:64], yc[:64])])
        on_conv.memory_budget_bytes = budget
        conv_terms = on_conv.layer_terms(xc, yc)
        growth["self_influences_from_terms (a convolution, 2,000 rows)"] = measured(
            lambda: on_conv.self_influences_from_terms(conv_terms)
        )
    print(json.dumps({"p": model.n_parameters, "growth": growth}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("method", ["arnoldi", "ekfac"])
def test_a_large_call_grows_the_resident_set_by_about_the_budget_not_by_its_input(method):
    n, budget = 8000, 32 * 2**20
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(n), str(budget), method],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    p = report["p"]
    # the per-sample gradients alone, were they formed at once (float32)
    unchunked = n * p * 4
    # The live temporaries stay within the budget (measured 1.0× with glibc told to return
    # freed memory at once, MALLOC_MMAP_THRESHOLD_=131072). By default glibc keeps freed
    # chunk-sized blocks resident for reuse and fragments its heap between chunks: measured
    # 1.0–3.0× the budget for budgets of 16–64 MiB and n from 4,000 to 16,000, not growing
    # with n. Hence 4× the budget, plus 32 MiB for the result, thread pools and caches.
    bound = 4 * budget + 32 * 2**20
    print(
        f"p={p}, n={n}, budget {budget / 2**20:.0f} MiB: unchunked gradients would take "
        f"{unchunked / 2**30:.1f} GiB; bound {bound / 2**20:.0f} MiB; growth "
        + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["growth"].items())
    )
    assert p > 190_000
    assert unchunked > 30 * bound
    for call, growth in report["growth"].items():
        assert growth < bound, (call, growth / 2**20)
