"""A small, seeded influence job on real files, shared by the storage, stage and flow tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from prefect_influence.config import PipelineConfig

N_TRAIN, N_TEST, HIDDEN = 240, 40, 8


def write_inputs(root: Path, seed: int = 0) -> dict:
    """Train/test zarr groups and a checkpoint of the example network (64 → 8 → 10)."""
    from prefect_influence.example import build_model

    rng = np.random.default_rng(seed)
    paths = {}
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        group = zarr.open_group(str(root / f"{name}.zarr"), mode="w")
        group.create_array("x", data=rng.random((n, 64), dtype=np.float32))
        group.create_array("y", data=rng.integers(0, 10, n).astype(np.int64))
        paths[name] = str(root / f"{name}.zarr")
    model = build_model(hidden=HIDDEN, seed=seed)
    torch.save(model.state_dict(), root / "model.pt")
    paths["checkpoint"] = str(root / "model.pt")
    return paths


def job_config(paths: dict, output: str, **overrides) -> PipelineConfig:
    data = {
        "model": {
            "factory": "prefect_influence.example:build_model",
            "factory_kwargs": {"hidden": HIDDEN},
            "checkpoint": paths["checkpoint"],
        },
        "data": {"train": paths["train"], "test": paths["test"]},
        "method": {"name": "arnoldi", "rank": 20, "regularization": 0.01},
        "test_chunk_size": 20,
        "train_chunk_size": 40,
        "top_k": 5,
        "output": output,
        "n_workers": 2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return PipelineConfig.model_validate(data)


def read_outputs(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r", storage_options=storage_options or None)
    out = {
        name: np.asarray(group[name][...]) for name in ("factors", "influences", "self_influence")
    }
    for key in ("top_helpful", "top_helpful_values", "top_harmful", "top_harmful_values"):
        if f"summary/{key}" in group:
            out[key] = np.asarray(group[f"summary/{key}"][...])
    return out


def write_test_head(paths: dict, n: int, root: Path) -> str:
    """A copy of the first ``n`` rows of the test set: the test set before rows were appended."""
    full = zarr.open_group(paths["test"], mode="r")
    head = zarr.open_group(str(root / f"test-head-{n}.zarr"), mode="w")
    for key in ("x", "y"):
        head.create_array(key, data=np.asarray(full[key][:n]))
    return str(root / f"test-head-{n}.zarr")
