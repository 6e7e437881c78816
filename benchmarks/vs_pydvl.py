"""Benchmark: our DaskInfluenceCalculator against pyDVL 0.10's, same model, data, method and grid.

An MLP 64 → 134 → 10 (10,060 parameters, trained) on 500 train / 40 test Gaussian-cluster points, cut into
the same 4 × 4 block grid on both sides; each side fits its own influence model (timed apart)
and then runs ``DaskInfluenceCalculator(...).influences(x_test, y_test, x, y).compute()`` on a
``LocalCluster`` of single-threaded worker processes (``--workers``, default 2). Both sides
compute in float32 with the same regularization.

pyDVL pins numpy < 2, so its side runs in an isolated virtualenv that this script builds on
first use (``benchmarks/.pydvl-venv``: ``pydvl[influence]==0.10.*`` and ``torch==2.13.0``) and
talks to through files only: the data (``inputs.npz``), the trained ``state_dict`` and a JSON
spec are written once and read by both sides (``benchmarks/pydvl_side.py``). No pyDVL code is
imported here or copied into this repository.

Agreement: relative Frobenius difference of the two n_test × n_train matrices ≤ 1e-3. Direct is
exact on both sides up to float32 rounding amplified by cond(H + λI) (eigendecomposition here,
an LU solve there); CG stops at a residual ≤ 1e-4·‖b‖ on both sides (pyDVL squares its
``rtol`` internally, so it gets 1e-2), which leaves each factor within ~1e-4·cond(H + λI) of
the exact one; measured ~2e-4. Equal fit batches keep the operators identical: pyDVL averages
batch Hessians unweighted, so the batch size divides n_train. When both methods run, CG is
also compared with our Direct result, the exact reference.

    python benchmarks/vs_pydvl.py [--methods direct,cg] [--n-train 500] [--n-test 40] [--quick]

The last lines give each side's time and the ratio pyDVL / ours (target ≥ 10).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

#: this process's environment before any cluster starts: distributed copies its worker settings
#: (thread counts, malloc variables) into the starting process's os.environ, and pyDVL's main
#: process must not inherit them from our side's cluster
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
VENV = common.BENCH_DIR / ".pydvl-venv"
PYDVL_SPEC = "pydvl[influence]==0.10.*"
TORCH_SPEC = "torch==2.13.0"
TARGET = 10.0


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_pydvl_venv() -> str:
    """Create the isolated pyDVL environment if needed; returns the resolved versions."""
    python = venv_python()
    probe = [str(python), "-c", "import pydvl, torch, numpy, dask, distributed; "
             "print(pydvl.__version__, torch.__version__, numpy.__version__, dask.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    print(f"building {VENV} ({PYDVL_SPEC}, {TORCH_SPEC}); this takes a few minutes once", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", PYDVL_SPEC, TORCH_SPEC], check=True,
                   stdout=subprocess.DEVNULL)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def our_side(method: str, spec: dict, data: dict, net, repeat: int) -> dict:
    import dask
    import dask.array as da
    import torch
    from distributed import Client, LocalCluster
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_influence import DaskInfluenceCalculator, TorchNumpyConverter
    from prefect_influence.torch import CgInfluence, DirectInfluence

    settings = spec["methods"][method]
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    if method == "direct":
        model = DirectInfluence(net, F.cross_entropy, spec["regularization"])
    else:
        model = CgInfluence(net, F.cross_entropy, spec["regularization"], rtol=settings["ours_rtol"],
                            atol=settings["ours_atol"], maxiter=settings["maxiter"])
    start = time.perf_counter()
    model.fit(DataLoader(TensorDataset(x, y), batch_size=settings["ours_fit_batch_size"]))
    t_fit = time.perf_counter() - start
    blocks = spec["blocks"]
    train_chunk, test_chunk = -(-len(x) // blocks), -(-len(data["x_test"]) // blocks)
    da_x = da.from_array(data["x_train"], chunks=(train_chunk, -1))
    da_y = da.from_array(data["y_train"], chunks=train_chunk)
    da_xt = da.from_array(data["x_test"], chunks=(test_chunk, -1))
    da_yt = da.from_array(data["y_test"], chunks=test_chunk)
    with dask.config.set(spec["dask_config"]), LocalCluster(
        n_workers=spec["n_workers"], threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        start = time.perf_counter()
        calculator = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
        t_scatter = time.perf_counter() - start
        t_compute, values = common.best_time(
            lambda: calculator.influences(da_xt, da_yt, da_x, da_y).compute(), repeat
        )
    return {"fit_s": t_fit, "scatter_s": t_scatter, "influences_compute_s": t_compute,
            "values": np.asarray(values), "model": model}


def pydvl_side(method: str, workdir: Path, timeout: float) -> dict:
    script = common.BENCH_DIR / "pydvl_side.py"
    proc = subprocess.run([str(venv_python()), str(script), str(workdir), method], env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pyDVL side ({method}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((workdir / f"pydvl_{method}.json").read_text())
    report["values"] = np.load(workdir / f"pydvl_{method}.npz")["values"]
    return report


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cg",
                        help="cg and/or direct (direct at p = 10k: two O(p³) factorizations, "
                             "~30+ min on 2 cores)")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=134, help="64 → hidden → 10 (134: 10,060 parameters)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side of the grid")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs on each side, after one untimed warm-up run on each side "
                             "(the best counts)")
    parser.add_argument("--dask-malloc-trim", action="store_true",
                        help="start workers (both sides) with distributed's MALLOC_TRIM_THRESHOLD_")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 train × 20 test, CG only (not judged)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for each pyDVL run")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.methods = 200, 20, "cg"
    asked = {m.strip() for m in args.methods.split(",") if m.strip()}
    if not asked or asked - {"direct", "cg"}:
        parser.error(f"--methods takes direct and/or cg, got {args.methods!r}")
    methods = [m for m in ("direct", "cg") if m in asked]  # Direct's result is CG's reference

    versions = ensure_pydvl_venv()
    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-pydvl-"))
    common.header("vs_pydvl: our DaskInfluenceCalculator vs pyDVL 0.10's",
                  pydvl_venv=f"{VENV} (pydvl, torch, numpy, dask: {versions})",
                  problem=f"MLP 64→{args.hidden}→10, p = {common.n_parameters(args.hidden)}, "
                          f"{args.n_test} test × {args.n_train} train, {args.blocks}×{args.blocks} "
                          f"blocks, λ = {args.regularization}, float32",
                  cluster=f"LocalCluster {args.workers} workers × 1 thread on both sides")
    x, y = common.make_data(args.n_train, seed=0)
    xt, yt = common.make_data(args.n_test, seed=1)
    net = common.train_network(args.hidden, x, y)
    import torch

    np.savez(workdir / "inputs.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    torch.save(net.state_dict(), workdir / "model.pt")
    # pyDVL averages batch Hessians unweighted (ChunkAveraging): equal batches keep the two
    # operators identical, so the fit batch size divides n_train
    batch = math.gcd(args.n_train, 250)
    from prefect_influence import TORCH_WORKER_DASK_CONFIG
    spec = {
        "layers": [common.N_FEATURES, args.hidden, common.N_CLASSES],
        "regularization": args.regularization,
        "blocks": args.blocks,
        "n_workers": args.workers,
        "repeat": args.repeat,
        # worker processes on both sides start with glibc's default allocator settings
        # (TORCH_WORKER_DASK_CONFIG, as our flow's cluster does); --dask-malloc-trim keeps
        # distributed's MALLOC_TRIM_THRESHOLD_ on both sides instead
        "dask_config": {} if args.dask_malloc_trim else dict(TORCH_WORKER_DASK_CONFIG),
        "methods": {
            # pyDVL's direct fit forms torch.func.hessian per batch (memory ∝ batch · p · hidden)
            "direct": {"ours_fit_batch_size": batch, "pydvl_fit_batch_size": math.gcd(batch, 25)},
            # residual ≤ 1e-4·‖b‖ on both sides: pyDVL squares rtol (clamp(rtol²·‖b‖, atol²))
            "cg": {"ours_rtol": 1e-4, "ours_atol": 1e-12, "pydvl_rtol": 1e-2, "pydvl_atol": 1e-6,
                   "maxiter": 1000, "ours_fit_batch_size": batch, "pydvl_fit_batch_size": batch},
        },
    }
    (workdir / "spec.json").write_text(json.dumps(spec))

    reference = None
    rows = []
    for method in methods:
        print(f"-- {method}: ours", flush=True)
        ours = our_side(method, spec, {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt},
                        net, args.repeat)
        if method == "direct":
            reference = ours["values"]
        print(f"   fit {ours['fit_s']:.1f} s, scatter {ours['scatter_s']:.1f} s, "
              f"influences().compute() {ours['influences_compute_s']:.2f} s", flush=True)
        print(f"-- {method}: pyDVL (subprocess in {VENV.name})", flush=True)
        theirs = pydvl_side(method, workdir, args.timeout)
        print(f"   fit {theirs['fit_s']:.1f} s, scatter {theirs['scatter_s']:.1f} s, "
              f"influences().compute() {theirs['influences_compute_s']:.2f} s", flush=True)
        for w in theirs["warnings"]:
            print(f"   pyDVL warning: {w}")
        err = rel_error(ours["values"], theirs["values"])
        tol = 1e-3
        line = f"   agreement ours vs pyDVL: relative Frobenius difference {err:.2e} (tolerance {tol:.0e})"
        if reference is not None and method != "direct":
            line += (f"; vs exact Direct: ours {rel_error(ours['values'], reference):.2e}, "
                     f"pyDVL {rel_error(theirs['values'], reference):.2e}")
        print(line)
        if not err <= tol:
            raise AssertionError(f"{method}: ours and pyDVL's influences differ by {err:.3g} > {tol}")
        rows.append((method, ours["influences_compute_s"], theirs["influences_compute_s"],
                     ours["fit_s"], theirs["fit_s"]))

    print("-- results (influences().compute(), fitted model scattered beforehand; fit apart)")
    for method, t_ours, t_theirs, f_ours, f_theirs in rows:
        print(f"time {method} ours: {t_ours:.2f} s, pyDVL: {t_theirs:.2f} s "
              f"(fit: ours {f_ours:.1f} s, pyDVL {f_theirs:.1f} s)")
    for method, t_ours, t_theirs, *_ in rows:
        ratio = t_theirs / t_ours
        judged = "" if not args.quick else " (quick size: not judged)"
        print(f"ratio {method} pyDVL / ours: {ratio:.1f}x (target >= {TARGET:.0f}x: "
              f"{common.verdict(ratio >= TARGET)}){judged}")


if __name__ == "__main__":
    main()
