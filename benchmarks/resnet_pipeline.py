"""Benchmark: a ResNet-18 (11.2M parameters) through the whole EK-FAC pipeline flow.

A CIFAR-style ResNet-18 (BasicBlocks 64-128-256-512, BatchNorm in eval mode with its affine
parameters frozen: EK-FAC takes the 21 Conv2d and the Linear layers), seeded weights and
seeded 3 × 32 × 32 images of 10 classes, EK-FAC with the sampled-label Fisher, self-influence
on, run by ``influence_pipeline`` (Prefect + a Dask ``LocalCluster`` of ``--workers``
single-threaded workers) from zarr inputs to a zarr output. A background thread samples the
memory of every process of the run. Then the same flow is run again on the finished output,
which must reuse every block (resume).

    python benchmarks/resnet_pipeline.py [--n-test 100] [--n-train 1000] [--workers 2] [--quick]

Judged: the peak summed RSS of the flow process and its Dask processes (target < 8 GB). The
time of each phase is printed, with the work it did, so larger jobs can be extrapolated.
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

TARGET = 8e9  # bytes: 8 GB, all processes of the run
SERVER = "prefect API server"
FACTORY = "resnet_pipeline:build_resnet"


def build_resnet(width: int = 64, n_classes: int = 10, seed: int = 0):
    """A CIFAR-style ResNet-18 (``width`` channels in the first stage), BatchNorm frozen."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    torch.manual_seed(seed)
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c_in = width
    for i, c in enumerate(widths):
        layers += [Block(c_in, c, 1 if i == 0 else 2), Block(c, c, 1)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    net = nn.Sequential(*layers)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)  # EK-FAC covers Conv2d and Linear; BN stays fixed
    return net.eval()


def write_inputs(root: Path, n_train: int, n_test: int, width: int) -> dict:
    """Seeded images (class patterns + noise) as zarr groups, and the network's checkpoint.

    Inputs already in ``root`` (a kept work directory) are reused when their sizes match.
    """
    import numpy as np
    import torch
    import zarr

    paths = {name: str(root / f"{name}.zarr") for name in ("train", "test")}
    paths["checkpoint"] = str(root / "model.pt")
    if (root / "model.pt").exists():
        for name, n in (("train", n_train), ("test", n_test)):
            rows = zarr.open_group(paths[name], mode="r")["x"].shape[0]
            if rows != n:
                raise SystemExit(f"{paths[name]} holds {rows} rows, not {n}: another job's inputs")
        return paths
    root.mkdir(parents=True, exist_ok=True)
    patterns = np.random.default_rng(12345).normal(0, 1, (10, 3, 32, 32)).astype(np.float32)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, n).astype(np.int64)
        x = (patterns[y] + rng.normal(0, 1, (n, 3, 32, 32))).astype(np.float32)
        group = zarr.open_group(paths[name], mode="w")
        group.create_array("x", data=x, chunks=(min(n, 1000), 3, 32, 32))
        group.create_array("y", data=y, chunks=(min(n, 1000),))
    torch.save(build_resnet(width).state_dict(), paths["checkpoint"])
    return paths


def chunk_size(value: str):
    return value if value == "auto" else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-chunk", type=chunk_size, default=125, help="rows, or auto")
    parser.add_argument("--test-chunk", type=chunk_size, default=25, help="rows, or auto")
    parser.add_argument("--width", type=int, default=64, help="first-stage channels (64: 11.2M)")
    parser.add_argument("--fit-batch", type=int, default=64, help="method.fit_batch_size")
    parser.add_argument("--quick", action="store_true", help="width 16, 20 test × 100 train")
    parser.add_argument("--keep", action="store_true", help="keep the output (printed path)")
    parser.add_argument(
        "--workdir", type=Path, help="keep inputs and output here; resume a stopped job there"
    )
    args = parser.parse_args()
    if args.quick:
        args.n_test, args.n_train, args.width = 20, 100, 16
        args.train_chunk, args.test_chunk = 50, 10
    # the Dask workers import the model factory from this directory
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )

    from prefect_influence.config import PipelineConfig
    from prefect_influence.flows import influence_pipeline
    from prefect_influence.flows.cluster import wait_for_closing_clusters

    net = build_resnet(args.width)
    p = sum(t.numel() for t in net.parameters() if t.requires_grad)
    frozen = sum(t.numel() for t in net.parameters() if not t.requires_grad)
    factors_bytes = args.n_test * p * 4
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.keep = True
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-resnet-"))
    resuming = (root / "out" / "manifest.json").exists()
    try:
        paths = write_inputs(root / "data", args.n_train, args.n_test, args.width)
        common.header(
            "resnet_pipeline: a ResNet-18 through the EK-FAC pipeline flow",
            job=f"p = {p:,} trainable ({frozen:,} BatchNorm frozen), {args.n_test} test × "
            f"{args.n_train} train, factors {common.gb(factors_bytes)}",
            chunks=f"train {args.train_chunk}, test {args.test_chunk}, {args.workers} workers",
        )
        config = PipelineConfig.model_validate(
            {
                "model": {
                    "factory": FACTORY,
                    "factory_kwargs": {"width": args.width},
                    "checkpoint": paths["checkpoint"],
                },
                "data": {"train": paths["train"], "test": paths["test"]},
                "method": {
                    "name": "ekfac",
                    "regularization": 1e-3,
                    "fisher": "sampled",
                    "fit_batch_size": args.fit_batch,
                },
                "train_chunk_size": args.train_chunk,
                "test_chunk_size": args.test_chunk,
                "n_workers": args.workers,
                "output": str(root / "out"),
                "overwrite": not resuming,
            }
        )
        t_api = common.start_prefect_api()
        print(f"   Prefect API start: {t_api:.1f} s", flush=True)
        # RSS alone: PSS reads each process's page tables (smaps), which at a worker's
        # gigabytes every half second takes CPU time from the job it measures
        with common.TreeMemorySampler(interval=0.5, apart=(SERVER,), pss=False) as mem:
            start = time.perf_counter()
            result = influence_pipeline(config)
            elapsed = time.perf_counter() - start
            wait_for_closing_clusters()
        done = (result["blocks_computed"], result["blocks_reused"])
        print(f"   flow: {elapsed:.1f} s, phases {result['seconds']}", flush=True)
        print(f"   blocks computed/reused {done}{' (resumed)' if resuming else ''}", flush=True)
        print(
            "   peak RSS by role: "
            + ", ".join(f"{k} {common.gib(v)}" for k, v in sorted(mem.peak_by_role.items())),
            flush=True,
        )
        again = config.model_copy(update={"overwrite": False})
        start = time.perf_counter()
        rerun = influence_pipeline(again)
        rerun_s = time.perf_counter() - start
        wait_for_closing_clusters()
        reused = (rerun["blocks_computed"], rerun["blocks_reused"])
        from prefect_influence.storage import InfluenceStore

        grid = InfluenceStore(config.output).read_manifest().grid
        print(f"   grid: chunks of {grid.train_chunk} train × {grid.test_chunk} test", flush=True)
        print(f"   rerun: {rerun_s:.1f} s, blocks computed/reused {reused}", flush=True)
        if args.keep:
            print(f"   output kept at {root / 'out'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    seconds = result["seconds"]
    resumed = (
        f", resuming a stopped job: {done[0]} blocks computed, {done[1]} reused" if resuming else ""
    )
    print(
        f"time flow: {elapsed:.1f} s for {args.n_test} test × {args.n_train} train "
        f"(chunks {grid.train_chunk} × {grid.test_chunk}{resumed}), p = {p:,} "
        f"(phases: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}); rerun on the "
        f"finished output {rerun_s:.1f} s ({reused[0]} blocks computed, {reused[1]} reused)"
    )
    print(
        f"memory peak, flow + Dask processes: summed RSS {common.gb(mem.peak_rss_rest)} "
        f"(target < {common.gb(TARGET)}: {common.verdict(mem.peak_rss_rest < TARGET)}); with "
        f"the Prefect API server {common.gb(mem.peak_rss)}"
    )


if __name__ == "__main__":
    main()
