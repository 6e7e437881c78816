"""Model factories the configuration tests import by path (``jobs_models:...``)."""

from torch import nn


def with_layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 10))


def broken(**kwargs) -> nn.Module:
    """A factory with a bug of its own: the command line shows its traceback."""
    return {}["no such key"]


def small_conv(seed: int = 0) -> nn.Module:
    """64 features as 4 × 4 × 4 images through two convolutions and a Linear."""
    import torch

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (4, 4, 4)),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


class _SharedLayer(nn.Module):
    """A Linear layer applied twice per forward pass (its gradient sums both uses)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.shared(self.shared(x).tanh()).tanh())


def shared_layer(seed: int = 0) -> nn.Module:
    import torch

    torch.manual_seed(seed)
    return _SharedLayer().eval()
