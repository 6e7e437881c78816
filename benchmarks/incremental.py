"""Benchmark: test rows appended to a finished job, and queries against a stored job.

* Append: the job on ``n_test`` test rows (4,400 and 13,200) × 100,000 train run from scratch
  through the flow (this process's Prefect API, started first and not timed; a local Dask
  cluster), against the same job run to completion on its first ``n_test / 1.1`` rows and then
  run on all of them (an append), with the chunk sizes auto chunking gives the first run. Both
  runs wait for everything a user waits for (planning, the cluster's start, the summary).
  Target: the append ≤ 15% of the full job.
* Query: 10 new points against 100,000 training points of the example network with 128 hidden
  units (p = 9,610), as ``prefect-influence query OUTPUT --test POINTS --json`` in a fresh
  process (Python and torch imports included; no Prefect API), with projected, exact and no
  stored features. Targets: ≤ 5 s with stored features, ≤ 30 s without. Against the gradient
  query's exact top-10: the exact features' top-10 equal, the projected ones' (refined) recall
  ≥ 0.9. Then the projection's estimates without refinement: their error (RMS of
  ``(est − exact) / (‖f‖‖g‖)`` against the bound ``√(2/d)``) and recall at k = 10 for several
  dimensions ``d``.

    python benchmarks/incremental.py [--quick]

Last lines: the append ratios, the query times, the recalls.
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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

APPEND_TARGET = 0.15
QUERY_TARGET_FEATURES_S, QUERY_TARGET_GRADIENTS_S = 5.0, 30.0
RECALL_TARGET = 0.9
N_QUERY, TOP_K = 10, 10
CLI = str(Path(sys.executable).parent / "prefect-influence")


def _head(paths: dict, n: int, root: Path) -> str:
    import zarr

    full = zarr.open_group(paths["test"], mode="r")
    head = zarr.open_group(str(root / "test-head.zarr"), mode="w")
    for key in ("x", "y"):
        head.create_array(key, data=np.asarray(full[key][:n]))
    return str(root / "test-head.zarr")


def _flow_seconds(config) -> tuple[float, dict]:
    from prefect_influence.flows import influence_pipeline

    start = time.perf_counter()
    result = influence_pipeline(config)
    return time.perf_counter() - start, result


def append_benchmark(root: Path, n_train: int, n_test: int, hidden: int) -> list[str]:
    paths = common.write_job(root / "append-job", n_train, n_test, hidden)
    head_rows = round(n_test / 1.1)
    head = _head(paths, head_rows, root)
    # the chunk sizes auto chunking gives the first run (an append keeps them): the full job
    # from scratch uses them too, so the two outputs must be the same bytes
    from prefect_influence.pipeline.planning import auto_chunk_sizes, n_local_workers

    probe = common.job_config(paths, str(root / "probe"))
    chunks = auto_chunk_sizes(
        n_train, head_rows, common.n_parameters(hidden), n_local_workers(probe)
    )
    fixed = {"train_chunk_size": chunks[0], "test_chunk_size": chunks[1]}
    full = common.job_config(paths, str(root / f"full-{n_test}"), **fixed)
    t_full, r_full = _flow_seconds(full)
    grown = common.job_config(paths, str(root / f"grown-{n_test}"), **fixed)
    _flow_seconds(grown.model_copy(update={"data": grown.data.model_copy(update={"test": head})}))
    t_append, r_append = _flow_seconds(grown)
    same = _same_outputs(full.output, grown.output, r_full["grid"] == r_append["grid"])
    ratio = t_append / t_full
    print(
        f"   full job {t_full:.1f} s ({r_full['blocks_computed']} blocks, grid {r_full['grid']}, "
        f"seconds {r_full['seconds']}); append of {n_test - head_rows} rows to {head_rows}: "
        f"{t_append:.1f} s ({r_append['blocks_computed']} blocks computed, "
        f"{r_append['blocks_reused']} reused; seconds {r_append['seconds']}); same bytes: {same}",
        flush=True,
    )
    return [
        f"append 10% test rows to {head_rows:,} × {n_train:,}: {ratio:.3f} of the full job "
        f"({t_append:.1f} s / {t_full:.1f} s; target ≤ {APPEND_TARGET}: {_met(ratio <= APPEND_TARGET)}; "
        f"outputs identical: {same})"
    ]


def _same_outputs(a: str, b: str, same_grid: bool) -> bool:
    import zarr

    if not same_grid:
        return False
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for key in ("factors", "influences", "self_influence", "summary/top_helpful"):
        rows = ga[key].shape[0]
        step = ga[key].chunks[0] if key == "influences" else rows  # a grid row at a time
        for start in range(0, rows, step):
            if not np.array_equal(
                np.asarray(ga[key][start : start + step]),
                np.asarray(gb[key][start : start + step]),
                equal_nan=True,
            ):
                return False
    return True


def _query(output: str, test: str, *extra: str) -> tuple[float, dict]:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [CLI, "query", output, "--test", test, "--top-k", str(TOP_K), "--json", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"query failed: {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def _tops(result: dict, kind: str) -> list[set[int]]:
    return [{e["train_index"] for e in point[kind]} for point in result["top"]]


def _recall(got: dict, truth: dict) -> float:
    hits = [
        len(g & t) / len(t)
        for kind in ("helpful", "harmful")
        for g, t in zip(_tops(got, kind), _tops(truth, kind))
    ]
    return float(np.mean(hits))


def query_benchmark(root: Path, n_train: int, hidden: int, dims: list[int]) -> list[str]:
    import zarr

    from prefect_influence.config import DEFAULT_PROJECTION_DIM

    paths = common.write_job(root / "query-job", n_train, N_QUERY, hidden)
    queries = str(root / "queries.zarr")  # new points: not the job's test points
    group = zarr.open_group(queries, mode="w")
    x, y = common.make_data(N_QUERY, seed=7)
    group.create_array("x", data=x)
    group.create_array("y", data=y)
    outputs = {}
    for features in ("none", "projected", "exact"):
        config = common.job_config(paths, str(root / f"query-{features}"), train_features=features)
        t = common.run_stages_in_process(config)["total"]
        outputs[features] = config.output
        print(f"   job with {features} features stored: {t:.1f} s in process", flush=True)
    times, results = {}, {}
    for features in ("none", "projected", "exact"):
        _query(outputs[features], queries)  # page cache warm, as on a machine in use
        times[features], results[features] = _query(outputs[features], queries)
        print(f"   query, {features} features: {times[features]:.2f} s", flush=True)
    truth = results["none"]
    recall_exact = _recall(results["exact"], truth)
    recall_projected = _recall(results["projected"], truth)
    p = common.n_parameters(hidden)
    lines = [
        f"query {N_QUERY} points × {n_train:,} train (p = {p:,}), fresh process: "
        f"{times['projected']:.2f} s projected (d = {DEFAULT_PROJECTION_DIM}), "
        f"{times['exact']:.2f} s exact features (targets ≤ {QUERY_TARGET_FEATURES_S:g} s: "
        f"{_met(max(times['projected'], times['exact']) <= QUERY_TARGET_FEATURES_S)}), "
        f"{times['none']:.2f} s gradients (≤ {QUERY_TARGET_GRADIENTS_S:g} s: "
        f"{_met(times['none'] <= QUERY_TARGET_GRADIENTS_S)})",
        f"query top-{TOP_K} vs exact: exact features recall {recall_exact:.3f} (equal: "
        f"{_met(recall_exact == 1.0)}); projected d = {DEFAULT_PROJECTION_DIM}, refined: recall "
        f"{recall_projected:.3f} (target ≥ {RECALL_TARGET}: {_met(recall_projected >= RECALL_TARGET)})",
    ]
    lines.append(_estimate_errors(outputs["exact"], queries, dims))
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _estimate_errors(output: str, queries: str, dims: list[int]) -> str:
    """Unrefined estimates against exact scores, from the stored exact gradients."""
    import torch

    from prefect_influence.pipeline import query_output
    from prefect_influence.storage import InfluenceStore
    from prefect_influence.torch.sketch import CountSketch

    exact = query_output(output, queries, top_k=TOP_K, full_rows=True)
    store = InfluenceStore(output)
    grid = store.planned_manifest().grid
    grads = [
        torch.from_numpy(np.array(store.read_chunk("train_features", grid, (j,))))
        for j in range(grid.shape[1])
    ]
    g_norm = torch.cat([g.norm(dim=1) for g in grads]).numpy()
    from prefect_influence.pipeline.context import tensors
    from prefect_influence.pipeline.data import open_source
    from prefect_influence.pipeline.network import build_influence_model, load_network
    from prefect_influence.pipeline.query import _job_of

    config, _ = _job_of(output, None)
    network, _ = load_network(config)
    model = build_influence_model(config, network).load_fitted_state(store.read_fitted_state())
    xq, yq = tensors(open_source(queries, {}, "test").rows(0, N_QUERY))
    factors = model.influence_factors(xq, yq)
    f_norm = factors.norm(dim=1).numpy()
    parts = []
    truth = exact.rows
    for d in dims:
        sketch = CountSketch(grid.n_parameters, d, seed=0)
        sf = sketch(factors)
        est = np.hstack([(sf @ sketch(g).T).numpy() for g in grads])
        rms = float(np.sqrt(np.mean(((est - truth) / np.outer(f_norm, g_norm)) ** 2)))
        hits = []
        for sign in (1, -1):
            t = np.argsort(-sign * truth, axis=1)[:, :TOP_K]
            e = np.argsort(-sign * est, axis=1)[:, :TOP_K]
            hits += [len(set(a) & set(b)) / TOP_K for a, b in zip(t, e)]
        parts.append(
            f"d={d}: rms {rms:.4f} (bound {math.sqrt(2 / d):.4f}), recall {np.mean(hits):.2f}"
        )
    return "projection estimates, unrefined: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--append-train", type=int, default=100_000)
    parser.add_argument(
        "--append-test", type=int, nargs="+", default=[4_400, 13_200], help="test rows after"
    )
    parser.add_argument("--query-train", type=int, default=100_000)
    args = parser.parse_args()
    if args.quick:
        args.append_train, args.append_test, args.query_train = 4_000, [440], 4_000
    common.header(
        "appended test rows and queries",
        append=f"{args.append_train} train × {args.append_test} test, hidden 64",
        query=f"{N_QUERY} points × {args.query_train} train, hidden 128",
    )
    api_s = common.start_prefect_api()
    print(f"   Prefect API started in {api_s:.1f} s (not timed below)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        root = Path(tmp)
        lines = []
        for n_test in args.append_test:
            lines += append_benchmark(root / f"append-{n_test}", args.append_train, n_test, 64)
        lines += query_benchmark(root, args.query_train, hidden=128, dims=[256, 1024, 4096])
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
