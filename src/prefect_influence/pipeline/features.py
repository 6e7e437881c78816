"""Stored train features: what a query needs from the training side, written once per train
chunk by the column that computes its gradients anyway. ``exact`` stores the per-sample
gradients (``n_train × p``); ``projected`` a seeded count sketch of them (``n_train × dim``,
see :mod:`prefect_influence.torch.sketch`), whose scores a query refines exactly on a few
candidates."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..config import PipelineConfig, TrainFeatures
from ..storage import Grid
from ..torch.sketch import CountSketch

__all__ = ["PROJECTION_SEED", "features_description", "features_of", "sketch_for"]

#: the projection's seed: fixed, so features written by different runs and workers agree
PROJECTION_SEED = 0


def features_description(config: PipelineConfig, grid: Grid) -> Optional[dict[str, Any]]:
    """What ``config`` stores as train features (``None``: nothing), as kept with the array."""
    kind = TrainFeatures(config.train_features)
    if kind is TrainFeatures.none:
        return None
    if kind is TrainFeatures.exact:
        return {"kind": kind.value, "width": grid.n_parameters}
    return {
        "kind": kind.value,
        "width": int(config.projection_dim),
        "projection": "count-sketch",
        "seed": PROJECTION_SEED,
        "n_parameters": grid.n_parameters,
    }


@functools.lru_cache(maxsize=4)
def sketch_for(n_parameters: int, dim: int, seed: int) -> CountSketch:
    return CountSketch(n_parameters, dim, seed)


def features_of(description: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """The features of gradient (or factor) rows ``n × p`` under ``description``."""
    if description["kind"] == TrainFeatures.exact.value:
        return rows
    return sketch_for(rows.shape[1], int(description["width"]), int(description["seed"]))(rows)
