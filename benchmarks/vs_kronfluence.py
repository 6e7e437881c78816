"""Benchmark: our EK-FAC (``EkfacInfluence``) against Kronfluence 1.0.1's, same machine, threads,
weights, data and λ, in one run, each side in its own process (its own peak RSS).

The network is a conv net 3×32×32 → Conv 32 → Conv 64 → Conv 128 (3 × 3, padding 1, each with
ReLU and a 2 × 2 max-pool) → Linear 2048 → 512 → 10 (1,147,466 parameters), trained briefly
with Adam on seeded synthetic images (a class pattern plus noise). Both sides fit EK-FAC
(eigenvalue-corrected Kronecker factors) on the training points in batches of 128, then
compute the pairwise influences (100 test × 2,000 train) and the self-influences of the
training points, float32, damping λ = 1e-4 (absolute: Kronfluence's ``damping_factor``, our
``hessian_regularization``). Each side is timed after a small untimed warm-up run.

* **exact**: the Fisher's exact expectation over the classes, ``Σ_c p_c ∇ℓ(x, c)∇ℓ(x, c)ᵀ``
  (our ``fisher="exact"``). Kronfluence has no switch for it: its task repeats each batch once
  per class with weighted losses (see ``kronfluence_side.py``), in batches of ``128 // 10`` so
  that the repeated batch is as large as the others. It costs Kronfluence about ten times its
  sampled fit, so this comparison runs on the first ``--exact-train`` training points (250).
* **sampled**: one label per example drawn from the model's predictive distribution (our
  ``fisher="sampled"``, Kronfluence's usual estimate). This script draws the labels as our fit
  does (per pass a generator seeded with ``--seed``; per batch, in loader order,
  ``torch.multinomial(softmax(logits), 1, generator=g)``) and hands them to Kronfluence, so both
  sides estimate the same matrix.
* **own**: Kronfluence's own sampling (``torch.multinomial`` inside its task, other draws): its
  fit time beside the run with given labels, and its correlation with our sampled run
  (informational). Self-influences only with ``--own-self``.

Targets, at λ = 1e-4, for exact and sampled: fit + pairwise + self ≥ 2× faster than
Kronfluence, peak RSS no higher, Pearson correlation ≥ 0.999 on both the pairwise and the
self-influences (also shown: the relative difference ‖ours − theirs‖ / ‖theirs‖).

Kronfluence runs in an isolated virtualenv built on first use (``benchmarks/.kronfluence-venv``:
``torch==2.13.0`` in one command with Kronfluence's runtime dependencies, then
``kronfluence==1.0.1`` with ``--no-deps``, which leaves out torchvision: Kronfluence never
imports it, and PyPI's build does not load beside the CPU torch) and talks to this script
through files only.

    python benchmarks/vs_kronfluence.py [--exact-train 250] [--regularization 1e-4] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import kronfluence_side  # noqa: E402  (only its network builder: both sides build the same net)
import numpy as np  # noqa: E402

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
VENV = common.BENCH_DIR / ".kronfluence-venv"
TORCH_SPEC = "torch==2.13.0"
KRONFLUENCE_SPEC = "kronfluence==1.0.1"
#: Kronfluence 1.0.1's runtime requirements less torch (pinned above) and torchvision (unused)
KRONFLUENCE_DEPS = [
    "accelerate>=0.31.0",
    "einops>=0.8.0",
    "einconv>=0.1.0",
    "opt-einsum>=3.3.0",
    "safetensors>=0.4.2",
    "tqdm>=4.66.4",
    "numpy",
]
TARGETS = {"speed": 2.0, "rss": 1.0, "pearson": 0.999}
CLASSES = 10


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_kronfluence_venv() -> str:
    """Create the isolated Kronfluence environment if needed; returns the resolved versions."""
    # torch in the same command as the others, so nothing can pull another torch build
    return common.ensure_venv(
        VENV,
        ["kronfluence", "torch", "numpy"],
        [[TORCH_SPEC, *KRONFLUENCE_DEPS], ["--no-deps", KRONFLUENCE_SPEC]],
    )


# -- data and network ---------------------------------------------------------------------------
def make_images(n: int, seed: int, size: int, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded 3 × size × size images: ``amplitude`` times a blocky pattern of the class
    (8 × 8 cells) plus unit Gaussian noise, faint enough that a brief training stays unsure."""
    patterns = np.random.default_rng(12345).normal(0.0, 1.0, (CLASSES, 3, 8, 8))
    patterns = patterns.repeat(size // 8, axis=2).repeat(size // 8, axis=3)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = amplitude * patterns[y] + rng.normal(0.0, 1.0, (n, 3, size, size))
    return x.astype(np.float32), y.astype(np.int64)


def train(net, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> float:
    """A few epochs of Adam on shuffled batches of 64, seeded; returns the training accuracy."""
    import torch
    import torch.nn.functional as F

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            index = order[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(net(xt[index]), yt[index]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return float((net(xt).argmax(dim=1) == yt).float().mean())


def sampled_labels(net, x: np.ndarray, batch: int, samples: int, seed: int) -> np.ndarray:
    """The labels our ``fisher="sampled"`` fit draws: one generator seeded with ``seed`` per
    pass; per batch in loader order, ``samples`` draws per row from the model's softmax."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            p = torch.softmax(net(torch.from_numpy(x[start : start + batch])), dim=1)
            parts.append(torch.multinomial(p, samples, replacement=True, generator=generator))
    return torch.cat(parts).numpy()


# -- our side (a subprocess of this script) -----------------------------------------------------
def our_side(workdir: Path, run: str) -> None:
    """Our half of a run, in its own process: the same files, steps and report as
    ``kronfluence_side.py``, written to ``WORKDIR/ours_RUN.{npz,json}``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import prefect_influence
    from prefect_influence.torch import EkfacInfluence

    spec = json.loads((workdir / "spec.json").read_text())
    settings = spec["runs"][run]
    torch.set_num_threads(spec["threads"])
    data = np.load(workdir / "inputs.npz")
    n, n_test = settings["n_train"], spec["n_test"]
    x, y = torch.from_numpy(data["x_train"][:n]), torch.from_numpy(data["y_train"][:n])
    xt, yt = torch.from_numpy(data["x_test"][:n_test]), torch.from_numpy(data["y_test"][:n_test])
    net = kronfluence_side.build_network(spec)
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    options = {"fisher": settings["ours_fisher"]}
    if settings["ours_fisher"] == "sampled":
        options.update(fisher_samples=spec["fisher_samples"], seed=spec["seed"])

    def one_run(count: int, count_test: int) -> tuple[dict, dict]:
        model = EkfacInfluence(
            net,
            update_diagonal=True,
            hessian_regularization=spec["regularization"],
            loss=F.cross_entropy,
            **options,
        )
        loader = DataLoader(TensorDataset(x[:count], y[:count]), batch_size=spec["batch_size"])
        times, values = {}, {}
        start = time.perf_counter()
        model.fit(loader)
        times["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        values["pairwise"] = model.influences(
            xt[:count_test], yt[:count_test], x[:count], y[:count]
        )
        times["pairwise_s"] = time.perf_counter() - start
        start = time.perf_counter()
        values["self"] = model.self_influences(x[:count], y[:count])
        times["self_s"] = time.perf_counter() - start
        return times, values

    # first-call costs (allocator, kernels) stay out of the timed run, as on Kronfluence's side
    one_run(min(n, spec["warmup_train"]), min(n_test, spec["warmup_test"]))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, values = one_run(n, n_test)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.savez(workdir / f"ours_{run}.npz", **{k: v.numpy() for k, v in values.items()})
    report = {
        "prefect_influence": getattr(prefect_influence, "__version__", "?"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **times,
        "total_s": sum(times.values()),
        "peak_rss": peak,
        "peak_rss_before_timed_run": rss_before,
    }
    (workdir / f"ours_{run}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


def side_run(side: str, run: str, workdir: Path, timeout: float) -> dict:
    """One side of one run in a fresh process; its report with the values attached."""
    if side == "ours":
        cmd = [sys.executable, os.path.abspath(__file__), "--side", "ours", str(workdir), run]
        env = dict(os.environ)
    else:
        cmd = [str(venv_python()), str(common.BENCH_DIR / "kronfluence_side.py"), str(workdir), run]
        env = dict(CLEAN_ENV)
    threads = str(json.loads((workdir / "spec.json").read_text())["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{side} run {run} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report = json.loads((workdir / f"{side}_{run}.json").read_text())
    values = np.load(workdir / f"{side}_{run}.npz")
    report.update({key: values[key] for key in values.files})
    return report


# -- reporting ----------------------------------------------------------------------------------
def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def times_of(r: dict, with_self: bool = True) -> str:
    parts = f"fit {r['fit_s']:.1f} s, pairwise {r['pairwise_s']:.1f} s"
    if with_self:
        parts += f", self {r['self_s']:.1f} s"
    return f"{parts}, total {r['total_s']:.1f} s"


def detail(side: str, r: dict, with_self: bool = True) -> str:
    return (
        f"   {side}: {times_of(r, with_self)}; peak RSS {gb(r['peak_rss'])} "
        f"({gb(r['peak_rss_before_timed_run'])} before the timed run)"
    )


def agreement(ours: dict, theirs: dict, keys=("pairwise", "self")) -> dict:
    return {
        key: (common.pearson(ours[key], theirs[key]), common.relative_error(ours[key], theirs[key]))
        for key in keys
    }


def judged_line(name: str, ours: dict, theirs: dict, judged: str) -> str:
    """The closing line of a compared run: times, RSS, agreement, and the targets."""
    speed = theirs["total_s"] / ours["total_s"]
    rss = ours["peak_rss"] / theirs["peak_rss"]
    agree = agreement(ours, theirs)
    pearson_ok = min(r for r, _ in agree.values()) >= TARGETS["pearson"]
    return (
        f"{name}: ours {times_of(ours)}, peak RSS {gb(ours['peak_rss'])}; kronfluence "
        f"{times_of(theirs)}, peak RSS {gb(theirs['peak_rss'])}; ratio {speed:.1f}x (target >= "
        f"{TARGETS['speed']:g}x: {common.verdict(speed >= TARGETS['speed'])}); RSS ratio "
        f"{rss:.2f} (target <= {TARGETS['rss']:g}: {common.verdict(rss <= TARGETS['rss'])}); "
        f"Pearson pairwise {agree['pairwise'][0]:.5f}, self {agree['self'][0]:.5f} (target >= "
        f"{TARGETS['pearson']}: {common.verdict(pearson_ok)}); relative difference pairwise "
        f"{agree['pairwise'][1]:.1e}, self {agree['self'][1]:.1e}{judged}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument(
        "--exact-train",
        type=int,
        default=250,
        help="training points of the exact-Fisher comparison (the first ones; Kronfluence's "
        "exact fit costs about ten times its sampled one)",
    )
    parser.add_argument("--runs", default="exact,sampled,own", help="exact, sampled and/or own")
    parser.add_argument("--own-self", action="store_true", help="self-influences in the own run")
    parser.add_argument("--regularization", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--fisher-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for each side's run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3×16×16 images, channels 8/16/32, hidden 64, 200 train × 20 test",
    )
    parser.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("workdir", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        our_side(Path(args.workdir), args.run)
        return
    # amplitudes at which the brief training ends near 85 % training accuracy, unsure
    image_size, channels, hidden, amplitude = 32, (32, 64, 128), 512, 0.15
    if args.quick:
        image_size, channels, hidden, amplitude = 16, (8, 16, 32), 64, 0.6
        args.n_train, args.n_test, args.exact_train, args.batch_size = 200, 20, 200, 50
        args.epochs = 20
    args.exact_train = min(args.exact_train, args.n_train)
    asked = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not asked or set(asked) - {"exact", "sampled", "own"}:
        parser.error(f"--runs takes exact, sampled and/or own, got {args.runs!r}")
    if "own" in asked and "sampled" not in asked:
        asked.append("sampled")  # the own run is read beside the sampled one

    import torch

    from prefect_influence.torch import EkfacInfluence

    torch.set_num_threads(args.threads)
    if "fisher" not in inspect.signature(EkfacInfluence.__init__).parameters:
        print("EkfacInfluence has no fisher= option here: only the exact run", flush=True)
        asked = [r for r in asked if r == "exact"]
    versions = ensure_kronfluence_venv()
    spec = {
        "channels": list(channels),
        "image_size": image_size,
        "hidden": hidden,
        "classes": CLASSES,
        "regularization": args.regularization,
        "batch_size": args.batch_size,
        "n_test": args.n_test,
        "threads": args.threads,
        "fisher_samples": args.fisher_samples,
        "seed": args.seed,
        # the untimed warm-up run of each side: enough to pass every code path once
        "warmup_train": 16,
        "warmup_test": 4,
    }
    x, y = make_images(args.n_train, args.seed, image_size, amplitude)
    xt, yt = make_images(args.n_test, args.seed + 1, image_size, amplitude)
    torch.manual_seed(args.seed)
    net = kronfluence_side.build_network(spec)
    start = time.perf_counter()
    accuracy = train(net, x, y, args.epochs, args.seed)
    t_train = time.perf_counter() - start
    with torch.no_grad():
        test_accuracy = float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    p = sum(t.numel() for t in net.parameters() if t.requires_grad)
    data = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
    runs = {
        "exact": {
            "n_train": args.exact_train,
            "ours_fisher": "exact",
            "kronfluence_fisher": "exact",
            # the class-repeated batch about as large as the other runs' batches
            "kronfluence_fit_batch": max(1, args.batch_size // CLASSES),
            "self": True,
        },
        "sampled": {
            "n_train": args.n_train,
            "ours_fisher": "sampled",
            "kronfluence_fisher": "given",
            "labels": "labels_sampled",
            "kronfluence_fit_batch": args.batch_size,
            "self": True,
        },
        "own": {
            "n_train": args.n_train,
            "kronfluence_fisher": "own",
            "kronfluence_fit_batch": args.batch_size,
            "self": args.own_self,
        },
    }
    data["labels_sampled"] = sampled_labels(net, x, args.batch_size, args.fisher_samples, args.seed)
    spec["runs"] = runs
    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-kronfluence-"))
    np.savez(workdir / "inputs.npz", **data)
    torch.save(net.state_dict(), workdir / "model.pt")
    (workdir / "spec.json").write_text(json.dumps(spec))
    common.header(
        "vs_kronfluence: our EK-FAC vs Kronfluence 1.0.1's, fit + pairwise + self-influences",
        kronfluence_venv=f"{VENV} (kronfluence, torch, numpy: {versions})",
        network=f"conv 3×{image_size}×{image_size} → {'/'.join(map(str, channels))} channels "
        f"→ {hidden} → {CLASSES}, p = {p:,} parameters; Adam, {args.epochs} epochs "
        f"({t_train:.0f} s): train accuracy {accuracy:.2f}, test {test_accuracy:.2f}",
        sizes=f"{args.n_train} train × {args.n_test} test (exact run: {args.exact_train} train), "
        f"batches of {args.batch_size}, λ = {args.regularization:g}, float32 (Kronfluence's "
        "eigendecompositions in float64, its default)",
        threads=f"torch threads {args.threads} on both sides, {os.cpu_count()} CPUs",
    )

    closing = [
        f"setup: p = {p:,} parameters, {args.n_train} train × {args.n_test} test (exact: "
        f"{args.exact_train} train), batches of {args.batch_size}, λ = {args.regularization:g}, "
        f"torch threads {args.threads} of {os.cpu_count()} CPUs"
    ]
    judged = " (quick size: not judged)" if args.quick else ""
    results: dict[str, dict] = {}
    for name in ("exact", "sampled"):
        if name not in asked:
            closing.append(f"{name}: not run")
            continue
        n = runs[name]["n_train"]
        what = (
            f"the exact expectation over {CLASSES} classes (Kronfluence: batches of "
            f"{runs[name]['kronfluence_fit_batch']} repeated {CLASSES}-fold)"
            if name == "exact"
            else f"{args.fisher_samples} sampled label(s) per example, the same on both sides"
        )
        print(f"-- {name}: {n} train × {args.n_test} test, Fisher: {what}", flush=True)
        ours = side_run("ours", name, workdir, args.timeout)
        print(detail("ours", ours), flush=True)
        theirs = side_run("kronfluence", name, workdir, args.timeout)
        print(detail("kronfluence", theirs), flush=True)
        results[name] = ours
        closing.append(judged_line(name, ours, theirs, judged))
        print("   " + closing[-1], flush=True)
    if "own" in asked:
        print(f"-- own: Kronfluence's own sampling, {args.n_train} train", flush=True)
        own = side_run("kronfluence", "own", workdir, args.timeout)
        print(detail("kronfluence", own, args.own_self), flush=True)
        keys = ("pairwise", "self") if args.own_self else ("pairwise",)
        agree = agreement(results["sampled"], own, keys)
        given = json.loads((workdir / "kronfluence_sampled.json").read_text())
        closing.append(
            f"kronfluence own sampling (informational): {times_of(own, args.own_self)} (fit "
            f"with our labels {given['fit_s']:.1f} s), peak RSS {gb(own['peak_rss'])}; vs our "
            "sampled run (other draws): "
            + ", ".join(
                f"Pearson {k} {r:.5f}, relative difference {d:.1e}" for k, (r, d) in agree.items()
            )
        )
    else:
        closing.append("kronfluence own sampling: not run")
    # Kronfluence's factor and score files: tens of MB per run, of no use once read back
    shutil.rmtree(workdir, ignore_errors=True)
    print("-- results")
    for line in closing:
        print(line)


if __name__ == "__main__":
    main()
