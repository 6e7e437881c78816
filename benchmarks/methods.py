"""Benchmark: every influence method on a convex and a non-convex network of the same size,
against exact influences; it writes the README's "Choosing a method" table.

* convex: the example MLP 64 → 960 → 10 with its hidden layer frozen at its seeded random
  initialization (random tanh features): the loss is convex in the 9,610 trainable parameters
  of the head, trained with minibatch SGD.
* non-convex: vs_pydvl's network, 64 → 128 → 10 tanh (9,610 parameters) trained with minibatch
  SGD and stopped after 20 epochs: ``H + 0.01·I`` is indefinite with eigenvalues near zero.

Each method runs in float32 at λ = 0.01 with its default settings (ranks 50 where a rank is
needed, the pipeline's default), in this process: fit on 1,200 training points, then the
influences of 100 test points on them. Time is fit plus influences; quality is the Pearson
correlation and the relative (Frobenius) error against the exact influences of a float64 copy
of the network (``common.float64_truth``).

    python benchmarks/methods.py [--quick] [--write-readme]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402


def methods(net, reg: float) -> dict:
    """Constructors of every method, float32, defaults where the method has them."""
    import torch
    from torch.nn.functional import cross_entropy as loss

    from prefect_influence import torch as m

    return {
        "Direct": lambda: m.DirectInfluence(net, loss, reg),
        "Direct, `hessian_dtype=float64`": lambda: m.DirectInfluence(
            net, loss, reg, hessian_dtype=torch.float64
        ),
        "CG": lambda: m.CgInfluence(net, loss, reg, solve_simultaneously=True),
        "CG, Nyström preconditioner (rank 50)": lambda: m.CgInfluence(
            net,
            loss,
            reg,
            preconditioner=m.NystroemPreconditioner(rank=50),
            solve_simultaneously=True,
        ),
        "LiSSA": lambda: m.LissaInfluence(net, loss, reg),
        "Arnoldi (rank 50)": lambda: m.ArnoldiInfluence(net, loss, reg, rank=50),
        "Nyström sketch (rank 50)": lambda: m.NystroemSketchInfluence(net, loss, reg, rank=50),
        "EK-FAC": lambda: m.EkfacInfluence(
            net, update_diagonal=True, hessian_regularization=reg, loss=loss
        ),
    }


def convex_network(hidden: int, x: np.ndarray, y: np.ndarray, epochs: int):
    """The example network with a frozen random hidden layer, its head trained by SGD."""
    from prefect_influence.example import build_model

    net = build_model(hidden=hidden, seed=0)
    for param in net[0].parameters():
        param.requires_grad_(False)
    return common.train_sgd_network(hidden, x, y, epochs=epochs, net=net)


def measure(make, data: dict, truth: np.ndarray, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    xt, yt = torch.from_numpy(data["xt"]), torch.from_numpy(data["yt"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            model = make().fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))
            values = model.influences(xt, yt, x, y).numpy()
        except Exception as exc:  # a method that refuses the problem is a row of the table
            return {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                "seconds": time.perf_counter() - start,
            }
        seconds = time.perf_counter() - start
    return {
        "pearson": common.pearson(values, truth),
        "error": None,
        "seconds": seconds,
        "relative": common.relative_error(values, truth),
        "warnings": sorted({str(w.message).split(";")[0][:100] for w in caught}),
    }


def cell(result: dict) -> str:
    if result["error"]:
        short = "diverges" if "diverge" in result["error"] else "refused"
        return f"{short} ({result['seconds']:.1f} s) | — | —"
    return f"{result['pearson']:.4f} | {result['relative']:.1e} | {result['seconds']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--fit-batch-size", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 train, hidden 32/240")
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the README's table between its markers with this run's",
    )
    args = parser.parse_args()
    hidden_nonconvex, hidden_convex = (32, 240) if args.quick else (128, 960)
    if args.quick:
        args.n_train = 300

    x, y = common.make_data(args.n_train, seed=0)
    xt, yt = common.make_data(args.n_test, seed=1)
    data = {"x": x, "y": y, "xt": xt, "yt": yt}
    networks = {
        "convex": convex_network(hidden_convex, x, y, epochs=50),
        "non-convex": common.train_sgd_network(hidden_nonconvex, x, y, epochs=20),
    }
    truths, spectra = {}, {}
    for name, net in networks.items():
        truths[name], eigenvalues = common.float64_truth(net, x, y, xt, yt, args.regularization)
        spectra[name] = common.spectrum_summary(eigenvalues)
    p = sum(q.numel() for q in networks["convex"].parameters() if q.requires_grad)
    common.header(
        "methods: every method against exact influences, convex and non-convex",
        job=f"{args.n_test} test × {args.n_train} train, λ = {args.regularization}, float32, "
        f"p = {p} trainable parameters on both networks",
        **{f"{name} H + λI": spectrum for name, spectrum in spectra.items()},
    )
    results: dict[str, dict] = {}
    for name, net in networks.items():
        for method, make in methods(net, args.regularization).items():
            result = measure(make, data, truths[name], args.fit_batch_size)
            results.setdefault(method, {})[name] = result
            print(
                f"   {name:10s} {method:40s} {cell(result)}"
                + "".join(f"\n      warning: {w}" for w in result.get("warnings", [])),
                flush=True,
            )

    table = [
        f"{args.n_test} test × {args.n_train} train points, float32, λ = {args.regularization}, "
        f"p = {p}; Pearson correlation and relative error against the exact influences (float64); "
        "time = fit + influences on 2 cores. Convex: a frozen random tanh layer and a trained "
        f"softmax head (H + λI: {spectra['convex']}). Non-convex: a tanh MLP stopped early "
        f"(H + λI: {spectra['non-convex']}). Generated by `python benchmarks/methods.py "
        "--write-readme`.",
        "",
        "| method | convex: Pearson | error | time | non-convex: Pearson | error | time |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {method} | {cell(r['convex'])} | {cell(r['non-convex'])} |"
        for method, r in results.items()
    ]
    print("-- table")
    print("\n".join(table))
    if args.write_readme and not args.quick:
        common.write_readme_table("methods-table", table)
    best = max(
        (r["non-convex"]["pearson"], m) for m, r in results.items() if not r["non-convex"]["error"]
    )
    print(f"best on the non-convex network: {best[1]} (Pearson {best[0]:.4f})")


if __name__ == "__main__":
    main()
