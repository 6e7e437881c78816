"""Benchmark: peak memory of a whole flow run whose score grid is far larger than the target.

Default: 5,000 test × 200,000 train scores in float32 (4.0 GB, 3.7 GiB) with the small 610-parameter
MLP (64 → 8 → 10), Arnoldi (rank 10), self-influence and the top-k summary on, ``auto``
chunking, a LocalCluster of ``--workers`` single-threaded workers. A background thread samples
every process of the run (this flow process with its Dask scheduler, the nannies and workers,
the ephemeral Prefect API server) with psutil: the summed RSS counts shared library pages once
per process (an upper bound), PSS splits them between processes (the true total).

    python benchmarks/memory.py [--n-test 5000] [--n-train 200000] [--workers 2] [--quick]

Judged: the peak, over the samples, of the summed RSS of this flow process and the Dask
processes (target < 2 GB, i.e. 2·10⁹ bytes, for a grid of ≥ 4 GB of scores; decimal units as the
target is stated). The Prefect API server is left out of the judged figure: a deployment's runs talk to
a server that runs anyway, and its memory does not grow with the job; the totals with it (RSS
and PSS) are printed on the line before.
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

TARGET = 2e9  # bytes: 2 GB
JUDGED_FROM = 4e9  # bytes of float32 scores: 4 GB
SERVER = "prefect API server"
# the fit is not what this measures: a small Krylov space keeps it short
METHOD = {"name": "arnoldi", "rank": 10, "krylov_dimension": 20, "regularization": 0.01}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--n-train", type=int, default=200000)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1,000 × 50,000 (0.2 GB: not judged)")
    parser.add_argument("--keep", action="store_true", help="keep the output (printed path)")
    args = parser.parse_args()
    if args.quick:
        args.n_test, args.n_train = 1000, 50000

    from prefect_influence import pipeline
    from prefect_influence.flows import influence_pipeline
    from prefect_influence.flows.cluster import wait_for_closing_clusters

    grid_bytes = args.n_test * args.n_train * 4
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        paths = common.write_job(root / "data", args.n_train, args.n_test, args.hidden)
        p = common.n_parameters(args.hidden)
        train_chunk, test_chunk = pipeline.auto_chunk_sizes(
            args.n_train, args.n_test, p, args.workers
        )
        common.header(
            "memory: peak memory of a whole flow run",
            job=f"MLP p = {p}, {args.n_test} test × {args.n_train} train = "
            f"{common.gb(grid_bytes)} of float32 scores, {METHOD['name']} rank "
            f"{METHOD['rank']}, self-influence + top-k summary",
            auto_chunks=f"train {train_chunk}, test {test_chunk} ({args.workers} workers)",
        )
        config = common.job_config(paths, str(root / "out"), method=METHOD, n_workers=args.workers)
        t_api = common.start_prefect_api()
        print(f"   Prefect API start: {t_api:.1f} s", flush=True)
        with common.TreeMemorySampler(interval=0.5, apart=(SERVER,)) as mem:
            start = time.perf_counter()
            result = influence_pipeline(config)
            elapsed = time.perf_counter() - start
            wait_for_closing_clusters()  # its workers are sampled until they are gone
        print(
            f"   flow: {elapsed:.1f} s, grid {result['grid']}, phases {result['seconds']}",
            flush=True,
        )
        print(
            "   peak RSS by role: "
            + ", ".join(f"{k} {common.gib(v)}" for k, v in sorted(mem.peak_by_role.items())),
            flush=True,
        )
        print(
            "   at the peak: "
            + ", ".join(f"{k} {common.gib(v)}" for k, v in sorted(mem.at_peak.items())),
            flush=True,
        )
        if args.keep:
            print(f"   output kept at {root / 'out'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    server = mem.peak_by_role.get(SERVER, 0)
    judged = "" if grid_bytes >= JUDGED_FROM else " (grid below 4 GB: not judged)"
    print(
        f"time flow: {elapsed:.1f} s for {common.gb(grid_bytes)} of scores ({mem.samples} samples)"
    )
    print(
        f"memory peak of all processes with the Prefect API server: summed RSS "
        f"{common.gb(mem.peak_rss)}, PSS {common.gb(mem.peak_pss)}; server alone "
        f"{common.gb(server)}; flow + Dask processes PSS {common.gb(mem.peak_pss_rest)}"
    )
    print(
        f"ratio peak summed RSS (flow + Dask processes) / scores: "
        f"{mem.peak_rss_rest / grid_bytes:.3f}; {common.gb(mem.peak_rss_rest)} "
        f"(target < {common.gb(TARGET)}: {common.verdict(mem.peak_rss_rest < TARGET)}){judged}"
    )


if __name__ == "__main__":
    main()
