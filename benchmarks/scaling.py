"""Benchmark: how the Dask calculator's time grows with n_train (×1, ×2, ×4) and shrinks with
workers (1, 2).

The 10k-parameter MLP, 1,000 test points, n_train = 5,000 · (1, 2, 4) in fixed chunks (500 test,
1,250 train: the work per task stays the same, the number of columns grows), Arnoldi (rank 20)
fitted once on the first 5,000 train points and scattered to each cluster before timing.
``DaskInfluenceCalculator.influences(...).compute()`` on a LocalCluster of single-threaded
workers started as the pipeline starts them (``TORCH_WORKER_DASK_CONFIG``); one untimed warm-up
at ×1 per cluster, then the best of ``--repeat`` runs at each size.

    python benchmarks/scaling.py [--base 5000] [--n-test 1000] [--repeat 2] [--quick]

Last lines: time per n_train relative to ×1 (near-linear: ×2 → ~2, ×4 → ~4), and the speed-up
of the second worker at each size.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

MULTIPLES = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=5000, help="n_train at ×1")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=134)
    parser.add_argument("--train-chunk", type=int, default=1250)
    parser.add_argument("--test-chunk", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per size (best counts)")
    parser.add_argument("--quick", action="store_true", help="base 1,250, 250 test, 1 run")
    args = parser.parse_args()
    if args.quick:
        args.base, args.n_test, args.train_chunk, args.test_chunk = 1250, 250, 625, 125
        args.repeat = 1

    import dask
    import dask.array as da
    import torch
    from distributed import Client, LocalCluster
    from torch.nn import functional as F

    from prefect_influence import (
        TORCH_WORKER_DASK_CONFIG,
        DaskInfluenceCalculator,
        TorchNumpyConverter,
    )
    from prefect_influence.torch import ArnoldiInfluence

    n_max = args.base * MULTIPLES[-1]
    x, y = common.make_data(n_max, seed=0)
    xt, yt = common.make_data(args.n_test, seed=1)
    net = common.train_network(args.hidden, x, y)
    model = ArnoldiInfluence(net, F.cross_entropy, 0.01, rank=20, krylov_dimension=40)
    fit_x, fit_y = torch.from_numpy(x[: args.base]), torch.from_numpy(y[: args.base])
    model.fit([(fit_x[i : i + 256], fit_y[i : i + 256]) for i in range(0, args.base, 256)])
    common.header(
        "scaling: DaskInfluenceCalculator time vs n_train and workers",
        job=f"MLP p = {model.n_parameters}, {args.n_test} test × n_train "
        f"{[args.base * m for m in MULTIPLES]}, chunks {args.test_chunk} × "
        f"{args.train_chunk}, Arnoldi rank 20",
    )
    da_xt = da.from_array(xt, chunks=(args.test_chunk, -1))
    da_yt = da.from_array(yt, chunks=args.test_chunk)
    times: dict[tuple[int, int], float] = {}
    for workers in (1, 2):
        with (
            dask.config.set(TORCH_WORKER_DASK_CONFIG),
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            calculator = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
            for m in MULTIPLES:
                n = args.base * m
                da_x = da.from_array(x[:n], chunks=(args.train_chunk, -1))
                da_y = da.from_array(y[:n], chunks=args.train_chunk)
                # the warm-up (at ×1 only) is best_time's untimed first call
                times[(workers, m)], values = common.best_time(
                    lambda c=calculator, x=da_x, y=da_y: c.influences(da_xt, da_yt, x, y).compute(),
                    args.repeat,
                    warmup=m == 1,
                )
                assert values.shape == (args.n_test, n) and np.isfinite(values).all()
            print(
                f"   {workers} worker(s): "
                + ", ".join(
                    f"n_train {args.base * m}: {times[(workers, m)]:.2f} s" for m in MULTIPLES
                ),
                flush=True,
            )

    for workers in (1, 2):
        print(
            f"time {workers} worker(s): "
            + ", ".join(f"×{m} {times[(workers, m)]:.2f} s" for m in MULTIPLES)
        )
    for workers in (1, 2):
        base = times[(workers, 1)]
        print(
            f"ratio {workers} worker(s) time / time at ×1: "
            + ", ".join(f"×{m} -> {times[(workers, m)] / base:.2f}" for m in MULTIPLES[1:])
            + " (linear: 2.00, 4.00)"
        )
    print(
        "ratio speed-up 1 -> 2 workers: "
        + ", ".join(f"×{m} {times[(1, m)] / times[(2, m)]:.2f}x" for m in MULTIPLES)
        + " (ideal 2.00x)"
    )


if __name__ == "__main__":
    main()
