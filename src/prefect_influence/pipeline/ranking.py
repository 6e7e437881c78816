"""Top-k ranking of influence rows: the most helpful and most harmful training points per test
point, over one train chunk (a column of blocks) and merged across columns.

One total order (value, then the smaller index) makes the merge exact: a point in a row's
overall top-k is in its column's top-k, so merging the columns' lists gives the same result
as ranking the whole row.
"""

from __future__ import annotations

import numpy as np

from ..storage import SUMMARY_ARRAYS, Grid

__all__ = ["ColumnTop", "top_k", "merge_top_k", "kept_rows", "stack_rows", "top_both"]


class ColumnTop:
    """Top-k most helpful / harmful training indices per test row over one train chunk."""

    def __init__(self, grid: Grid, j: int, k: int):
        self.grid, self.j, self.k = grid, j, k
        self.rows: dict[int, tuple[np.ndarray, ...]] = {}

    def add(self, i: int, block: np.ndarray) -> None:
        s0, s1 = self.grid.train_ranges[self.j]
        # in slices of rows: ranking copies its input a few times, a whole block would add
        # several blocks' worth of memory to the column task
        step = max(1, (4 * 2**20) // max(1, block.shape[1] * block.itemsize))
        parts = []
        for r in range(0, block.shape[0], step):
            rows = block[r : r + step]
            idx = np.broadcast_to(np.arange(s0, s1), rows.shape)
            parts.append(tuple(top_both(idx, rows, self.k).values()))
        self.rows[i] = tuple(np.vstack([p[n] for p in parts]) for n in range(len(SUMMARY_ARRAYS)))

    def arrays(self) -> dict[str, np.ndarray]:
        """The rows added, in test-chunk order."""
        ordered = [self.rows[i] for i in sorted(self.rows)]
        return {name: np.vstack([r[n] for r in ordered]) for n, name in enumerate(SUMMARY_ARRAYS)}


def kept_rows(part: dict[str, np.ndarray], grid: Grid) -> int:
    """How many leading test rows of a stored top-k ``part`` still hold for ``grid``: all of
    them if it covers every test row; after test rows were appended, those of the test chunks
    that have not changed (a partial last chunk grew, so its rows are ranked again)."""
    rows = int(part["top_helpful"].shape[0])
    if rows == grid.n_test:
        return rows
    return 0 if rows > grid.n_test else rows // grid.test_chunk * grid.test_chunk


def stack_rows(head: dict[str, np.ndarray], tail: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top-k arrays of the rows of ``head`` followed by those of ``tail``."""
    return {name: np.vstack([head[name], tail[name]]) for name in SUMMARY_ARRAYS}


def top_both(idx: np.ndarray, val: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per row, the k largest and the k smallest values with their indices: the summary's
    arrays (:data:`~prefect_influence.storage.SUMMARY_ARRAYS`)."""
    return dict(zip(SUMMARY_ARRAYS, (*top_k(idx, val, k, True), *top_k(idx, val, k, False))))


def merge_top_k(
    running: dict[str, np.ndarray], part: dict[str, np.ndarray], k: int
) -> dict[str, np.ndarray]:
    """The top-k of the columns behind ``running`` and ``part`` together."""
    both = {name: np.hstack([running[name], part[name]]) for name in SUMMARY_ARRAYS}
    best = top_k(both["top_helpful"], both["top_helpful_values"], k, True)
    worst = top_k(both["top_harmful"], both["top_harmful_values"], k, False)
    return dict(zip(SUMMARY_ARRAYS, (*best, *worst)))


def top_k(idx: np.ndarray, val: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest (or smallest) values; ties broken by the smaller index.

    A partition finds each row's k-th key; only keys up to it (k of them unless ties or NaNs)
    are sorted, instead of the whole row.
    """
    key = -val if largest else val
    if key.shape[1] > k:
        kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
        mask = key <= kth
        if bool((mask.sum(axis=1) == k).all()):
            cols = np.nonzero(mask)[1].reshape(key.shape[0], k)
        else:  # ties at the k-th key (or NaNs): sort those rows completely
            cols = np.stack([np.lexsort((idx[r], key[r]))[:k] for r in range(key.shape[0])])
        idx, val, key = (np.take_along_axis(a, cols, 1) for a in (idx, val, key))
    order = np.lexsort((idx, key), axis=-1)[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
