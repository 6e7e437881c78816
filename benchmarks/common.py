"""Shared pieces of the benchmarks: seeded jobs on disk, timing, process-tree memory sampling.

Every benchmark builds its inputs with :func:`write_job` (zarr train/test groups and a trained
checkpoint of ``prefect_influence.example:build_model``, 64 features, 10 classes), so the
pipeline, the calculators and the bare-PyTorch baselines all read the same numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

# quiet, offline, isolated Prefect: a private PREFECT_HOME keeps the benchmark's ephemeral API
# (and its SQLite database) away from other jobs on the machine
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-home-"))

import numpy as np  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
N_FEATURES, N_CLASSES = 64, 10
FACTORY = "prefect_influence.example:build_model"


def n_parameters(hidden: int) -> int:
    """Trainable parameters of the example network 64 → hidden → 10."""
    return N_FEATURES * hidden + hidden + hidden * N_CLASSES + N_CLASSES


def make_data(n: int, seed: int, noise: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of 10 Gaussian clusters in 64 dimensions (float32 x, int64 y), seeded."""
    centers = np.random.default_rng(12345).normal(0.0, 1.0, (N_CLASSES, N_FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    x = (centers[y] + rng.normal(0.0, noise, (n, N_FEATURES))).astype(np.float32)
    return x, y.astype(np.int64)


def train_network(hidden: int, x: np.ndarray, y: np.ndarray, steps: int = 200, seed: int = 0):
    """The example network trained with full-batch Adam on (at most 4,000 of) the samples."""
    import torch

    from prefect_influence.example import build_model

    net = build_model(hidden=hidden, seed=seed)
    xt, yt = torch.from_numpy(x[:4000]), torch.from_numpy(y[:4000])
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net.eval()


def train_sgd_network(
    hidden: int,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
    net=None,
):
    """The example network (or ``net``: its trainable parameters) trained as networks usually
    are, with plain minibatch SGD stopped early: not at a minimum, so ``H + 0.01·I`` is
    indefinite (the non-convex benchmarks)."""
    import torch

    from prefect_influence.example import build_model

    net = build_model(hidden=hidden, seed=seed) if net is None else net.train()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
            opt.step()
    return net.eval()


def float64_truth(
    net,
    x: np.ndarray,
    y: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
    reg: float,
    spectrum: bool = True,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Exact influences ``n_test × n_train`` of a float64 copy of ``net`` (cross-entropy, the
    exact mean Hessian plus ``reg·I``, LU solve in float64) and, if asked, the eigenvalues of
    ``H + reg·I``: the reference every accuracy figure is judged against."""
    import copy

    import torch

    from prefect_influence.torch.functional import ModelFunctions
    from prefect_influence.torch.hessian import exact_hessian

    fn = ModelFunctions(copy.deepcopy(net).double(), torch.nn.functional.cross_entropy)
    xd, xtd = torch.from_numpy(x).double(), torch.from_numpy(xt).double()
    yd, ytd = torch.from_numpy(y), torch.from_numpy(yt)
    matrix = exact_hessian(fn, [(xd, yd)], len(xd))
    matrix.diagonal().add_(reg)
    eigenvalues = torch.linalg.eigvalsh(matrix).numpy() if spectrum else None
    factors = torch.linalg.solve(matrix, fn.per_sample_grads(xtd, ytd).T).T
    return (factors @ fn.per_sample_grads(xd, yd).T).numpy(), eigenvalues


def spectrum_summary(eigenvalues: np.ndarray) -> str:
    magnitude = np.abs(eigenvalues)
    return (
        f"{int((eigenvalues < 0).sum())} negative eigenvalues, smallest |eigenvalue| "
        f"{magnitude.min():.2e}, largest {magnitude.max():.3f} (condition "
        f"{magnitude.max() / magnitude.min():.2e})"
    )


def relative_error(a: np.ndarray, truth: np.ndarray) -> float:
    """Relative Frobenius error."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - truth) / np.linalg.norm(truth))


def pearson(a: np.ndarray, truth: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), truth.ravel())[0, 1])


def gemm_gflops(dtype=None, n: int = 4096, repeat: int = 3) -> float:
    """This machine's matrix-product rate now in ``dtype`` (default float32; best of ``repeat``
    n × n products)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds, _ = best_time(lambda: a @ b, repeat)
    return 2 * n**3 / seconds / 1e9


def write_job(root: Path, n_train: int, n_test: int, hidden: int, seed: int = 0) -> dict[str, Any]:
    """Train/test zarr groups (``x``, ``y``) and a trained checkpoint under ``root``."""
    import torch
    import zarr

    root.mkdir(parents=True, exist_ok=True)
    x, y = make_data(n_train, seed)
    xt, yt = make_data(n_test, seed + 1)
    paths: dict[str, Any] = {"hidden": hidden, "n_train": n_train, "n_test": n_test}
    for name, (xs, ys) in (("train", (x, y)), ("test", (xt, yt))):
        group = zarr.open_group(str(root / f"{name}.zarr"), mode="w")
        rows = min(len(xs), 65536)
        group.create_array("x", data=xs, chunks=(rows, N_FEATURES))
        group.create_array("y", data=ys, chunks=(rows,))
        paths[name] = str(root / f"{name}.zarr")
    net = train_network(hidden, x, y, seed=seed)
    torch.save(net.state_dict(), root / "model.pt")
    paths["checkpoint"] = str(root / "model.pt")
    return paths


def load_job_arrays(paths: dict) -> dict[str, np.ndarray]:
    import zarr

    out = {}
    for name in ("train", "test"):
        group = zarr.open_group(paths[name], mode="r")
        out[f"x_{name}"], out[f"y_{name}"] = (
            np.asarray(group["x"][...]),
            np.asarray(group["y"][...]),
        )
    return out


def load_network(paths: dict):
    import torch

    from prefect_influence.example import build_model

    net = build_model(hidden=paths["hidden"])
    net.load_state_dict(torch.load(paths["checkpoint"], weights_only=True))
    return net.eval()


def job_config(paths: dict, output: str, method: Optional[dict] = None, **overrides):
    """A :class:`PipelineConfig` for the job in ``paths`` (auto chunking unless overridden)."""
    from prefect_influence.config import PipelineConfig

    data = {
        "model": {
            "factory": FACTORY,
            "factory_kwargs": {"hidden": paths["hidden"]},
            "checkpoint": paths["checkpoint"],
        },
        "data": {"train": paths["train"], "test": paths["test"]},
        "method": method or {"name": "arnoldi", "rank": 50, "regularization": 0.01},
        "output": output,
        "overwrite": True,
    }
    data.update(overrides)
    return PipelineConfig.model_validate(data)


def run_stages_in_process(config) -> dict[str, float]:
    """Plan, fit, factors, columns and summary called in this process, one after the other
    (what the flow's tasks do, without Prefect or Dask). Returns seconds per stage."""
    from prefect_influence import pipeline

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = pipeline.plan_job(config, n_workers=1)
    t1 = time.perf_counter()
    pipeline.fit_stage(config)
    t2 = time.perf_counter()
    for i in range(plan.grid.shape[0]):
        pipeline.factors_stage(config, i)
    t3 = time.perf_counter()
    for j in range(plan.grid.shape[1]):
        pipeline.column_stage(config, j)
    t4 = time.perf_counter()
    if config.summary:
        pipeline.summary_stage(config)
    t5 = time.perf_counter()
    times.update(
        plan=t1 - t0, fit=t2 - t1, factors=t3 - t2, columns=t4 - t3, summary=t5 - t4, total=t5 - t0
    )
    return times


def start_prefect_api() -> float:
    """Start this process's ephemeral Prefect API (by running an empty flow); returns seconds."""
    from prefect import flow

    @flow(name="benchmark-warm-up")
    def _warm_up() -> int:
        return 1

    start = time.perf_counter()
    _warm_up()
    return time.perf_counter() - start


def best_time(fn: Callable[[], Any], repeat: int = 1, warmup: bool = True) -> tuple[float, Any]:
    """Minimum wall time of ``repeat`` calls (after one untimed warm-up call) and the last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


class TreeMemorySampler:
    """Samples the summed RSS (and PSS, which counts shared pages once) of a process and all its
    descendants (Prefect API server, Dask scheduler, nannies, workers) in a background thread.

    ``apart`` names roles (see ``_role``) whose processes are left out of ``peak_rss_rest`` and
    ``peak_pss_rest``: the peaks, over the samples, of the sums over the other processes.

    Example:
        >>> with TreeMemorySampler(apart=("prefect API server",)) as mem:
        ...     run_the_job()
        >>> mem.peak_rss, mem.peak_pss, mem.peak_rss_rest, mem.peak_by_role
    """

    def __init__(
        self,
        pid: Optional[int] = None,
        interval: float = 0.25,
        pss: bool = True,
        apart: tuple[str, ...] = (),
    ):
        import psutil

        self._root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.pss = pss
        self.apart = apart
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_rss_rest = 0
        self.peak_pss_rest = 0
        self.peak_by_role: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}  # RSS by role in the sample with the highest total
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _role(self, proc) -> str:
        if proc.pid == self._root.pid:
            return "flow process"
        try:
            cmd = " ".join(proc.cmdline())
        except Exception:
            return "other"
        if "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd):
            return "prefect API server"
        if "multiprocessing" in cmd or "spawn" in cmd or "forkserver" in cmd:
            return "dask worker/nanny"
        return "other"

    def sample(self) -> None:
        import psutil

        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = rss_rest = pss_rest = 0
        roles: dict[str, int] = {}
        for proc in procs:
            try:
                info = proc.memory_full_info() if self.pss else proc.memory_info()
                role = self._role(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            proc_pss = getattr(info, "pss", 0)
            rss, pss = rss + info.rss, pss + proc_pss
            if role not in self.apart:
                rss_rest, pss_rest = rss_rest + info.rss, pss_rest + proc_pss
            roles[role] = roles.get(role, 0) + info.rss
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.at_peak = roles
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss_rest = max(self.peak_rss_rest, rss_rest)
        self.peak_pss_rest = max(self.peak_pss_rest, pss_rest)
        for role, value in roles.items():
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def gb(n_bytes: float) -> str:
    """Decimal gigabytes (10⁹ bytes), the unit of the memory targets, with GiB beside."""
    return f"{n_bytes / 1e9:.2f} GB ({gib(n_bytes)})"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def header(title: str, **facts: Any) -> None:
    import torch

    print(f"== {title}")
    print(
        f"   python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    for key, value in facts.items():
        print(f"   {key}: {value}")
    sys.stdout.flush()


def write_readme_table(name: str, table: list[str]) -> None:
    """Replace the README's lines between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->``
    with ``table``."""
    import re

    readme = BENCH_DIR.parent / "README.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: "\n".join([begin, *table, end]), text))
    print(f"wrote the table into {readme.name}")


def ensure_venv(venv: Path, modules: list[str], installs: list[list[str]]) -> str:
    """An isolated virtualenv at ``venv`` in which ``modules`` import, built on first use by the
    ``pip install`` argument lists ``installs`` in turn; returns the modules' versions."""
    import subprocess

    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        f"import {', '.join(modules)}; print(*({', '.join(f'{m}.__version__' for m in modules)},))",
    ]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    specs = " ".join(a for args in installs for a in args if not a.startswith("-"))
    print(f"building {venv} ({specs}); this takes a few minutes once", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    # git skips the environment without a .gitignore entry, as venvs of Python 3.13 do by default
    (venv / ".gitignore").write_text("*\n")
    for args in installs:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
