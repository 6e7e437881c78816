"""Model factories the configuration tests import by path (``jobs_models:...``)."""

from torch import nn


def with_layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 10))


def broken(**kwargs) -> nn.Module:
    """A factory with a bug of its own: the command line shows its traceback."""
    return {}["no such key"]
