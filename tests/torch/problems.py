"""Tiny, seeded models and data sets shared by the torch tests (float64 throughout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DTYPE = torch.float64


def loader(x, y, batch_size=16):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def linear_regression(n_train=40, n_test=5, d=3, m=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, m).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(torch.randn(m, d, generator=gen, dtype=DTYPE))
        model.bias.copy_(torch.randn(m, generator=gen, dtype=DTYPE))
    x = torch.randn(n_train, d, generator=gen, dtype=DTYPE)
    y = torch.randn(n_train, m, generator=gen, dtype=DTYPE)
    xt = torch.randn(n_test, d, generator=gen, dtype=DTYPE)
    yt = torch.randn(n_test, m, generator=gen, dtype=DTYPE)
    return model.eval(), x, y, xt, yt


def sum_squared_error(out, target):
    return ((out - target) ** 2).sum()


def train(model, x, y, loss, steps=200, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        value = loss(model(x), y) + 1e-3 * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    return model.eval()


def mlp_classifier(n_train=60, n_test=6, d=4, hidden=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, d, generator=gen, dtype=DTYPE)

    def sample(n):
        labels = torch.arange(n) % classes
        return centers[labels] + torch.randn(n, d, generator=gen, dtype=DTYPE), labels

    x, y = sample(n_train)
    xt, yt = sample(n_test)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DTYPE)
    train(model, x, y, nn.functional.cross_entropy)
    return model, x, y, xt, yt


def small_cnn(n_train=40, n_test=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 1, 6, 6, generator=gen, dtype=DTYPE)
    y = (x[:, 0, :3].sum(dim=(1, 2)) > 0).long() + (x[:, 0, 3:].sum(dim=(1, 2)) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, classes)
    ).to(DTYPE)
    train(model, x[:n_train], y[:n_train], nn.functional.cross_entropy, steps=100)
    return model, x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def nonconvex_classifier(dtype=torch.float32):
    """A tanh MLP (8 → 16 → 4, 212 parameters) on noisy Gaussian clusters, trained with plain
    minibatch SGD and stopped early, as networks usually are: ``H + 0.01·I`` has 20 negative
    eigenvalues and one of magnitude ~3e-6 (condition number ~4e5). Returns the network in
    ``dtype`` (trained in float32, so both dtypes hold the same weights) and its data."""
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(4, 8, generator=gen)
    labels = torch.arange(240) % 4
    x = centers[labels] + 1.5 * torch.randn(240, 8, generator=gen)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(53):
        order = torch.randperm(200, generator=gen)
        for i in range(0, 200, 16):
            idx = order[i : i + 16]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), labels[idx]).backward()
            opt.step()
    model = model.to(dtype).eval()
    x = x.to(dtype)
    return model, x[:200], labels[:200], x[200:], labels[200:]


class DenseOperator:
    """A symmetric matrix as the operator protocol preconditioners fit to (``apply`` on rows,
    ``input_size``, ``dtype``, ``device``), like pyDVL's ``MatrixOperator``."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.input_size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.matrix
