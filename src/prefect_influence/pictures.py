"""Pictures of influence results for image inputs: test images beside their most helpful and
most harmful training images."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

__all__ = ["image_shape", "draw_top_influences"]


def image_shape(x_shape: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """How a sample of shape ``x_shape`` shows as an image (``H × W`` or ``H × W × 3``), or
    ``None`` if it is not one: ``H × W``, ``C × H × W`` with one or three channels, or a flat
    vector of a square number (≥ 16) of pixels."""
    if len(x_shape) == 2:
        return tuple(x_shape)
    if len(x_shape) == 3 and x_shape[0] in (1, 3):
        return (x_shape[1], x_shape[2]) if x_shape[0] == 1 else (x_shape[1], x_shape[2], 3)
    if len(x_shape) == 1 and x_shape[0] >= 16 and math.isqrt(x_shape[0]) ** 2 == x_shape[0]:
        side = math.isqrt(x_shape[0])
        return (side, side)
    return None


def _as_image(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if len(shape) == 3:  # channels first → last
        x = np.moveaxis(x.reshape(3, *shape[:2]), 0, -1)
    image = x.reshape(shape)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def draw_top_influences(
    test_x: np.ndarray,
    test_labels: np.ndarray,
    train_row: Callable[[int], tuple[np.ndarray, object]],
    arrays: dict[str, np.ndarray],
    path,
    n_test: int = 4,
    k: int = 4,
    flipped: Optional[np.ndarray] = None,
    title: str = "Test images, their most helpful (+) and most harmful (−) training images",
) -> None:
    """Save (to a path or a binary file) a grid: per test image, its ``k`` most helpful and
    ``k`` most harmful training images (``train_row(i)`` gives image and label of one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = image_shape(tuple(test_x.shape[1:]))
    if shape is None:
        raise ValueError(f"samples of shape {tuple(test_x.shape[1:])} are not images")
    n_test = min(n_test, len(test_x))
    k = min(k, arrays["top_helpful"].shape[1])
    fig, axes = plt.subplots(
        n_test, 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.5 * n_test), squeeze=False
    )
    for r in range(n_test):
        row = axes[r]
        _show(row[0], _as_image(test_x[r], shape), f"test {r}\nlabel {test_labels[r]}", "black")
        for c in range(k):
            for offset, kind, sign, color in (
                (1, "helpful", "+", "green"),
                (1 + k, "harmful", "−", "red"),
            ):
                i = int(arrays[f"top_{kind}"][r, c])
                x, label = train_row(i)
                note = (
                    " (flipped)" if flipped is not None and kind == "harmful" and flipped[i] else ""
                )
                _show(
                    row[offset + c], _as_image(x, shape), f"{sign} #{i}\nlabel {label}{note}", color
                )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def _show(ax, image: np.ndarray, title: str, color: str) -> None:
    ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
    ax.set_title(title, fontsize=7, color=color)
    ax.axis("off")
