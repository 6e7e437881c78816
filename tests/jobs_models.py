"""Model factories the configuration tests import by path (``jobs_models:...``)."""

from torch import nn


def with_layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 10))
