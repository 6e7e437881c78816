"""Benchmark: the whole Prefect flow at ``auto`` chunking against the same stages called
in-process one after the other (no Prefect, no Dask), on a job of about a minute or more.

The job: the 10k-parameter MLP, 2,000 test × 30,000 train, Arnoldi (rank 20), self-influence
and the top-k summary on, output to a local zarr directory. Four timed runs, each on a fresh
output (in-process, flow 1 worker, in-process, flow 2 workers; the in-process time is the mean):

* ``in-process``: plan, fit, factors, columns, summary through ``prefect_influence.stages``
  in this process (one torch thread per chunk, as in the tasks): the work itself.
* ``flow 1 worker``: ``influence_pipeline`` with a one-worker LocalCluster: the same work
  plus everything the flow adds (task runs and states on the API, cluster and worker start,
  the model loaded again in the worker, artifacts). Overhead = flow / in-process - 1.
* ``flow 2 workers``: the default on this machine; its speed-up over in-process.

The ephemeral Prefect API is started once before the flows and timed apart (a deployment talks
to a running server). Chunk sizes are whatever ``auto_chunk_sizes`` picks for the worker count.

    python benchmarks/overhead.py [--n-train 30000] [--n-test 2000] [--quick]

Last lines: overhead without the fit, speed-up at two workers, overhead of the whole flow at one
worker (target ≤ 10%).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=30000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=134)
    parser.add_argument("--quick", action="store_true", help="6,000 × 500 (a ~5 s job: not judged)")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test = 6000, 500

    import torch

    from prefect_influence import stages
    from prefect_influence.flows import influence_pipeline

    # the fit runs in this process on both paths; one thread keeps it immune to oversubscribed
    # cores (2 OpenMP threads on a busy 2-core machine slow down many-fold); chunks use 1 anyway
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        paths = common.write_job(root / "data", args.n_train, args.n_test, args.hidden)
        warm = common.write_job(root / "warm", 600, 60, args.hidden)
        chunks = {w: stages.auto_chunk_sizes(args.n_train, args.n_test, common.n_parameters(args.hidden), w)
                  for w in (1, 2)}
        common.header("overhead: whole flow (auto chunking) vs the stages in-process",
                      job=f"MLP p = {common.n_parameters(args.hidden)}, {args.n_test} test × "
                          f"{args.n_train} train, {METHOD['name']} rank {METHOD['rank']}, "
                          "self-influence + top-k summary",
                      auto_chunks=", ".join(f"{w} worker(s): train {c[0]}, test {c[1]}"
                                            for w, c in chunks.items()))
        cfg = lambda out, **kw: common.job_config(paths, str(root / out), method=METHOD, **kw)  # noqa: E731

        common.run_stages_in_process(common.job_config(warm, str(root / "warm-out"), method=METHOD))
        t_api = common.start_prefect_api()
        print(f"   Prefect API start (not counted): {t_api:.1f} s", flush=True)
        # in-process before and after the one-worker flow: the machine's load drifts
        inproc, flows, fits = [], {}, {}
        for run in ("inproc", 1, "inproc", 2):
            if run == "inproc":
                t = common.run_stages_in_process(cfg(f"inproc{len(inproc)}", n_workers=1))
                inproc.append(t)
                print("   in-process: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()), flush=True)
                continue
            start = time.perf_counter()
            result = influence_pipeline(cfg(f"flow{run}", n_workers=run))
            flows[run], fits[run] = time.perf_counter() - start, result["seconds"]["fit"]
            print(f"   flow {run} worker(s): {flows[run]:.1f} s, grid {result['grid']}, "
                  f"phases {result['seconds']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = sum(t["total"] for t in inproc) / len(inproc)
    base_nofit = sum(t["total"] - t["fit"] for t in inproc) / len(inproc)
    overhead = flows[1] / base - 1
    overhead_nofit = (flows[1] - fits[1]) / base_nofit - 1
    judged = "" if base >= 60 else f" (job only {base:.0f} s < 60 s: not judged)"
    print(f"time in-process stages: {base:.1f} s (mean of {[round(t['total'], 1) for t in inproc]}), "
          f"flow 1 worker: {flows[1]:.1f} s, flow 2 workers: {flows[2]:.1f} s")
    print(f"ratio flow 1 worker / in-process without the fit: {overhead_nofit + 1:.3f} "
          f"-> overhead {overhead_nofit:+.1%}")
    print(f"ratio in-process / flow 2 workers: {base / flows[2]:.2f}x speed-up "
          f"(parallel efficiency {base / flows[2] / 2:.0%} of 2 workers)")
    print(f"ratio flow 1 worker / in-process: {flows[1] / base:.3f} -> overhead {overhead:+.1%} "
          f"(target <= {TARGET:.0%}: {common.verdict(overhead <= TARGET)}){judged}")


if __name__ == "__main__":
    main()
