"""The built-in demo: find the flipped labels of the digits example by self-influence."""

from __future__ import annotations

import time

import numpy as np
import torch

from .example import load_digits_example, train_model

__all__ = ["run_demo", "mislabel_auc"]


def mislabel_auc(self_influence: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of ranking training points by self-influence to find the flipped labels."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, self_influence))


def run_demo(output: str = "influence-output/demo", method: str = "arnoldi") -> dict:
    from torch.nn.functional import cross_entropy
    from torch.utils.data import DataLoader, TensorDataset

    from .torch import ArnoldiInfluence

    start = time.perf_counter()
    example = load_digits_example()
    model = train_model(example)
    x = torch.from_numpy(example.x_train)
    y = torch.from_numpy(example.y_train)
    influence = ArnoldiInfluence(model, cross_entropy, 0.01, rank=50)
    influence.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    self_infl = influence.self_influences(x, y).detach().numpy()
    auc = mislabel_auc(self_infl, example.flipped)
    xt = torch.from_numpy(example.x_test[:5])
    yt = torch.from_numpy(example.y_test[:5])
    values = influence.influences(xt, yt, x, y).detach().numpy()
    for i in range(len(xt)):
        print(f"test {i}: most helpful train {np.argsort(-values[i])[:5].tolist()}, "
              f"most harmful {np.argsort(values[i])[:5].tolist()}")
    elapsed = time.perf_counter() - start
    print(f"mislabel-detection AUC from self-influence: {auc:.3f}")
    print(f"run time: {elapsed:.1f} s")
    return {"auc": auc, "seconds": elapsed}
