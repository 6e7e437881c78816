"""The built-in example: a small classifier of scikit-learn's 8×8 digits (shipped with
scikit-learn, no download) trained with 10% of its training labels flipped.

Everything is seeded and float32, so the example is identical on every run and machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsExample", "build_model", "load_digits_example", "train_model"]

N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsExample:
    """Train/test split of the digits data; ``y_train`` has ``flipped`` labels changed."""

    x_train: np.ndarray  # n_train × 64, float32 in [0, 1]
    y_train: np.ndarray  # int64 labels as trained on (some flipped)
    y_train_clean: np.ndarray
    flipped: np.ndarray  # bool mask of the flipped training labels
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_example(
    flip_fraction: float = 0.1, n_test: int = 297, seed: int = 0
) -> DigitsExample:
    """Digits split into train/test (deterministic), with ``flip_fraction`` of train labels
    replaced by a different, random class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the built-in example ('builtin:digits') needs scikit-learn: pip install "
            "'prefect-influence[example]'"
        ) from exc

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    y_train = y[train].copy()
    n_flip = int(round(flip_fraction * len(train)))
    flip_idx = rng.choice(len(train), size=n_flip, replace=False)
    y_train[flip_idx] = (y_train[flip_idx] + rng.integers(1, N_CLASSES, size=n_flip)) % N_CLASSES
    flipped = np.zeros(len(train), dtype=bool)
    flipped[flip_idx] = True
    return DigitsExample(x[train], y_train, y[train], flipped, x[test], y[test])


def build_model(hidden: int = 32, seed: int = 0) -> nn.Module:
    """The example's network: 64 → hidden (tanh) → 10 logits, float32, seeded initialization."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES)
        ).to(torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def train_model(example: DigitsExample, epochs: int = 300, seed: int = 0) -> nn.Module:
    """Full-batch Adam with weight decay on the (noisy) training labels; returns it in eval mode."""
    model = build_model(seed=seed)
    x = torch.from_numpy(example.x_train)
    y = torch.from_numpy(example.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is fastest and makes the weights exact
    try:
        for _ in range(epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
