"""Benchmark: the score stage (``pipeline.column_stage`` over every train chunk, influences from
stored factors) against bare PyTorch doing only the unavoidable work for the same shapes.

The bare baseline holds data and factors in memory and does, with the same single torch thread
as the stage: per-sample gradients of every train point once (``torch.func.vmap(grad(...))``,
train chunk by train chunk) and one GEMM ``factors (n_test × p) @ grads.T (p × n_train)``.
Ours does the same arithmetic plus what a real job needs: reading the train rows and factor
chunks from zarr, input checks, writing every block to zarr with its sha256 completion record.
Self-influence and the top-k summary are off (the baseline has neither). Chunk sizes are
``auto`` for two workers, as the flow would pick. Both run once untimed on a small job first (torch.func, zarr warm-up);
then bare and ours run alternately ``--repeat`` times (3) and the fastest of each counts.

Rows: the 10k-parameter MLP (GEMM-bound) and a small 610-parameter MLP (gradient- and
I/O-bound), on the CPU; where torch sees a GPU, both rows again with ``device: cuda`` (the
stage's model and blocks on the GPU; the baseline's data, factors, gradients and GEMM there too,
plus the copy of the scores to host memory, without which nothing can be stored). Without a GPU
the GPU rows print "not measured". ``--device cpu`` runs those device rows on the CPU instead,
which checks their code path on a machine without a GPU (its ratio is not the GPU figure).

    python benchmarks/roofline.py [--quick] [--device auto|cuda|cpu|none]

Last lines: per row ``ours / bare`` (target ≤ 1.25).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

TARGET = 1.25
FIT = {"name": "arnoldi", "rank": 10, "krylov_dimension": 20, "regularization": 0.01}


def bare_scores(net, x, y, factors, ranges):
    """Per-sample gradients once (vmap(grad)) and one GEMM: the unavoidable work. On a GPU
    (everything on the network's device) the scores are copied to host memory at the end."""
    import torch
    from torch.func import functional_call, grad, vmap
    from torch.nn import functional as F

    params = {k: v.detach() for k, v in net.named_parameters()}
    device = next(iter(params.values())).device

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    n_params = sum(v.numel() for v in params.values())
    grads = torch.empty(x.shape[0], n_params, device=device)
    for s0, s1 in ranges:
        g = per_sample(params, x[s0:s1], y[s0:s1])
        grads[s0:s1] = torch.cat([t.reshape(s1 - s0, -1) for t in g.values()], dim=1)
    return (factors @ grads.T).cpu()  # a no-op on the CPU; on a GPU it waits for the device


def run_row(
    label: str,
    hidden: int,
    n_test: int,
    n_train: int,
    root: Path,
    repeat: int = 3,
    device: str = "cpu",
) -> tuple[float, float, float]:
    import torch

    from prefect_influence import pipeline
    from prefect_influence.storage import FACTORS, INFLUENCES, InfluenceStore

    torch.set_num_threads(1)  # the stage computes with one torch thread
    paths = common.write_job(root / f"{label}-data", n_train, n_test, hidden)
    warm = common.write_job(root / f"{label}-warm", 512, 64, hidden)
    net = common.load_network(paths).to(device)

    def prepare(p, out):
        config = common.job_config(
            p, str(out), method=FIT, self_influence=False, summary=False, device=device
        )
        plan = pipeline.plan_job(config, n_workers=2)
        pipeline.fit_stage(config)
        for i in range(plan.grid.shape[0]):
            pipeline.factors_stage(config, i)
        return config, plan.grid

    # warm-up: the whole column stage and the baseline once on a small job
    wconfig, wgrid = prepare(warm, root / f"{label}-warm-out")
    for j in range(wgrid.shape[1]):
        pipeline.column_stage(wconfig, j)
    wdata = common.load_job_arrays(warm)
    wf = torch.from_numpy(np.array(InfluenceStore(wconfig.output).read_chunk(FACTORS, wgrid, (0,))))
    bare_scores(
        net,
        torch.from_numpy(wdata["x_train"]).to(device),
        torch.from_numpy(wdata["y_train"]).to(device),
        wf.to(device),
        wgrid.train_ranges,
    )

    config, grid = prepare(paths, root / f"{label}-out")
    store = InfluenceStore(config.output)
    factors = torch.from_numpy(np.asarray(store.group[FACTORS][...])).to(device)
    data = common.load_job_arrays(paths)
    x, y = (
        torch.from_numpy(data["x_train"]).to(device),
        torch.from_numpy(data["y_train"]).to(device),
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the copies are done before the first timing
    print(
        f"-- {label} on {device}: p = {grid.n_parameters}, {n_test} test × {n_train} train, grid "
        f"{grid.shape[0]} × {grid.shape[1]} blocks of {grid.test_chunk} × {grid.train_chunk}, "
        f"scores {n_test * n_train * 4 / 2**20:.0f} MiB",
        flush=True,
    )

    def ours() -> float:
        # a fresh grid each time: drop the blocks and their records (factors stay)
        for sub in ("influences/c", "records/influences"):
            shutil.rmtree(root / f"{label}-out" / sub, ignore_errors=True)
        start = time.perf_counter()
        for j in range(grid.shape[1]):
            pipeline.column_stage(config, j)  # stored blocks: on the host when it returns
        return time.perf_counter() - start

    t_bare, t_ours = [], []
    for _ in range(repeat):  # alternating, the fastest of each counts (the machine is noisy)
        start = time.perf_counter()
        expected = bare_scores(net, x, y, factors, grid.train_ranges)
        t_bare.append(time.perf_counter() - start)
        del expected
        t_ours.append(ours())
    expected = bare_scores(net, x, y, factors, grid.train_ranges)

    got = np.asarray(store.group[INFLUENCES][...])
    scale = float(np.abs(expected.numpy()).max())
    err = float(np.abs(got - expected.numpy()).max())
    # float32, same arithmetic in blocks vs one GEMM: only the summation order differs
    assert err <= 1e-4 * scale, (
        f"{label}: stage and baseline differ by {err:.3g} (scale {scale:.3g})"
    )
    ratio = min(t_ours) / min(t_bare)
    print(
        f"   bare PyTorch {', '.join(f'{t:.2f}' for t in t_bare)} s, column stages "
        f"{', '.join(f'{t:.2f}' for t in t_ours)} s (alternating), max |difference| {err:.1e} "
        f"(scale {scale:.1e})",
        flush=True,
    )
    shutil.rmtree(root / f"{label}-out", ignore_errors=True)
    return min(t_ours), min(t_bare), ratio


def device_rows(choice: str) -> Optional[str]:
    """The device of the GPU rows: ``auto`` is ``cuda`` where torch sees a GPU, else none."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return None if choice == "none" else choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    parser.add_argument("--rows", default="mlp10k,mlp610")
    parser.add_argument("--repeat", type=int, default=3, help="alternating timed runs of each side")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu", "none"],
        help="device of the GPU rows (auto: cuda if torch sees a GPU, else none; "
        "cpu: run them on the CPU to check their code path)",
    )
    args = parser.parse_args()
    shapes = {  # label: (hidden, n_test, n_train)
        "mlp10k": (134, 1000, 8000) if not args.quick else (134, 500, 2000),
        "mlp610": (8, 2000, 50000) if not args.quick else (8, 1000, 10000),
    }
    gpu = device_rows(args.device)
    no_gpu_rows = f"not run (--device {args.device}" + (
        ", torch sees no GPU)" if args.device == "auto" else ")"
    )
    common.header(
        "roofline: column stage vs bare PyTorch (grads once + one GEMM), 1 torch thread",
        gpu_rows=gpu or no_gpu_rows,
    )
    labels = args.rows.split(",")
    # (row name, shape label, device): the CPU rows, then the same shapes on the GPU rows' device
    runs = [(f"{label} CPU", label, "cpu") for label in labels]
    if gpu:
        suffix = "GPU" if gpu.startswith("cuda") else f"GPU-row path on {gpu}, not a GPU figure"
        runs += [(f"{label} {suffix}", label, gpu) for label in labels]
    root = Path(tempfile.mkdtemp(prefix="bench-roofline-"))
    results = []
    try:
        for name, label, device in runs:
            results.append(
                (
                    name,
                    *run_row(
                        f"{label}-{len(results)}-{device}",
                        *shapes[label],
                        root,
                        args.repeat,
                        device,
                    ),
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for label, t_ours, t_bare, _ in results:
        print(f"time {label}: column stages {t_ours:.2f} s, bare PyTorch {t_bare:.2f} s")
    if not gpu:
        print(f"ratio GPU: not measured, GPU rows {no_gpu_rows}")
    judged = " (quick size: not judged)" if args.quick else ""
    for label, _, _, ratio in results:
        print(
            f"ratio {label} ours / bare: {ratio:.2f} (target <= {TARGET}: "
            f"{common.verdict(ratio <= TARGET)}){judged}"
        )


if __name__ == "__main__":
    main()
