"""The built-in demo: run the pipeline on the digits example, then score how well
self-influence finds the flipped labels and draw the most helpful and harmful training images."""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from .config import PipelineConfig
from .example import load_digits_example

__all__ = ["run_demo", "mislabel_auc", "demo_config"]


def mislabel_auc(self_influence: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of ranking training points by self-influence to find the flipped labels."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, self_influence))


def demo_config(output: str) -> PipelineConfig:
    """Embedded defaults: built-in model and data, Arnoldi (rank 50), local Dask, local files."""
    return PipelineConfig(output=output, overwrite=False)


def run_demo(output: str, run_flow: Callable[[PipelineConfig], dict]) -> dict:
    from .storage import InfluenceStore

    start = time.perf_counter()
    config = demo_config(output)
    result = run_flow(config)
    store = InfluenceStore(output)
    example = load_digits_example()
    self_infl = np.asarray(store.group["self_influence"][:])
    auc = mislabel_auc(self_infl, example.flipped)
    arrays, _ = store.read_summary()
    png = (
        _draw(example, arrays, os.path.join(output, "top_influences.png"))
        if "://" not in output
        else None
    )
    elapsed = time.perf_counter() - start
    print(f"output: {os.path.abspath(output) if '://' not in output else output}")
    print(f"blocks computed: {result['blocks_computed']}, reused: {result['blocks_reused']}")
    print(
        f"mislabel-detection AUC from self-influence: {auc:.3f} "
        f"({int(example.flipped.sum())} flipped of {len(example.flipped)} training labels)"
    )
    if png:
        print(f"picture of most helpful/harmful training images: {png}")
    print(f"run time: {elapsed:.1f} s")
    return {"auc": auc, "seconds": elapsed, "png": png, **result}


def _draw(example, arrays: dict, path: str, n_test: int = 4, k: int = 4) -> str:
    from .pictures import draw_top_influences

    draw_top_influences(
        example.x_test,
        example.y_test,
        lambda i: (example.x_train[i], example.y_train[i]),
        arrays,
        path,
        n_test,
        k,
        flipped=example.flipped,
    )
    return path
