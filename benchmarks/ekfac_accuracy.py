"""Benchmark: EK-FAC and K-FAC influences against the exact generalized Gauss-Newton influences,
by λ, on a small conv net and on methods.py's non-convex MLP; it writes the README's EK-FAC table.

EK-FAC (``EkfacInfluence(update_diagonal=True)``) and K-FAC (``update_diagonal=False``)
approximate, layer by layer, the generalized Gauss-Newton matrix ``(1/n) Σ Jᵢᵀ Hᵢ Jᵢ`` (for
cross-entropy, the true Fisher) by Kronecker factors. The reference is that matrix itself,
dense, in float64, plus ``λ·I``, solved by Cholesky for each λ: so the figures measure the
block-diagonal and Kronecker approximations only, not the Gauss-Newton one (methods.py's truth is
the Hessian). The matrix is formed from the per-sample Jacobians in a minute and checked against
the library's GGN-vector products, from which ``DirectInfluence(..., second_order_mode=
"generalized_gauss_newton")`` would form it column by column (about an hour for the conv net
on 2 cores).

* conv net: Conv2d(3, 8, 3) → ReLU → MaxPool(2) → Conv2d(8, 16, 3) → ReLU → MaxPool(2) →
  Linear(256, 10), p = 3,962, on seeded synthetic 3 × 16 × 16 images (a smooth pattern per
  class plus noise), 5 epochs of minibatch SGD (stopped early, not at a minimum); 1,000 train ×
  100 test points.
* MLP: methods.py's non-convex network, 64 → 128 → 10 tanh, p = 9,610, minibatch SGD stopped
  after 20 epochs; 1,200 train × 100 test points.

EK-FAC and K-FAC run in float32 (what users run), EK-FAC also in float64 (its rounding apart from
its approximation); each is fitted once and λ set on the fitted model for each value, as their
eigenbases and eigenvalues do not depend on it. Quality: the Pearson correlation and the relative
(Frobenius) error of the test × train up-weighting influences against the reference.

    python benchmarks/ekfac_accuracy.py [--quick] [--write-readme]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUICK_LAMBDAS = (1e-3, 1e-1)
VARIANTS = ("EK-FAC", "K-FAC", "EK-FAC, float64")
#: the GGN from the Jacobians must agree with the library's GGN-vector products to rounding
CHECK_TOLERANCE = 1e-10


def image_data(n: int, seed: int, noise: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded 3 × 16 × 16 images (float32) of 10 classes, int64 labels: each class's
    pattern of 4 × 4 blocks (one fixed seed for all splits) plus Gaussian noise, scaled to unit
    variance per pixel."""
    coarse = np.random.default_rng(12345).normal(0.0, 1.0, (common.N_CLASSES, 3, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, 4, 4)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, common.N_CLASSES, n)
    x = patterns[y] + rng.normal(0.0, noise, (n, 3, 16, 16))
    # standardized as images usually are, which keeps the curvature, and so λ, on the usual scale
    return (x / np.sqrt(1.0 + noise**2)).astype(np.float32), y.astype(np.int64)


def conv_network(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0):
    """The small conv net, seeded, trained with common's minibatch SGD and stopped early."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, common.N_CLASSES),
    )
    return common.train_sgd_network(0, x, y, epochs=epochs, lr=0.05, seed=seed, net=net)


def gauss_newton(net64, x, chunk: int = 200):
    """The mean generalized Gauss-Newton matrix ``(1/n) Σ Jᵢᵀ Hᵢ Jᵢ`` of cross-entropy (p × p,
    the network's dtype) from per-sample Jacobians of the outputs, ``chunk`` samples at a time."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, hessian, jacrev, vmap

    params = {k: v.detach() for k, v in net64.named_parameters() if v.requires_grad}
    p = sum(v.numel() for v in params.values())

    def outputs(prm, one):
        return functional_call(net64, prm, (one[None],))[0]

    jacobians = vmap(jacrev(outputs), in_dims=(None, 0))
    # cross-entropy's Hessian in the logits, diag(softmax) − softmax softmaxᵀ, is the same
    # for every label: label 0 stands for all
    curvature = vmap(hessian(lambda o, t: F.cross_entropy(o[None], t[None])))
    matrix = torch.zeros(p, p, dtype=next(iter(params.values())).dtype)
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        jac = jacobians(params, xb)
        jac = torch.cat([jac[k].reshape(len(xb), -1, v.numel()) for k, v in params.items()], 2)
        with torch.no_grad():
            h = curvature(net64(xb), torch.zeros(len(xb), dtype=torch.long))
        hj = torch.einsum("nkl,nlp->nkp", h, jac)
        matrix.addmm_(jac.reshape(-1, p).T, hj.reshape(-1, p))
    return matrix / len(x)


def reference(net, data: dict, lambdas) -> dict:
    """Float64 Gauss-Newton influences for each λ, checked against the library's products."""
    import torch
    from torch.nn.functional import cross_entropy

    from prefect_influence.torch.functional import ModelFunctions

    net64 = copy.deepcopy(net).double()
    x, y = torch.from_numpy(data["x"]).double(), torch.from_numpy(data["y"])
    xt, yt = torch.from_numpy(data["xt"]).double(), torch.from_numpy(data["yt"])
    start = time.perf_counter()
    matrix = gauss_newton(net64, x)
    built = time.perf_counter() - start
    fn = ModelFunctions(net64, cross_entropy, second_order="generalized_gauss_newton")
    probes = torch.randn(2, fn.n_parameters, generator=torch.Generator().manual_seed(0)).double()
    products = fn.hvp_function(x, y)(probes) / len(x)
    check = float((probes @ matrix - products).norm() / products.norm())
    if not check < CHECK_TOLERANCE:
        raise SystemExit(f"the dense Gauss-Newton matrix disagrees with its products: {check:.1e}")
    # the largest eigenvalue, by power iteration: the scale λ is added to
    v = torch.ones(fn.n_parameters, dtype=torch.float64)
    for _ in range(100):
        v = matrix @ v
        top = float(v.norm())
        v /= top
    test_grads = fn.per_sample_grads(xt, yt)
    train_grads = fn.per_sample_grads(x, y)
    truths = {}
    eye = torch.eye(fn.n_parameters, dtype=torch.float64)
    for reg in lambdas:
        chol = torch.linalg.cholesky(matrix + reg * eye)
        truths[reg] = (torch.cholesky_solve(test_grads.T, chol).T @ train_grads.T).numpy()
    return {
        "truths": truths,
        "top": top,
        "mean": float(matrix.diagonal().mean()),
        "check": check,
        "seconds": built,
    }


def approximations(net, data: dict, lambdas, batch_size: int) -> dict:
    """Pearson and relative error of each variant's influences for each λ (None: refused)."""
    import torch
    from torch.nn.functional import cross_entropy
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_influence.errors import InvalidRegularizationError
    from prefect_influence.torch import EkfacInfluence

    results: dict[str, dict] = {}
    for variant in VARIANTS:
        wide = variant.endswith("float64")
        model_net = copy.deepcopy(net).double() if wide else net
        cast = (lambda t: t.double()) if wide else (lambda t: t)
        x, y = cast(torch.from_numpy(data["x"])), torch.from_numpy(data["y"])
        xt, yt = cast(torch.from_numpy(data["xt"])), torch.from_numpy(data["yt"])
        start = time.perf_counter()
        model = EkfacInfluence(
            model_net,
            update_diagonal=variant.startswith("EK-FAC"),
            hessian_regularization=lambdas[0],
            loss=cross_entropy,
        ).fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))
        results[variant] = {"fit": time.perf_counter() - start}
        for reg in lambdas:
            model.hessian_regularization = reg
            try:
                values = model.influences(xt, yt, x, y).numpy()
            except InvalidRegularizationError:  # too small a λ for the variant is a cell too
                results[variant][reg] = None
                continue
            truth = data["truths"][reg]
            results[variant][reg] = (
                common.pearson(values, truth),
                common.relative_error(values, truth),
            )
    return results


def lam(value: float) -> str:
    """1e-4, 1e-3, ..., 1: the λ of a label."""
    return f"{value:.0e}".replace("e-0", "e-").replace("e+00", "")


def pearson_cell(result) -> str:
    return "refused" if result is None else f"{result[0]:.3f}"


def closing_lines(name: str, results: dict, lambdas) -> list[str]:
    """Pearson (K-FAC beside) and relative error per λ: the benchmark's summary."""

    def figure(result, index: int, digits: str) -> str:
        return "refused" if result is None else format(result[index], digits)

    lines = []
    for what, index, digits in (("Pearson", 0, ".3f"), ("relative error", 1, ".3g")):
        cells = [
            f"λ={lam(reg)} EK-FAC {what} {figure(results['EK-FAC'][reg], index, digits)} "
            f"(K-FAC {figure(results['K-FAC'][reg], index, digits)})"
            for reg in lambdas
        ]
        lines.append(f"{name}: " + ", ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 train, 2 λ values")
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the README's EK-FAC table between its markers with this run's",
    )
    args = parser.parse_args()
    lambdas = QUICK_LAMBDAS if args.quick else LAMBDAS
    n_conv, n_mlp, n_test = (300, 300, 50) if args.quick else (1000, 1200, 100)
    hidden = 32 if args.quick else 128

    xi, yi = image_data(n_conv, seed=0)
    xit, yit = image_data(n_test, seed=1)
    x, y = common.make_data(n_mlp, seed=0)
    xt, yt = common.make_data(n_test, seed=1)
    jobs = {
        "conv net": (conv_network(xi, yi, epochs=5), {"x": xi, "y": yi, "xt": xit, "yt": yit}),
        "MLP": (
            common.train_sgd_network(hidden, x, y, epochs=20),
            {"x": x, "y": y, "xt": xt, "yt": yt},
        ),
    }
    common.header(
        "ekfac_accuracy: EK-FAC and K-FAC against the exact generalized Gauss-Newton influences",
        job=f"{n_test} test × {n_conv} (conv net) / {n_mlp} (MLP) train, λ ∈ "
        f"{{{', '.join(lam(r) for r in lambdas)}}}, reference: the dense float64 GGN",
    )
    results, facts = {}, {}
    for name, (net, data) in jobs.items():
        p = sum(q.numel() for q in net.parameters() if q.requires_grad)
        ref = reference(net, data, lambdas)
        data["truths"] = ref["truths"]
        results[name] = approximations(net, data, lambdas, batch_size=300)
        facts[name] = {"p": p, "n": len(data["x"]), "top": ref["top"]}
        fits = ", ".join(f"{v} {r['fit']:.1f} s" for v, r in results[name].items())
        print(
            f"-- {name}: p = {p:,}; GGN built in {ref['seconds']:.1f} s, agrees with the "
            f"library's GGN-vector products to {ref['check']:.1e}; largest eigenvalue "
            f"{ref['top']:.3g}, mean {ref['mean']:.3g}; fits: {fits}",
            flush=True,
        )
        for variant, by_reg in results[name].items():
            cells = ", ".join(
                f"λ={lam(r)} "
                + ("refused" if by_reg[r] is None else f"{by_reg[r][0]:.4f} / {by_reg[r][1]:.2e}")
                for r in lambdas
            )
            print(f"   {variant:16s} Pearson / relative error: {cells}", flush=True)

    conv, mlp = facts["conv net"], facts["MLP"]
    table = [
        f"Pearson correlation of EK-FAC and K-FAC influences ({n_test} test × train points) "
        "with the exact influences of the generalized Gauss-Newton matrix they approximate "
        '(`second_order_mode="generalized_gauss_newton"`, dense, float64) '
        f"plus λ·I, λ absolute (the matrix's largest eigenvalue: {conv['top']:.2g} on the conv "
        f"net, {mlp['top']:.2g} on the MLP), on a small conv net (synthetic 3 × 16 × 16 images) "
        "and the non-convex MLP of the table above, both trained by SGD and stopped early; "
        "generated by `python benchmarks/ekfac_accuracy.py --write-readme`.",
        "",
        "| network | variant | " + " | ".join(f"λ = {lam(r)}" for r in lambdas) + " |",
        "|---|---|" + "---|" * len(lambdas),
    ]
    for name, by_variant in results.items():
        label = f"{name}, p = {facts[name]['p']:,}, {facts[name]['n']:,} train"
        for variant, by_reg in by_variant.items():
            cells = " | ".join(pearson_cell(by_reg[r]) for r in lambdas)
            table.append(f"| {label} | {variant} | {cells} |")
            label = ""
    print("-- table")
    print("\n".join(table))
    if args.write_readme and not args.quick:
        common.write_readme_table("ekfac-accuracy-table", table)
    for name in results:
        print(
            "\n".join(closing_lines(f"{name} (p = {facts[name]['p']:,})", results[name], lambdas))
        )
    pairs = [
        (results[n]["EK-FAC"][r], results[n]["EK-FAC, float64"][r])
        for n in results
        for r in lambdas
        if results[n]["EK-FAC"][r] is not None and results[n]["EK-FAC, float64"][r] is not None
    ]
    pearson_gap = max((abs(a[0] - b[0]) for a, b in pairs), default=float("nan"))
    error_gap = max((abs(a[1] - b[1]) / b[1] for a, b in pairs), default=float("nan"))
    print(
        f"EK-FAC float32 vs float64 (rounding): Pearson differs by at most {pearson_gap:.1e}, "
        f"relative error by at most {error_gap:.1e} of itself"
    )


if __name__ == "__main__":
    main()
