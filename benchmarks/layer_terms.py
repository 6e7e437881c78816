"""Benchmark: Up-mode scores of train rows from their layer terms against per-sample gradients and
one product, for a method other than EK-FAC (Arnoldi), on networks of Linear and Conv2d layers.

For each network, ``--n-factors`` factor rows against ``--n-train`` train rows, float32, one
torch thread, the two sides alternating, best of ``--repeat``:

* ``gradients``: ``factors @ model.per_sample_grads(x, y).T``, what every method's columns and
  calculators did before they scored layer by layer;
* ``terms``: ``model.influences_from_terms(factors, model.layer_terms(x, y))``.

Both include the forward and backward passes. Printed per network: both times, the ratio
gradients / terms (above 1: terms are faster), the largest difference relative to the largest
score (float32 rounding), and the bytes held per train row (gradients ``p``, terms
``Σ(d_in + d_out)`` numbers).

    python benchmarks/layer_terms.py [--n-train 1000] [--n-factors 100] [--repeat 3] [--quick]

Last lines: every network's ratio, and the smallest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def networks():
    """Name → (network, shape of one input sample)."""
    from torch import nn

    def mlp(*dims):
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return {
        "MLP 64-8-10": (mlp(64, 8, 10), (64,)),
        "MLP 784-256-10": (mlp(784, 256, 10), (784,)),
        "MLP 512-512-512-10": (mlp(512, 512, 512, 10), (512,)),
        "CNN 3x32x32, 2 conv + 2 linear": (cnn, (3, 32, 32)),
    }


def measure(name, net, shape, args) -> dict:
    import torch
    import torch.nn.functional as F

    from prefect_influence.torch import ArnoldiInfluence

    torch.manual_seed(0)
    net = net.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.n_train, *shape, generator=gen)
    y = torch.randint(0, 10, (args.n_train,), generator=gen)
    model = ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=8).fit([(x[:256], y[:256])])
    factors = model.influence_factors(x[: args.n_factors], y[: args.n_factors])
    assert model.scores_layer_by_layer

    def by_gradients():
        return factors @ model.per_sample_grads(x, y).T

    def by_terms():
        return model.influences_from_terms(factors, model.layer_terms(x, y))

    best = {"gradients": float("inf"), "terms": float("inf")}
    values = {}
    for _ in range(args.repeat):
        for side, fn in (("gradients", by_gradients), ("terms", by_terms)):
            start = time.perf_counter()
            values[side] = fn()
            best[side] = min(best[side], time.perf_counter() - start)
    scale = float(values["gradients"].abs().max())
    diff = float((values["gradients"] - values["terms"]).abs().max()) / scale
    terms_row = model.layer_terms(x[:1], y[:1]).nbytes
    ratio = best["gradients"] / best["terms"]
    print(
        f"   {name}: p = {model.n_parameters:,}; gradients {best['gradients']:.3f} s, terms "
        f"{best['terms']:.3f} s, ratio {ratio:.2f}; largest difference {diff:.1e} of the largest "
        f"score; per train row {model.n_parameters * 4:,} B of gradients, {terms_row:,} B of terms",
        flush=True,
    )
    return {"name": name, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-factors", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 train rows, 10 factors, once")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_factors, args.repeat = 100, 10, 1

    import torch

    torch.set_num_threads(1)
    common.header(
        "layer_terms: scores from layer terms against per-sample gradients (Arnoldi, 1 thread)",
        rows=f"{args.n_factors} factor rows × {args.n_train} train rows, float32, best of "
        f"{args.repeat}",
    )
    results = [measure(name, net, shape, args) for name, (net, shape) in networks().items()]
    print(
        "ratio gradients / terms (above 1: terms faster): "
        + ", ".join(f"{r['name']} {r['ratio']:.2f}" for r in results)
    )
    low = min(results, key=lambda r: r["ratio"])
    print(f"smallest ratio: {low['ratio']:.2f} ({low['name']})")


if __name__ == "__main__":
    main()
