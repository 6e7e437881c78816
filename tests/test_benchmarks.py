"""The benchmark suite stays runnable: every script takes the options ``run_all.py`` passes it,
and the memory sampler separates the processes it is told to leave out (a real child process,
real RSS)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


#: what ``run_all.py`` runs (pydvl_side.py runs inside pyDVL's own virtualenv, from vs_pydvl.py)
RUN_ALL = _bench_module("run_all")


@pytest.mark.parametrize("name", ["run_all", *RUN_ALL.BENCHMARKS])
def test_benchmark_script_takes_the_options_run_all_gives_it(name):
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, quick, _ = RUN_ALL.BENCHMARKS.get(name, ([], [], 0))
    for option in (*default, *quick, *RUN_ALL.FULL.get(name, [])):
        if option.startswith("--"):
            assert re.search(re.escape(option) + r"(?![\w-])", proc.stdout), (
                f"{name}.py has no {option}"
            )


def test_memory_sampler_leaves_out_the_roles_set_apart():
    common = _bench_module("common")
    # a child holding 300 MB of touched memory; its role is "other" (not the flow process)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = bytearray(300 * 10**6); b[::4096] = b'x' * len(b[::4096]); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with common.TreeMemorySampler(interval=0.05, apart=("other",)) as mem:
            pass
    finally:
        child.kill()
        child.wait()
    assert mem.peak_by_role["other"] >= 300 * 10**6
    assert mem.peak_rss - mem.peak_rss_rest >= 300 * 10**6
    assert 0 < mem.peak_rss_rest <= mem.peak_by_role["flow process"]
    assert mem.peak_pss_rest < mem.peak_pss
