"""What a job will cost before it runs: memory per worker and time, from a short probe on this
machine (a fit on a subsample of the training set, a few factor solves, per-sample gradients
and one block product), scaled to the job's grid. Estimates, labelled as such: the probe's
rates hold for the whole job only roughly (a fit's fixed costs are scaled with the data, a
solve on a subsample's fit may converge faster or slower)."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..storage import FACTORS, INFLUENCES, SELF_INFLUENCE, InfluenceStore, storage_options
from .context import tensors
from .data import open_source
from .inputs import torch_dtype
from .network import build_influence_model, layer_terms_bytes, load_network
from .planning import TASK_OVERHEAD_S, Survey, columns_by_layer
from .resources import torch_threads

__all__ = ["JobEstimate", "estimate_job", "stored_progress"]

#: training rows fitted by the probe, and test rows solved for
PROBE_TRAIN_ROWS = 256
PROBE_TEST_ROWS = 16
#: assumed, not probed (set from runs on a 2-core machine): loading Prefect, Dask and the flow;
#: a temporary local Prefect server's start; creating and finishing the flow runs; a local
#: cluster's start (overlapping the fit); a worker process's memory with its libraries loaded
STARTUP_S = 3.0
PREFECT_SERVER_START_S = 10.0
FLOW_RUNS_S = 2.0
CLUSTER_START_S = 8.0
WORKER_BASE_BYTES = 450 * 2**20
#: layer terms the probe of a layer-wise column records at most
LAYER_TERMS_PROBE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class JobEstimate:
    """Seconds by phase (``total`` is what a user waits for) and peak bytes per worker."""

    seconds: dict[str, float]
    worker_bytes: int
    fitted_state_bytes: int
    probe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stored_progress(survey: Survey) -> dict[str, Any]:
    """What the output already holds for this job (records counted, not verified: a chunk
    whose checksum fails is recomputed by the run)."""
    grid = survey.grid
    totals = {
        "factors": grid.shape[0],
        "blocks": grid.n_blocks,
        "self_influence": grid.shape[1],
    }
    if survey.action not in ("resume", "append"):
        return {"fitted": False, "summary": False, **{k: [0, n] for k, n in totals.items()}}
    store = InfluenceStore(survey.config.output, storage_options(survey.config))
    status = store.status()
    names = {"factors": FACTORS, "blocks": INFLUENCES, "self_influence": SELF_INFLUENCE}
    if survey.action == "append":  # the test chunks that keep their rows keep their records
        kept = survey.existing.grid.n_test // grid.test_chunk
        recorded = {
            k: sum(1 for ix in store.recorded(names[k]) if k == "self_influence" or ix[0] < kept)
            for k in totals
        }
    else:
        recorded = {k: status[names[k]]["recorded"] for k in totals}
    return {
        "fitted": bool(status["fitted"]),
        "summary": bool(status["summary"]) and survey.action == "resume",
        **{k: [min(recorded[k], n), n] for k, n in totals.items()},
    }


def estimate_job(
    survey: Survey,
    n_workers: int,
    api_running: bool,
    checks_s: float = 0.0,
    progress: Optional[dict] = None,
) -> JobEstimate:
    """Time and memory of the run that ``survey`` describes on ``n_workers`` workers
    (``api_running``: a Prefect API is configured, so no temporary server starts;
    ``checks_s``: what the survey took, which a run does twice: before it starts, and when
    the flow plans the output)."""
    config, grid = survey.config, survey.grid
    progress = progress or stored_progress(survey)
    network, _ = load_network(config)
    model = build_influence_model(config, network)
    options = storage_options(config)
    train = open_source(config.data.train, options, "train")
    test = open_source(config.data.test, options, "test")
    m = min(len(train), PROBE_TRAIN_ROWS)
    sample_bytes = None  # columns hold gradients, unless the output's columns score by layer
    if columns_by_layer(config, survey.fingerprint):
        sample_bytes = layer_terms_bytes(config, model, train)
    x, y = tensors(train.rows(0, m))
    xt, yt = tensors(test.rows(0, min(len(test), PROBE_TEST_ROWS)))
    dtype = torch_dtype(config.dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    xt = xt.to(dtype) if xt.is_floating_point() else xt
    from torch.utils.data import DataLoader, TensorDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a subsample's fit warns about itself, not the job
        start = time.perf_counter()
        model.fit(DataLoader(TensorDataset(x, y), batch_size=config.method.fit_batch_size))
        fit_probe = time.perf_counter() - start
        with torch_threads(1):  # as the tasks run
            start = time.perf_counter()
            model.influence_factors(xt, yt)
            per_factor = (time.perf_counter() - start) / len(xt)
            factors = torch.zeros(grid.test_chunk, grid.n_parameters, dtype=dtype)
            if sample_bytes is None:
                start = time.perf_counter()
                grads = model.per_sample_grads(x, y)
                per_grad = (time.perf_counter() - start) / m
                start = time.perf_counter()
                factors @ grads.T
                per_product = (time.perf_counter() - start) / (m * grid.test_chunk)
            else:
                per_grad, per_product = _layer_wise_rates(model, x, y, factors, sample_bytes)
    state_bytes = sum(t.numel() * t.element_size() for t in model.fitted_state().values())

    workers = max(1, n_workers)
    left = {k: 1.0 - progress[k][0] / max(progress[k][1], 1) for k in ("factors", "blocks")}
    want_self = config.self_influence and progress["self_influence"][0] < grid.shape[1]
    seconds = {
        "checks": 2 * checks_s,
        "startup": STARTUP_S + FLOW_RUNS_S,
        "prefect_server": 0.0 if api_running else PREFECT_SERVER_START_S,
        "fit": 0.0 if progress["fitted"] else fit_probe * grid.n_train / m,
        "factors": per_factor * grid.n_test * left["factors"] / min(workers, grid.shape[0]),
        # every column with a block to compute needs its train gradients again (appended
        # test rows: all of them)
        "blocks": grid.n_train
        * (
            per_grad * (1.0 if survey.action == "append" else left["blocks"])
            + per_product * grid.n_test * left["blocks"]
        )
        / min(workers, grid.shape[1]),
        "self_influence": per_factor * grid.n_train / workers if want_self else 0.0,
        "task_overhead": TASK_OVERHEAD_S * (grid.shape[0] + grid.shape[1]) / workers,
    }
    start_wait = 0.0 if config.dask_address else max(0.0, CLUSTER_START_S - seconds["fit"])
    seconds["cluster_start"] = start_wait
    seconds = {k: round(v, 2) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 1)

    itemsize = torch_dtype(config.dtype).itemsize
    block_values = grid.test_chunk * grid.train_chunk * math.prod(grid.influence_shape[2:])
    rows = itemsize * grid.train_chunk * math.prod(grid.x_shape)  # the train chunk's rows
    if sample_bytes is None:
        column = rows + itemsize * (
            2 * grid.train_chunk * grid.n_parameters  # gradients and the train operand
            + 2 * block_values  # the block computed and the one being written
            + grid.test_chunk * grid.n_parameters  # one factor chunk read back
        )
    else:  # layer terms, tiles of factors and gradient blocks within the budget, all blocks
        column = (
            rows
            + grid.train_chunk * sample_bytes
            + model.memory_budget_bytes
            + itemsize * grid.n_test * grid.train_chunk * math.prod(grid.influence_shape[2:])
        )
    factor_task = 4 * itemsize * grid.test_chunk * grid.n_parameters  # solve temporaries
    worker_bytes = WORKER_BASE_BYTES + state_bytes + max(column, factor_task)
    probe = {
        "train_rows": m,
        "test_rows": len(xt),
        "fit_s": round(fit_probe, 3),
        "factor_s_per_row": per_factor,
        "gradient_s_per_row": per_grad,
        "train_operand": "gradients" if sample_bytes is None else "layer terms",
        "threads": os.cpu_count(),
    }
    return JobEstimate(seconds, int(worker_bytes), int(state_bytes), probe)


def _layer_wise_rates(
    model, x: torch.Tensor, y: torch.Tensor, factors: torch.Tensor, sample_bytes: int
) -> tuple[float, float]:
    """Seconds per train sample (layer terms, and gradient blocks formed once per column) and
    per train sample and test row (the products) of a column that scores layer by layer:
    scores of one row and of ``factors``' rows on at most 256 MiB of layer terms."""
    m = max(1, min(len(x), LAYER_TERMS_PROBE_BYTES // max(1, sample_bytes)))
    start = time.perf_counter()
    terms = model.layer_terms(x[:m], y[:m])
    terms_s = time.perf_counter() - start
    start = time.perf_counter()
    model.influences_from_terms(factors[:1], terms)
    one_row = time.perf_counter() - start
    start = time.perf_counter()
    model.influences_from_terms(factors, terms)
    more_rows = max(0.0, time.perf_counter() - start - one_row)
    return (terms_s + one_row) / m, more_rows / (m * max(1, len(factors) - 1))
