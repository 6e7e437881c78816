"""The ``prefect-influence`` command line: the top layer, it may import everything below."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _quiet_defaults() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output=args.output, method=args.method)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-influence",
        description="Influence functions for PyTorch models, resumable on Prefect and Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in digits example end to end")
    demo.add_argument("--output", default="influence-output/demo", help="output directory or URL")
    demo.add_argument("--method", default="arnoldi", help="influence method")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_defaults()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
