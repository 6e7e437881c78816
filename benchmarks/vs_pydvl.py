"""Benchmark: ours against pyDVL 0.10 on a non-convex network, fit included, each side's error
judged against a float64 computation of the same influences.

The network is the example MLP 64 → 128 → 10 (tanh, 9,610 parameters) trained as networks
usually are, with plain minibatch SGD stopped after 20 epochs, on 1,200 noisy Gaussian-cluster
points: it is not at a minimum, and ``H + 0.01·I`` is indefinite with eigenvalues near zero
(the header prints its spectrum). Both sides compute in float32 with λ = 0.01, fit on the same
loader (batches of 300, the largest pyDVL's Direct fit holds in memory here; equal batches keep
pyDVL's unweighted batch average equal to the mean) and run
``DaskInfluenceCalculator(...).influences(...).compute()`` on Dask's synchronous scheduler.

* **direct**: 400 test × 1,200 train in 4 × 4 blocks, one run each, fit included. Targets: end
  to end ≥ 8×, the fit alone ≥ 3×, our error ≤ 1.5× pyDVL's. Also printed: our Hessian's
  achieved GFLOP/s (its matrix products, which sum over samples in float64) beside this
  machine's dgemm and sgemm rates measured in the same run, and ``hessian_dtype=torch.float64``
  (reported, not judged).
* **cg**: 10 test × 1,200 train (one block). Ours as block CG (``solve_simultaneously=True``, as the pipeline runs it); pyDVL's
  ``CgInfluence`` at ``maxiter=100`` and (not with ``--quick``) ``maxiter=1000``: its default,
  ``10·p`` per right-hand side, would run for hours. Target: our Pearson correlation with the
  exact influences ≥ 0.999, and ≥ 10× faster than the pyDVL run that comes closest to it.

* **modes**: the Gauss-Newton and block-diagonal modes and DataInf (``InverseHarmonicMean``),
  each on both sides with the same settings, in float64 and float32: 50 test × 1,200 train (one
  block), fit included. Each side is judged against a float64 computation of the same quantity
  from dense matrices (the block-masked Hessian or ``GᵀG/n`` solved by LU; DataInf's mean of
  the damped rank-one inverses term by term), and the two sides against each other. Targets:
  ours within 1e-4 (float64) / 1e-3 (float32) of that truth, and not slower than pyDVL.

pyDVL pins numpy < 2, so its side runs in an isolated virtualenv that this script builds on
first use (``benchmarks/.pydvl-venv``: ``pydvl[influence]==0.10.*`` and ``torch==2.13.0``) and
talks to through files only (``benchmarks/pydvl_side.py``). No pyDVL code is imported here.

    python benchmarks/vs_pydvl.py [--methods direct,cg] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
VENV = common.BENCH_DIR / ".pydvl-venv"
PYDVL_SPEC = "pydvl[influence]==0.10.*"
TORCH_SPEC = "torch==2.13.0"
TARGETS = {
    "direct_total": 8.0,
    "direct_fit": 3.0,
    "direct_error": 1.5,
    "cg": 10.0,
    "cg_pearson": 0.999,
    "modes_float64": 1e-4,
    "modes_float32": 1e-3,
}

#: the "modes" runs: name → (method, options, given alike to both sides)
MODE_RUNS = {
    "direct-gauss-newton": ("direct", {"second_order_mode": "gauss_newton"}),
    "direct-layer-wise": ("direct", {"block_structure": "layer_wise"}),
    "direct-parameter-wise-gauss-newton": (
        "direct",
        {"block_structure": "parameter_wise", "second_order_mode": "gauss_newton"},
    ),
    "cg-layer-wise-gauss-newton": (
        "cg",
        {
            "block_structure": "layer_wise",
            "second_order_mode": "gauss_newton",
            "solve_simultaneously": True,
            "rtol": 1e-10,
            "maxiter": 300,
        },
    ),
    "datainf": ("datainf", {}),
    "datainf-layer-wise": ("datainf", {"block_structure": "layer_wise"}),
}
#: the class each run's method name stands for, on both sides
CLASSES = {
    "direct": "DirectInfluence",
    "cg": "CgInfluence",
    "datainf": "InverseHarmonicMeanInfluence",
}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_pydvl_venv() -> str:
    """Create the isolated pyDVL environment if needed; returns the resolved versions."""
    return common.ensure_venv(
        VENV, ["pydvl", "torch", "numpy", "dask", "distributed"], [[PYDVL_SPEC, TORCH_SPEC]]
    )


def pydvl_run(name: str, workdir: Path, timeout: float) -> dict:
    script = common.BENCH_DIR / "pydvl_side.py"
    proc = subprocess.run(
        [str(venv_python()), str(script), str(workdir), name],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"pyDVL run {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report = json.loads((workdir / f"pydvl_{name}.json").read_text())
    report["values"] = np.load(workdir / f"pydvl_{name}.npz")["values"]
    report["total_s"] = report["fit_s"] + report["influences_compute_s"]
    return report


def our_run(model, data: dict, n_test: int, blocks: int, fit_batch_size: int) -> dict:
    """Fit and the synchronous DaskInfluenceCalculator's grid, timed; warnings collected."""
    import dask
    import dask.array as da
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_influence import (
        DaskInfluenceCalculator,
        DisableClientSingleThreadCheck,
        TorchNumpyConverter,
    )

    x, y = data["x_train"], data["y_train"]
    xt, yt = data["x_test"][:n_test], data["y_test"][:n_test]
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=fit_batch_size
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.fit(loader)
        t_fit = time.perf_counter() - start
        train_chunk, test_chunk = -(-len(x) // blocks), -(-len(xt) // blocks)
        args = (
            da.from_array(xt, chunks=(test_chunk, -1)),
            da.from_array(yt, chunks=test_chunk),
            da.from_array(x, chunks=(train_chunk, -1)),
            da.from_array(y, chunks=train_chunk),
        )
        with dask.config.set(scheduler="synchronous"):
            calculator = DaskInfluenceCalculator(
                model, TorchNumpyConverter(), DisableClientSingleThreadCheck
            )
            start = time.perf_counter()
            values = calculator.influences(*args).compute()
            t_compute = time.perf_counter() - start
    return {
        "fit_s": t_fit,
        "influences_compute_s": t_compute,
        "total_s": t_fit + t_compute,
        "values": np.asarray(values),
        "model": model,
        "warnings": sorted({str(w.message).splitlines()[0][:160] for w in caught}),
    }


def hessian_rate(net, data: dict) -> tuple[float, float]:
    """Seconds to form our float32 exact Hessian (best of 2) and the flops of its matrix
    products (the structured path's count; the per-sample derivatives come on top)."""
    import torch

    from prefect_influence.torch.functional import ModelFunctions
    from prefect_influence.torch.hessian import exact_hessian, linear_layers_flops, linear_layout

    fn = ModelFunctions(net, torch.nn.functional.cross_entropy)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    seconds, _ = common.best_time(
        lambda: exact_hessian(fn, [(x, y)], len(x)), repeat=2, warmup=False
    )
    return seconds, float(linear_layers_flops(linear_layout(fn, x, y), len(x)))


def show(side: str, run: dict, truth: np.ndarray) -> str:
    line = (
        f"   {side}: fit {run['fit_s']:.2f} s + influences {run['influences_compute_s']:.2f} s = "
        f"{run['total_s']:.2f} s; vs float64 truth: relative error "
        f"{common.relative_error(run['values'], truth):.2e}, Pearson "
        f"{common.pearson(run['values'], truth):.6f}"
    )
    for w in run["warnings"]:
        line += f"\n      warning: {w}"
    return line


def mode_truth(net, data: dict, n_test: int, reg: float, method: str, options: dict):
    """Float64 influences of one :data:`MODE_RUNS` entry from dense matrices."""
    import copy

    import torch

    from prefect_influence.torch.curvature import parameter_blocks
    from prefect_influence.torch.functional import ModelFunctions
    from prefect_influence.torch.hessian import exact_hessian

    fn = ModelFunctions(copy.deepcopy(net).double(), torch.nn.functional.cross_entropy)
    x, xt = (torch.from_numpy(data[k]).double() for k in ("x_train", "x_test"))
    y, yt = torch.from_numpy(data["y_train"]), torch.from_numpy(data["y_test"])
    grads, test_grads = fn.per_sample_grads(x, y), fn.per_sample_grads(xt[:n_test], yt[:n_test])
    offsets = dict(zip(fn.names, np.cumsum([0, *fn.numels[:-1]])))
    numels = dict(zip(fn.names, fn.numels))
    blocks = [
        torch.cat([torch.arange(offsets[n], offsets[n] + numels[n]) for n in names])
        for names in parameter_blocks(fn.model, options.get("block_structure", "full")).values()
    ]
    factors = torch.zeros_like(test_grads)
    if method == "datainf":
        for index in blocks:
            g, v = grads[:, index], test_grads[:, index]
            for g_i in g:  # (g gᵀ + λI)⁻¹ v, one training point at a time
                factors[:, index] += (v - torch.outer(v @ g_i, g_i) / (reg + g_i @ g_i)) / reg
            factors[:, index] /= len(g)
        return (factors @ grads.T).numpy()
    if options.get("second_order_mode") == "gauss_newton":
        matrix = grads.T @ grads / len(x)
    else:
        matrix = exact_hessian(fn, [(x, y)], len(x))
    for index in blocks:
        block = matrix[index][:, index] + reg * torch.eye(len(index), dtype=torch.float64)
        factors[:, index] = torch.linalg.solve(block, test_grads[:, index].T).T
    return (factors @ grads.T).numpy()


def modes(net, data: dict, runs: dict, workdir: Path, args) -> list[str]:
    """Each of :data:`MODE_RUNS` on both sides, in float64 and float32: values compared with
    each other (the same quantity), times with each other."""
    import copy

    import torch
    from torch.nn.functional import cross_entropy

    from prefect_influence import torch as methods

    lines = []
    for name, (method, options) in MODE_RUNS.items():
        truth = mode_truth(net, data, args.modes_test, args.regularization, method, options)
        for dtype in ("float64", "float32"):
            run = f"{name}-{dtype}"
            print(f"-- modes: {run}", flush=True)
            cast = copy.deepcopy(net).to(getattr(torch, dtype))
            arrays = {k: v.astype(dtype) if k[0] == "x" else v for k, v in data.items()}
            model = getattr(methods, CLASSES[method])(
                cast, cross_entropy, regularization=args.regularization, **options
            )
            ours = our_run(model, arrays, args.modes_test, 1, args.fit_batch_size)
            theirs = pydvl_run(run, workdir, args.timeout)
            difference = common.relative_error(ours["values"], theirs["values"])
            ours_error = common.relative_error(ours["values"], truth)
            their_error = common.relative_error(theirs["values"], truth)
            target = TARGETS[f"modes_{dtype}"]
            ratio = theirs["total_s"] / ours["total_s"]
            for side, r in (("ours", ours), ("pyDVL", theirs)):
                line = f"   {side}: fit {r['fit_s']:.2f} s + influences "
                print(line + f"{r['influences_compute_s']:.2f} s = {r['total_s']:.2f} s")
                for w in r["warnings"]:
                    print(f"      warning: {w}")
            lines.append(
                f"{run}: vs float64 truth: ours {ours_error:.1e} (target <= {target:g}: "
                f"{common.verdict(ours_error <= target)}), pyDVL {their_error:.1e}; ours vs "
                f"pyDVL {difference:.1e}; ours {ours['total_s']:.2f} s, pyDVL "
                f"{theirs['total_s']:.2f} s, ratio {ratio:.1f}x (not slower: "
                f"{common.verdict(ratio >= 1)})"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="direct,cg,modes", help="direct, cg and/or modes")
    parser.add_argument("--modes-test", type=int, default=50, help="test points of the modes")
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=400, help="test points of the Direct grid")
    parser.add_argument("--cg-test", type=int, default=10, help="test points of the CG job")
    parser.add_argument(
        "--hidden", type=int, default=128, help="64 → hidden → 10 (128: 9,610 parameters)"
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="SGD epochs (stopped early: non-convex)"
    )
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side of the Direct grid")
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--fit-batch-size", type=int, default=300)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 → 32 → 10, 300 train × 40 test, pyDVL CG at maxiter=100 only",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for each pyDVL run")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.hidden, args.fit_batch_size = 300, 40, 32, 100
    asked = {m.strip() for m in args.methods.split(",") if m.strip()}
    if not asked or asked - {"direct", "cg", "modes"}:
        parser.error(f"--methods takes direct, cg and/or modes, got {args.methods!r}")

    import torch
    from torch.nn.functional import cross_entropy

    from prefect_influence.torch import CgInfluence, DirectInfluence

    versions = ensure_pydvl_venv()
    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-pydvl-"))
    x, y = common.make_data(args.n_train, seed=0)
    xt, yt = common.make_data(max(args.n_test, args.cg_test, args.modes_test), seed=1)
    data = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
    net = common.train_sgd_network(args.hidden, x, y, epochs=args.epochs)
    truth, eigenvalues = common.float64_truth(net, x, y, xt, yt, args.regularization)
    common.header(
        "vs_pydvl: ours vs pyDVL 0.10 on a non-convex network, fit included",
        pydvl_venv=f"{VENV} (pydvl, torch, numpy, dask: {versions})",
        network=f"MLP 64→{args.hidden}→10 tanh, p = {common.n_parameters(args.hidden)}, minibatch "
        f"SGD stopped after {args.epochs} epochs on {args.n_train} points; float32",
        curvature=f"H + {args.regularization}·I: {common.spectrum_summary(eigenvalues)}",
        scheduler="Dask synchronous on both sides; fit loader batches of "
        f"{args.fit_batch_size} on both sides",
    )
    np.savez(workdir / "inputs.npz", **data)
    torch.save(net.state_dict(), workdir / "model.pt")
    runs = {
        "direct": {"method": "direct", "n_test": args.n_test, "blocks": args.blocks},
        "cg100": {"method": "cg", "n_test": args.cg_test, "blocks": 1, "options": {"maxiter": 100}},
        "cg1000": {
            "method": "cg",
            "n_test": args.cg_test,
            "blocks": 1,
            "options": {"maxiter": 1000},
        },
    }
    for name, (method, options) in MODE_RUNS.items():
        for dtype in ("float64", "float32"):
            runs[f"{name}-{dtype}"] = {
                "method": method,
                "options": options,
                "dtype": dtype,
                "n_test": args.modes_test,
                "blocks": 1,
            }
    for settings in runs.values():
        settings["fit_batch_size"] = args.fit_batch_size
        settings["class"] = CLASSES[settings["method"]]
    spec = {
        "layers": [common.N_FEATURES, args.hidden, common.N_CLASSES],
        "regularization": args.regularization,
        "runs": runs,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    closing = []

    if "direct" in asked:
        sgemm, dgemm = common.gemm_gflops(), common.gemm_gflops(torch.float64)
        h_seconds, h_flops = hessian_rate(net, data)
        print(
            "-- direct: 400 × 1,200 in 4 × 4 blocks" if not args.quick else "-- direct", flush=True
        )
        ours = our_run(
            DirectInfluence(net, cross_entropy, args.regularization),
            data,
            args.n_test,
            args.blocks,
            args.fit_batch_size,
        )
        truth_d = truth[: args.n_test]
        print(show("ours", ours, truth_d), flush=True)
        precise = our_run(
            DirectInfluence(net, cross_entropy, args.regularization, hessian_dtype=torch.float64),
            data,
            args.n_test,
            args.blocks,
            args.fit_batch_size,
        )
        print(show("ours, hessian_dtype=float64", precise, truth_d), flush=True)
        theirs = pydvl_run("direct", workdir, args.timeout)
        print(show("pyDVL", theirs, truth_d), flush=True)
        p, n = common.n_parameters(args.hidden), args.n_train
        print(
            f"   our Hessian: {h_seconds:.2f} s for {h_flops / 1e9:.0f} GFLOP of float64 matrix "
            f"products, {h_flops / h_seconds / 1e9:.0f} GFLOP/s (dgemm {dgemm:.0f}, sgemm "
            f"{sgemm:.0f} GFLOP/s in this run); {8 * n * p * p / h_seconds / 1e9:.0f} GFLOP/s "
            "counted as 8·n·p² (products with the identity)"
        )
        total, fit = theirs["total_s"] / ours["total_s"], theirs["fit_s"] / ours["fit_s"]
        errors = [common.relative_error(r["values"], truth_d) for r in (ours, theirs, precise)]
        judged = " (quick size: not judged)" if args.quick else ""
        closing += [
            f"direct end to end: ours {ours['total_s']:.2f} s, pyDVL {theirs['total_s']:.2f} s, "
            f"ratio {total:.1f}x (target >= {TARGETS['direct_total']:.0f}x: "
            f"{common.verdict(total >= TARGETS['direct_total'])}){judged}",
            f"direct fit: ours {ours['fit_s']:.2f} s, pyDVL {theirs['fit_s']:.2f} s, ratio "
            f"{fit:.1f}x (target >= {TARGETS['direct_fit']:.0f}x: "
            f"{common.verdict(fit >= TARGETS['direct_fit'])}){judged}",
            f"direct error vs float64: ours {errors[0]:.2e}, pyDVL {errors[1]:.2e}, ratio "
            f"{errors[0] / errors[1]:.2f} (target <= {TARGETS['direct_error']}: "
            f"{common.verdict(errors[0] <= TARGETS['direct_error'] * errors[1])}); "
            f"hessian_dtype=float64: {errors[2]:.2e} in {precise['total_s']:.2f} s",
            f"direct Hessian: {h_seconds:.2f} s, {h_flops / h_seconds / 1e9:.0f} GFLOP/s achieved in "
            f"float64 products (dgemm {dgemm:.0f}, sgemm {sgemm:.0f} GFLOP/s); the bound of the "
            f"products with the identity, 8·n·p² at sgemm's rate: {8 * n * p * p / sgemm / 1e9:.2f} s",
        ]

    if "cg" in asked:
        print(f"-- cg: {args.cg_test} × {args.n_train}, our block CG", flush=True)
        truth_c = truth[: args.cg_test]
        ours = our_run(
            CgInfluence(net, cross_entropy, args.regularization, solve_simultaneously=True),
            data,
            args.cg_test,
            1,
            args.fit_batch_size,
        )
        print(show("ours (block CG)", ours, truth_c), flush=True)
        theirs = {}
        for name in ("cg100",) if args.quick else ("cg100", "cg1000"):
            theirs[name] = pydvl_run(name, workdir, args.timeout)
            print(
                show(f"pyDVL maxiter={runs[name]['options']['maxiter']}", theirs[name], truth_c),
                flush=True,
            )
        ours_r = common.pearson(ours["values"], truth_c)
        closest = max(theirs, key=lambda k: common.pearson(theirs[k]["values"], truth_c))
        ratio = theirs[closest]["total_s"] / ours["total_s"]
        met = ours_r >= TARGETS["cg_pearson"] and ratio >= TARGETS["cg"]
        closing += [
            f"cg: ours Pearson {ours_r:.6f} in {ours['total_s']:.2f} s; pyDVL "
            + ", ".join(
                f"maxiter={runs[k]['options']['maxiter']}: Pearson "
                f"{common.pearson(v['values'], truth_c):.6f} in {v['total_s']:.2f} s"
                for k, v in theirs.items()
            ),
            f"ratio cg pyDVL (closest: maxiter={runs[closest]['options']['maxiter']}) / ours: "
            f"{ratio:.1f}x (target >= {TARGETS['cg']:.0f}x with Pearson >= "
            f"{TARGETS['cg_pearson']}: {common.verdict(met)})"
            + (" (quick size: not judged)" if args.quick else ""),
        ]
    if "modes" in asked:
        closing += modes(net, data, runs, workdir, args)
    print("-- results")
    for line in closing:
        print(line)


if __name__ == "__main__":
    main()
