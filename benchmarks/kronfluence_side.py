"""Kronfluence's half of ``vs_kronfluence.py``: runs inside the isolated Kronfluence virtualenv,
so it imports only Kronfluence, torch and numpy, never ``prefect_influence``.

    benchmarks/.kronfluence-venv/bin/python benchmarks/kronfluence_side.py WORKDIR RUN

Reads ``WORKDIR/inputs.npz`` (data and the sampled labels), ``WORKDIR/model.pt`` (trained
state_dict) and ``WORKDIR/spec.json`` (architecture, λ, batch sizes, threads, and the run
``RUN``: its training points and Fisher estimate), fits Kronfluence's EK-FAC factors, computes
the pairwise scores (test × train) and the self-scores of the training points, each timed after
a small untimed warm-up run, and writes ``WORKDIR/kronfluence_RUN.npz`` (``pairwise``,
``self``) and ``WORKDIR/kronfluence_RUN.json`` (timings, peak RSS, versions).

The Fisher estimates, chosen by the run's ``fisher``, all through ``compute_train_loss(...,
sample=True)``, the only place Kronfluence lets a task decide which pseudo-gradients its
covariances and eigenvalue corrections see:

* ``exact``: the expectation over classes ``Σ_c p_c ∇ℓ(x, c) ∇ℓ(x, c)ᵀ``. Each batch is
  repeated once per class, row ``(i, c)`` labelled ``c`` with its loss weighted by
  ``sqrt(C · p_c)`` (detached), so its logit pseudo-gradient is ``sqrt(C · p_c) (softmax − e_c)``.
  Kronfluence divides its sums by the rows it saw, ``C·n``, hence the ``C`` under the root.
* ``given``: one label per example (``S`` with ``S`` draws) taken from the ``labels`` column,
  drawn by the caller exactly as our ``fisher="sampled"`` draws them, so both sides estimate
  the same sum.
* ``own``: Kronfluence's usual task, which draws the label with ``torch.multinomial`` itself.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path


def build_network(spec):
    from torch import nn

    c1, c2, c3 = spec["channels"]
    side = spec["image_size"] // 8  # three 2 × 2 poolings
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * side * side, spec["hidden"]),
        nn.ReLU(),
        nn.Linear(spec["hidden"], spec["classes"]),
    ).eval()


def make_task(fisher: str, n_classes: int, samples: int):
    import torch
    import torch.nn.functional as F
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy (Kronfluence's convention: its factors divide by the count)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch[0], batch[1]
            if not sample:
                return F.cross_entropy(model(x), y, reduction="sum")
            if fisher == "exact":
                # every class as label, weighted so the covariances hold Σ_c p_c g_c g_cᵀ
                logits = model(x.repeat_interleave(n_classes, dim=0))
                labels = torch.arange(n_classes, device=x.device).repeat(x.shape[0])
                with torch.no_grad():
                    p = torch.softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
                    weight = (n_classes * p).sqrt()
                losses = F.cross_entropy(logits, labels, reduction="none")
                return (weight * losses).sum()
            if fisher == "given":
                # S given labels per row: one repeat each, Kronfluence's count gives the 1/S
                logits = model(x.repeat_interleave(samples, dim=0)) if samples > 1 else model(x)
                return F.cross_entropy(logits, batch[2].reshape(-1), reduction="sum")
            logits = model(x)
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                labels = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    return ClassificationTask()


def main() -> None:
    workdir, run = Path(sys.argv[1]), sys.argv[2]
    import numpy as np
    import torch

    spec = json.loads((workdir / "spec.json").read_text())
    settings = spec["runs"][run]
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])  # the "own" run's draws, reproducible

    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    data = np.load(workdir / "inputs.npz")
    n, n_test = settings["n_train"], spec["n_test"]
    x = torch.from_numpy(data["x_train"][:n])
    y = torch.from_numpy(data["y_train"][:n])
    xt, yt = torch.from_numpy(data["x_test"][:n_test]), torch.from_numpy(data["y_test"][:n_test])
    net = build_network(spec)
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    fisher, samples = settings["kronfluence_fisher"], spec["fisher_samples"]
    task = make_task(fisher, spec["classes"], samples)
    model = prepare_model(net, task)
    analyzer = Analyzer(
        analysis_name=run,
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        log_level=logging.WARNING,
        output_dir=str(workdir / "kronfluence"),
    )
    factor_args = FactorArguments(
        strategy="ekfac", covariance_max_examples=None, lambda_max_examples=None
    )
    score_args = ScoreArguments(damping_factor=spec["regularization"])
    batch, fit_batch = spec["batch_size"], settings["kronfluence_fit_batch"]

    def datasets(count: int, count_test: int):
        train = TensorDataset(x[:count], y[:count])
        fit = train
        if fisher == "given":
            labels = torch.from_numpy(data[settings["labels"]][:count])
            fit = TensorDataset(x[:count], y[:count], labels)
        return fit, train, TensorDataset(xt[:count_test], yt[:count_test])

    def one_run(name: str, count: int, count_test: int) -> dict:
        fit_data, train, query = datasets(count, count_test)
        times = {}
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name=name,
            dataset=fit_data,
            per_device_batch_size=fit_batch,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        times["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"{name}-pairwise",
            factors_name=name,
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=count_test,
            per_device_train_batch_size=batch,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        times["pairwise_s"] = time.perf_counter() - start
        times["self_s"] = 0.0
        if settings["self"]:
            start = time.perf_counter()
            analyzer.compute_self_scores(
                scores_name=f"{name}-self",
                factors_name=name,
                train_dataset=train,
                per_device_train_batch_size=batch,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            times["self_s"] = time.perf_counter() - start
        return times

    # imports, einsum path searches and first-call allocations stay out of the timed run
    one_run(f"{run}-warmup", min(n, spec["warmup_train"]), min(n_test, spec["warmup_test"]))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = one_run(run, n, n_test)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pairwise = analyzer.load_pairwise_scores(f"{run}-pairwise")["all_modules"]
    values = {"pairwise": pairwise.numpy()}
    if settings["self"]:
        values["self"] = analyzer.load_self_scores(f"{run}-self")["all_modules"].numpy()
    np.savez(workdir / f"kronfluence_{run}.npz", **values)
    report = {
        "kronfluence": kronfluence.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        **times,
        "total_s": sum(times.values()),
        "peak_rss": peak,
        "peak_rss_before_timed_run": rss_before,
        "factor_args": factor_args.to_str_dict(),
    }
    (workdir / f"kronfluence_{run}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "factor_args"}))


if __name__ == "__main__":
    main()
