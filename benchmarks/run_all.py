"""Run every benchmark one after the other and print the last lines of each (figures and ratios).

    python benchmarks/run_all.py            # default sizes: ~1 h on 2 cores (load)
    python benchmarks/run_all.py --full     # also the judged 4 GB memory grid and the
                                            # ResNet job, 1,000 test × 10,000 train: ~4 h
    python benchmarks/run_all.py --quick    # smoke run: a few minutes, targets not judged
    python benchmarks/run_all.py --only roofline,scaling
    python benchmarks/run_all.py --full --only resnet_pipeline --extra "--workdir /data/resnet"

Each benchmark runs in its own process (``sys.executable``); its full output goes to
``benchmarks/results/<name>.log`` and its closing lines are repeated in a summary at the end and
written to ``benchmarks/RESULTS.md`` (one section per benchmark, replaced by its latest run).
``benchmarks/calculators.py`` (the calculators against in-memory ``model.influences``) runs too.
A failing benchmark is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"

#: name: (arguments at the default size, arguments for --quick, closing lines to repeat)
BENCHMARKS = {
    "calculators": ([], ["--repeat", "1", "--n-train", "2000"], 9),
    "vs_pydvl": ([], ["--quick"], 18),  # 4 lines for Direct, 2 for CG, 12 for the modes
    "vs_kronfluence": ([], ["--quick"], 4),  # setup, exact, sampled, Kronfluence's own sampling
    "methods": (["--write-readme"], ["--quick"], 13),  # the README's "Choosing a method" table
    # the README's EK-FAC table; 2 lines per network (Pearson, relative error), 1 for float64
    "ekfac_accuracy": (["--write-readme"], ["--quick"], 5),
    "roofline": ([], ["--quick"], 8),  # 5 lines without a GPU, 8 with one
    "layer_terms": ([], ["--quick"], 2),
    "overhead": ([], ["--quick"], 4),
    # the judged 4 GB grid (memory.py's default) runs with --full only; by default the suite
    # runs 1,000 × 50,000 (not judged)
    "memory": (["--quick"], ["--quick"], 3),
    "scaling": ([], ["--quick"], 5),
    "cli_errors": ([], ["--quick"], 2),
    "incremental": ([], ["--quick"], 5),
    "resnet_pipeline": ([], ["--quick"], 2),
}
#: arguments that replace the default ones with --full: the judged memory grid, and the ResNet
#: job at its judged size (1,000 test rows, 45 GB of factors, against 10,000 train),
#: chunked as `auto` chunks it
FULL = {
    "memory": [],
    "resnet_pipeline": [
        *("--n-test", "1000", "--n-train", "10000", "--fit-batch", "16"),
        *("--train-chunk", "auto", "--test-chunk", "auto"),
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument(
        "--full", action="store_true", help="judge every target: the 4 GB memory grid too"
    )
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. roofline,scaling")
    parser.add_argument(
        "--extra", default="", help="arguments appended to each chosen benchmark's own"
    )
    args = parser.parse_args()
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    size = "quick" if args.quick else "full" if args.full else "default"
    names = [n for n in BENCHMARKS if not args.only or n in args.only.split(",")]
    logs = BENCH_DIR / "results"
    logs.mkdir(exist_ok=True)
    summary, failed = [], []
    start_all = time.perf_counter()
    for name in names:
        default, quick, tail = BENCHMARKS[name]
        chosen = quick if args.quick else FULL.get(name, default) if args.full else default
        chosen = [*chosen, *shlex.split(args.extra)]
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *chosen]
        print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        log = logs / f"{name}{'' if size == 'default' else '-' + size}.log"
        with open(log, "w") as f:
            # closing lines come from stdout alone: a library's log or a traceback at exit
            # (stderr) goes to the log file and never ends up in RESULTS.md
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
            lines = []
            for line in proc.stdout:
                f.write(line)
                if not (
                    line.startswith(("WARNING: Location", "  warnings.warn"))
                    or " | INFO " in line
                    or " - INFO - " in line
                ):
                    sys.stdout.write(line)
                    sys.stdout.flush()
                lines.append(line.rstrip("\n"))
            code = proc.wait()
        elapsed = time.perf_counter() - start
        if code != 0:
            failed.append(name)
            summary.append((name, elapsed, [f"FAILED (exit {code}), see {log}"]))
        else:
            summary.append((name, elapsed, [l for l in lines if l.strip()][-tail:]))
            record(
                name, " ".join([f"benchmarks/{name}.py", *chosen]), size, elapsed, summary[-1][2]
            )
    print(f"\n### summary ({size} sizes, {time.perf_counter() - start_all:.0f} s in all)")
    for name, elapsed, lines in summary:
        print(f"[{name}] ({elapsed:.0f} s)")
        for line in lines:
            print(f"  {line}")
    return 1 if failed else 0


def record(name: str, command: str, size: str, elapsed: float, lines: list[str]) -> None:
    """Replace the benchmark's section of RESULTS.md with this run's closing lines."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else (
            "# Benchmark results\n\nWritten by `benchmarks/run_all.py`: the closing lines of each "
            "benchmark's latest run.\n"
        )
    )
    body = "\n".join(lines)
    section = (
        f"## {name}\n\n{date.today().isoformat()}, {size} size, {elapsed:.0f} s on {machine()}: "
        f"`python {command}`\n\n```\n{body}\n```\n"
    )
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + section)
    )
    RESULTS.write_text(text.rstrip("\n") + "\n")


def machine() -> str:
    """The machine in a few words: CPUs, processor, Python and torch (and the GPU if any)."""
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}{gpu}"
    )


if __name__ == "__main__":
    sys.exit(main())
