"""Benchmark: how fast the command line refuses a bad job, and how close ``plan``'s time
estimate comes to the run it plans.

* Refusals: the typical mistakes of ``tests/test_cli.py`` (a test set with 63 features, float
  labels, a NaN, a negative regularization, a misspelt method, a chunk size of 0, a file that
  is not a checkpoint, an empty test set, data without ``y``, labels out of range, another
  configuration on a finished output, a missing file), each as ``prefect-influence run JOB``
  in a fresh process, wall time from start to exit (Python and torch imports included).
  Target: each ≤ 2 s.
* Estimate: ``prefect-influence plan`` on the demo's configuration (built-in digits, Arnoldi,
  local Dask, a temporary Prefect server), then the same job run by ``prefect-influence run``.
  Target: estimate / measured within [0.5, 2].

    python benchmarks/cli_errors.py [--quick]

Last lines: the slowest and median refusal, then the estimate against the measured run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TESTS = common.BENCH_DIR.parent / "tests"
sys.path.insert(0, str(TESTS))
REFUSAL_TARGET_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="refusals only, no demo run")
    args = parser.parse_args()
    import test_cli
    from jobs import job_config, write_inputs
    from test_stages import run_tasks

    common.header("command-line refusals and plan estimate")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = write_inputs(root / "inputs")
        out = root / "out"
        run_tasks(job_config(inputs, str(out)))
        finished = (root, inputs, out, None)
        times = {}
        for name, make, _ in test_cli.MISTAKES:
            scratch = root / name
            scratch.mkdir()
            job = test_cli._job_file(finished, scratch, make(scratch))
            proc, seconds = test_cli.cli("run", str(job))
            assert proc.returncode == 2, (name, proc.stderr)
            times[name] = seconds
            print(f"  {name:<26} {seconds:5.2f} s  {proc.stderr.splitlines()[0][:90]}")
        if not args.quick:
            estimate, measured = demo_estimate(root)
    slowest = max(times, key=times.get)
    median = statistics.median(times.values())
    print(
        f"refusal: slowest {times[slowest]:.2f} s ({slowest}), median {median:.2f} s "
        f"(target <= {REFUSAL_TARGET_S} s each: {common.verdict(times[slowest] <= REFUSAL_TARGET_S)})"
    )
    if not args.quick:
        ratio = estimate / measured
        print(
            f"plan estimate for the demo job: {estimate:.1f} s, measured run {measured:.1f} s, "
            f"ratio {ratio:.2f} (target within [0.5, 2]: {common.verdict(0.5 <= ratio <= 2)})"
        )


def demo_estimate(root: Path) -> tuple[float, float]:
    """``plan`` then ``run`` of the demo's configuration; the estimate and the measured wall
    time of the run command (what a user waits for)."""
    from prefect_influence.demo import demo_config

    job = root / "demo.yaml"
    config = demo_config(str(root / "demo-out")).model_dump(mode="json")
    job.write_text(yaml.safe_dump(config))
    import test_cli

    proc, _ = test_cli.cli("plan", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    estimate = json.loads(proc.stdout)["estimate"]["seconds"]
    print(f"  plan: {estimate}")
    start = time.perf_counter()
    proc, _ = test_cli.cli("run", str(job))
    measured = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"  run: {json.loads(proc.stdout)['seconds']}")
    return estimate["total"], measured


if __name__ == "__main__":
    main()
