"""Benchmark: the whole Prefect flow at ``auto`` chunking against the calculator alone, and
against the same stages called in-process, on a job of about a minute or more.

The job: the 10k-parameter MLP, 2,000 test × 90,000 train, Arnoldi (rank 20), output to a
local zarr directory. Timed runs, each on a fresh output, alternating (the machine's load
drifts), on ``--workers`` single-threaded Dask workers (default 2, what the flow picks here):

* ``calculator``: what a user of the library does without the flow: start a ``LocalCluster``
  (``TORCH_WORKER_DASK_CONFIG``), fit the model in this process, then
  ``DaskInfluenceCalculator(...).influences(x_test, y_test, x, y).to_zarr(url)`` with the
  chunk sizes ``auto`` picks. The baseline of the target.
* ``flow``: ``influence_pipeline`` with the same worker count and ``auto`` chunking, the same
  work: self-influence and the top-k summary off (the calculator computes neither); it still
  plans and fingerprints, writes per-chunk checksums and completion records, progress and
  artifacts, and runs every task through the Prefect API. Overhead = flow / calculator − 1
  (target ≤ 10%).
* ``in-process`` (one run, for reference): plan, fit, factors, columns and summary through
  ``prefect_influence.pipeline`` in this process, one torch thread: the work with neither Prefect
  nor Dask; its ratio to the flow shows what the second worker buys on this machine.

The ephemeral Prefect API is started once before the flows and timed apart (a deployment talks
to a running server).

    python benchmarks/overhead.py [--n-train 90000] [--n-test 2000] [--workers 2] [--quick]

Last lines: each side's time, the flow's speed-up over in-process, and the flow's overhead over
the calculator (target ≤ 10%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TARGET = 0.10
METHOD = {"name": "arnoldi", "rank": 20, "krylov_dimension": 40, "regularization": 0.01}


def calculator_run(
    paths: dict, output: str, n_workers: int, chunks: tuple[int, int], fit_batch_size: int
) -> dict[str, float]:
    """Cluster start + fit + ``DaskInfluenceCalculator.influences(...).to_zarr``; seconds."""
    import dask
    import dask.array as da
    import torch
    from distributed import Client, LocalCluster
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_influence import (
        TORCH_WORKER_DASK_CONFIG,
        DaskInfluenceCalculator,
        TorchNumpyConverter,
    )
    from prefect_influence.torch import ArnoldiInfluence

    start = time.perf_counter()
    arrays = common.load_job_arrays(paths)
    with (
        dask.config.set(TORCH_WORKER_DASK_CONFIG),
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        t_cluster = time.perf_counter()
        model = ArnoldiInfluence(
            common.load_network(paths),
            F.cross_entropy,
            METHOD["regularization"],
            rank=METHOD["rank"],
            krylov_dimension=METHOD["krylov_dimension"],
        )
        x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
        model.fit(DataLoader(TensorDataset(x, y), batch_size=fit_batch_size))
        t_fit = time.perf_counter()
        train_chunk, test_chunk = chunks
        lazy = DaskInfluenceCalculator(model, TorchNumpyConverter(), client).influences(
            da.from_array(arrays["x_test"], chunks=(test_chunk, -1)),
            da.from_array(arrays["y_test"], chunks=test_chunk),
            da.from_array(arrays["x_train"], chunks=(train_chunk, -1)),
            da.from_array(arrays["y_train"], chunks=train_chunk),
        )
        lazy.to_zarr(output, compressors=None)  # as the flow stores scores: uncompressed
        end = time.perf_counter()
    return {
        "cluster": t_cluster - start,
        "fit": t_fit - t_cluster,
        "grid": end - t_fit,
        "total": end - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=90000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=134)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each of the two sides")
    parser.add_argument("--quick", action="store_true", help="6,000 × 500 (a ~5 s job: not judged)")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.repeat = 6000, 500, 1

    import torch

    from prefect_influence import pipeline
    from prefect_influence.flows import influence_pipeline
    from prefect_influence.flows.cluster import wait_for_closing_clusters

    # the fit runs in this process on every path; one thread keeps it immune to oversubscribed
    # cores (2 OpenMP threads on a busy 2-core machine slow down many-fold); chunks use 1 anyway
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    p = common.n_parameters(args.hidden)
    chunks = pipeline.auto_chunk_sizes(args.n_train, args.n_test, p, args.workers)
    try:
        paths = common.write_job(root / "data", args.n_train, args.n_test, args.hidden)
        warm = common.write_job(root / "warm", 600, 60, args.hidden)
        common.header(
            "overhead: whole flow (auto chunking) vs the calculator alone",
            job=f"MLP p = {p}, {args.n_test} test × {args.n_train} train, "
            f"{METHOD['name']} rank {METHOD['rank']}",
            auto_chunks=f"{args.workers} worker(s): train {chunks[0]}, test {chunks[1]}",
        )
        cfg = lambda out, **kw: common.job_config(  # noqa: E731
            paths,
            str(root / out),
            method=METHOD,
            n_workers=args.workers,
            self_influence=False,
            summary=False,
            **kw,
        )
        fit_batch_size = cfg("probe").method.fit_batch_size

        common.run_stages_in_process(common.job_config(warm, str(root / "warm-out"), method=METHOD))
        t_api = common.start_prefect_api()
        print(f"   Prefect API start (not counted): {t_api:.1f} s", flush=True)
        inproc = common.run_stages_in_process(cfg("inproc"))
        print(
            "   in-process: " + ", ".join(f"{k} {v:.1f} s" for k, v in inproc.items()), flush=True
        )
        calc, flows = [], []
        for r in range(args.repeat):
            t = calculator_run(
                paths, str(root / f"calc{r}.zarr"), args.workers, chunks, fit_batch_size
            )
            calc.append(t)
            print("   calculator: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()), flush=True)
            start = time.perf_counter()
            result = influence_pipeline(cfg(f"flow{r}"))
            flows.append(time.perf_counter() - start)
            wait_for_closing_clusters()  # not timed (the calculator's close is not either)
            print(
                f"   flow: {flows[-1]:.1f} s, grid {result['grid']}, phases {result['seconds']}",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = min(t["total"] for t in calc)
    flow = min(flows)
    overhead = flow / base - 1
    judged = "" if base >= 60 else f" (job only {base:.0f} s < 60 s: not judged)"
    print(
        f"time calculator alone: {base:.1f} s (best of {[round(t['total'], 1) for t in calc]}), "
        f"flow: {flow:.1f} s (best of {[round(t, 1) for t in flows]}), in-process stages "
        f"(1 thread, no Dask): {inproc['total']:.1f} s; not counted: the ephemeral Prefect "
        f"API's start, {t_api:.1f} s once per process (deployments talk to a running server)"
    )
    print(
        f"ratio in-process / flow: {inproc['total'] / flow:.2f}x speed-up from "
        f"{args.workers} workers"
    )
    print(
        f"ratio flow / calculator alone: {flow / base:.3f} -> overhead {overhead:+.1%} "
        f"(target <= {TARGET:.0%}: {common.verdict(overhead <= TARGET)}){judged}"
    )


if __name__ == "__main__":
    main()
