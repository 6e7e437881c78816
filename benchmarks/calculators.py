"""Benchmark: the sequential and Dask calculators against one in-memory ``model.influences`` call.

An MLP with ~10k parameters, 20,000 train × 500 test samples cut into 4 × 4 blocks. The
influence model is fitted once, outside the timings; every path then computes the same 500 ×
20,000 Up-influence matrix (``--n-test`` × ``--n-train``), checked against the in-memory result.
Each path runs once to warm up (imports, torch.func first calls, worker start-up); then all
paths are timed round-robin ``--repeat`` times and each one's best time counts. A bare
hand-written loop over the same blocks is timed too: the cost of blocking itself (smaller matrix
products, more gradient calls), which no calculator can beat. The last lines print time ratios
to the in-memory call (goal: ≤ 1.3) and to that loop.

Methods (``--method``):

* ``arnoldi`` (default): rank-20 Lanczos fit (41 Hessian-vector passes, about a minute). Solves are
  cheap, so the time goes into per-sample gradients and block products: the case where a
  calculator that redid gradient passes would show it.
* ``cg``: CG on all training data with ``--cg-maxiter`` iterations: solve-dominated.
* ``direct``: the exact method. Its fit eigendecomposes a dense 10k × 10k Hessian, which takes
  well over 10 minutes on 2 CPU cores (use a GPU machine or be patient).

The LocalCluster's workers start with ``TORCH_WORKER_DASK_CONFIG``, as docs/calculators.md
advises for any cluster running torch. The default size keeps the job long enough that the
LocalCluster row measures the computation, not Dask's fixed latency.

    python benchmarks/calculators.py [--method arnoldi|cg|direct] [--repeat 3] [--no-cluster]
                                     [--n-train 20000] [--n-test 500]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("DO_NOT_TRACK", "1")

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from prefect_influence import (  # noqa: E402
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    NestedTorchCatAggregator,
    SequentialInfluenceCalculator,
    TorchNumpyConverter,
)
from prefect_influence.torch import DirectInfluence  # noqa: E402

D_IN, HIDDEN, CLASSES, BLOCKS = 64, 150, 3, 4


def make_problem(n_train: int, n_test: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(CLASSES, D_IN, generator=gen)

    def sample(n):
        labels = torch.arange(n) % CLASSES
        return centers[labels] + torch.randn(n, D_IN, generator=gen), labels

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).eval()
    return net, sample(n_train), sample(n_test)


def batches(x, y, n_chunks):
    size = -(-len(x) // n_chunks)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def interleaved_best_times(paths: dict, repeat: int) -> tuple[dict, dict]:
    """Warm every path up, then time them round-robin ``repeat`` times; keep each one's best.

    Round-robin spreads any background load over all paths alike.
    """
    results = {name: np.asarray(fn()) for name, fn in paths.items()}  # warm-up runs
    best = {name: float("inf") for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["arnoldi", "cg", "direct"], default="arnoldi")
    parser.add_argument("--cg-maxiter", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster run")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=500)
    args = parser.parse_args()

    net, (x, y), (x_test, y_test) = make_problem(args.n_train, args.n_test)
    # λ = 5 keeps H + λI positive definite for this untrained MLP (its Hessian is indefinite)
    if args.method == "cg":
        from prefect_influence.torch import CgInfluence

        model = CgInfluence(
            net,
            F.cross_entropy,
            regularization=5.0,
            maxiter=args.cg_maxiter,
            solve_simultaneously=True,
        )
    elif args.method == "arnoldi":
        from prefect_influence.torch import ArnoldiInfluence

        model = ArnoldiInfluence(net, F.cross_entropy, regularization=5.0, rank=20)
    else:
        model = DirectInfluence(net, F.cross_entropy, regularization=5.0)
    print(
        f"{type(model).__name__}: p = {model.n_parameters} parameters, float32, {args.n_test} test × "
        f"{args.n_train} train, {BLOCKS} × {BLOCKS} blocks, torch threads {torch.get_num_threads()}"
    )
    start = time.perf_counter()
    model.fit(batches(x, y, BLOCKS))
    print(f"fit (not timed below): {time.perf_counter() - start:.1f} s")

    train_batches, test_batches = batches(x, y, BLOCKS), batches(x_test, y_test, BLOCKS)
    chunk, test_chunk = -(-args.n_train // BLOCKS), -(-args.n_test // BLOCKS)
    da_x = da.from_array(x.numpy(), chunks=(chunk, -1))
    da_y = da.from_array(y.numpy(), chunks=chunk)
    da_xt = da.from_array(x_test.numpy(), chunks=(test_chunk, -1))
    da_yt = da.from_array(y_test.numpy(), chunks=test_chunk)
    converter = TorchNumpyConverter()

    def hand_blocked():
        """The same 4 × 4 blocks by a bare loop: the floor for any blocked calculator."""
        factors = [model.influence_factors(xb, yb) for xb, yb in test_batches]
        grads = [model.per_sample_grads(xb, yb) for xb, yb in train_batches]
        return torch.cat([torch.cat([f @ g.T for g in grads], 1) for f in factors]).numpy()

    sequential = SequentialInfluenceCalculator(model)
    synchronous = DaskInfluenceCalculator(model, converter, DisableClientSingleThreadCheck)
    paths = {
        "in-memory model.influences": lambda: model.influences(x_test, y_test, x, y).numpy(),
        "hand-written 4×4 block loop": hand_blocked,
        "sequential": lambda: (
            sequential.influences(test_batches, train_batches)
            .compute(NestedTorchCatAggregator())
            .numpy()
        ),
        "dask synchronous": lambda: synchronous.influences(da_xt, da_yt, da_x, da_y).compute(
            scheduler="synchronous"
        ),
    }
    with contextlib.ExitStack() as stack:
        if not args.no_cluster:
            import dask
            from distributed import Client, LocalCluster

            from prefect_influence import TORCH_WORKER_DASK_CONFIG

            n_workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
            stack.enter_context(dask.config.set(TORCH_WORKER_DASK_CONFIG))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                )
            )
            client = stack.enter_context(Client(cluster))
            start = time.perf_counter()
            distributed = DaskInfluenceCalculator(model, converter, client)
            print(
                f"scatter of the fitted model to {n_workers} workers (not timed below): "
                f"{time.perf_counter() - start:.1f} s"
            )
            paths[f"dask LocalCluster {n_workers}×1 thread"] = lambda: client.compute(
                distributed.influences(da_xt, da_yt, da_x, da_y)
            ).result()
        timings, results = interleaved_best_times(paths, args.repeat)
    expected = results["in-memory model.influences"]
    for name, values in results.items():
        check(values, expected, name)

    base = timings["in-memory model.influences"]
    for name, seconds in timings.items():
        print(f"time {name}: {seconds:.3f} s")
    floor = timings["hand-written 4×4 block loop"]
    for name, seconds in timings.items():
        if name != "in-memory model.influences":
            print(
                f"ratio {name} / in-memory: {seconds / base:.2f} "
                f"(/ hand-written block loop: {seconds / floor:.2f})"
            )


def check(values, expected, name: str) -> None:
    # float32 model: blocks and the full matrix differ by BLAS summation order only
    scale = float(np.abs(expected).max())
    error = float(np.abs(values - expected).max())
    if values.shape != expected.shape or error > 1e-4 * scale:
        raise AssertionError(f"{name}: max |difference| {error:.3g} (scale {scale:.3g})")


if __name__ == "__main__":
    main()
