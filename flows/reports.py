"""What a flow shows people: live progress (a Prefect progress artifact, and a bar on the
terminal when asked), the top-k table and the run's markdown summary."""

from __future__ import annotations

import json
import sys
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from prefect_influence.config import PipelineConfig
from prefect_influence.storage import Grid, InfluenceStore, storage_options

__all__ = ["Progress", "run_result", "publish"]


class Progress:
    """Counts finished tasks into a progress artifact and, with ``terminal``, a bar on stderr."""

    def __init__(self, total: int, description: str, terminal: bool = False):
        self.total, self.done, self.terminal = total, 0, terminal
        self.artifact = create_progress_artifact(0.0, description=description)

    def advance(self) -> None:
        self.done += 1
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total)
        if self.terminal:
            width = 40
            filled = int(width * self.done / max(self.total, 1))
            bar = f"[{'#' * filled}{'.' * (width - filled)}]"
            sys.stderr.write(f"\r{bar} {self.done}/{self.total} tasks")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def run_result(
    config: PipelineConfig,
    grid: Grid,
    fit_reused: bool,
    counts: dict[str, int],
    start: float,
    t_fit: float,
    t_grid: float,
    end: float,
) -> dict[str, Any]:
    return {
        "output": config.output,
        "grid": list(grid.shape),
        "n_test": grid.n_test,
        "n_train": grid.n_train,
        "fit_reused": fit_reused,
        **counts,
        "seconds": {
            "fit": round(t_fit - start, 3),
            "grid": round(t_grid - t_fit, 3),
            "summary": round(end - t_grid, 3),
            "total": round(end - start, 3),
        },
    }


def publish(
    config: PipelineConfig, grid: Grid, result: dict[str, Any], info: dict[str, Any]
) -> None:
    """The run's artifacts: the top-k of the first test points and a markdown summary with the
    configuration (redacted; a secret's value never enters the configuration)."""
    store = InfluenceStore(config.output, storage_options(config))
    summary = store.read_summary()
    if config.summary and summary is not None and "top_helpful" in summary[0]:
        arrays = summary[0]
        rows = [
            {
                "test_index": i,
                "most_helpful": ", ".join(map(str, arrays["top_helpful"][i].tolist())),
                "most_harmful": ", ".join(map(str, arrays["top_harmful"][i].tolist())),
            }
            for i in range(min(10, grid.n_test))
        ]
        create_table_artifact(
            rows,
            key="influence-top-k",
            description=f"Top {info['top_k']} training indices of the first test points",
        )
    cfg = json.dumps(config.redacted(), indent=1)
    seconds = result["seconds"]
    create_markdown_artifact(
        key="influence-summary",
        markdown=(
            f"# Influence run\n\n"
            f"* output: `{config.output}` (arrays `factors`, `influences`, `self_influence`, `summary/*`)\n"
            f"* grid: {grid.shape[0]} × {grid.shape[1]} blocks of {grid.test_chunk} × {grid.train_chunk} "
            f"({grid.n_test} test × {grid.n_train} train, p = {grid.n_parameters}, mode {grid.mode})\n"
            f"* fitted state: {'reused' if result['fit_reused'] else 'computed'}\n"
            f"* factor chunks: {result['factors_computed']} computed, {result['factors_reused']} reused\n"
            f"* blocks: {result['blocks_computed']} computed, {result['blocks_reused']} reused\n"
            f"* timings (s): fit {seconds['fit']}, grid {seconds['grid']}, summary {seconds['summary']}, "
            f"total {seconds['total']}\n\n"
            f"## Configuration\n\n```json\n{cfg}\n```\n"
        ),
    )
