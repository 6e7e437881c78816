"""The stages of an influence job as plain functions of ``(config, indices)``: fit, factors of
one test chunk, one column of blocks (one train chunk against the test chunks), summary.

Each stage reads what it needs from the configuration's sources and the store, skips work whose
completion record validates, and writes its results through :mod:`prefect_influence.storage`.
Prefect tasks wrap these functions one-to-one; tests and the sequential path call them directly.
Per-sample computations run with one torch thread, so a chunk's bytes never depend on where
or when it was computed: a resumed job is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..base import InfluenceMode
from ..blocks import TrainOperand, check_finite_factors, influence_block, train_operand
from ..config import PipelineConfig
from ..errors import StorageError
from ..storage import FACTORS, INFLUENCES, SELF_INFLUENCE, TRAIN_FEATURES, Grid, InfluenceStore
from ..torch.functional import rows_within
from .context import job_context, planned_store, tensors
from .data import open_source
from .features import features_description, features_of
from .network import build_influence_model, load_network
from .planning import columns_by_layer
from .ranking import ColumnTop, kept_rows, merge_top_k, stack_rows
from .resources import BackgroundWriter, release_free_memory, torch_threads

__all__ = ["fit_stage", "factors_stage", "column_stage", "summary_stage", "StoredFactors"]


def _writable(values: np.ndarray) -> np.ndarray:
    """torch wants writable memory; chunks read straight from storage may be read-only."""
    return values if values.flags.writeable else values.copy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def fit_stage(config: PipelineConfig) -> bool:
    """Fit the influence model and store its state; returns ``True`` if a valid one was reused."""
    store, _ = planned_store(config)
    if store.read_fitted_state() is not None:
        return True
    _fit_and_store(config, store)
    release_free_memory()  # the training set and the fit's temporaries are gone by now
    return False


def _fit_and_store(config: PipelineConfig, store: InfluenceStore) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    network, _ = load_network(config)
    model = build_influence_model(config, network)
    source = open_source(config.data.train, store.storage_options, "train")
    x, y = tensors(source.rows(0, len(source)))
    model.fit(DataLoader(TensorDataset(x, y), batch_size=config.method.fit_batch_size))
    store.write_fitted_state(model.fitted_state())


def factors_stage(config: PipelineConfig, i: int) -> bool:
    """Factors of test chunk ``i``; returns ``True`` if the stored chunk was reused."""
    ctx = job_context(config)
    if ctx.store.chunk_done(FACTORS, ctx.grid, (i,)):
        return True
    start, stop = ctx.grid.test_ranges[i]
    with torch_threads(1):
        x, y = ctx.rows("test", start, stop)
        factors = ctx.model.influence_factors(x, y)
    ctx.store.write_chunk(FACTORS, ctx.grid, (i,), _numpy(factors))
    return False


def column_stage(
    config: PipelineConfig, j: int, test_chunks: Optional[list[int]] = None
) -> dict[str, int]:
    """Blocks ``(i, j)`` for the given test chunks (default all) and, if asked, the
    self-influence and the stored features of train chunk ``j``. The train chunk's gradients are computed once, only if
    something is missing. Returns counts of computed and reused blocks."""
    ctx = job_context(config)
    grid, store, mode = ctx.grid, ctx.store, InfluenceMode.parse(config.mode)
    rows = list(range(grid.shape[0])) if test_chunks is None else list(test_chunks)
    missing = [i for i in rows if not store.chunk_done(INFLUENCES, grid, (i, j))]
    want_self = config.self_influence and not store.chunk_done(SELF_INFLUENCE, grid, (j,))
    # the column's top-k, while its blocks are in memory (whole columns only: a partial one
    # is a retry of some blocks, and the summary reads what it lacks); a stored part is
    # extended by the rows it lacks (test rows appended since)
    k = min(config.top_k, grid.n_train)
    part, top_from = None, grid.n_test
    if (
        config.summary
        and mode is InfluenceMode.Up
        and test_chunks is None
        and not _summary_done(store, config, grid)
    ):
        part = store.read_summary_part(j, k)
        top_from = 0 if part is None else kept_rows(part, grid)
    top_rows = {i for i in rows if grid.test_ranges[i][0] >= top_from}
    features = features_description(config, grid)
    stored_features = None  # this chunk's, when stored and valid: read once
    want_features = False
    if features is not None and store.features_description() == features:
        stored_features = store.read_done_chunk(TRAIN_FEATURES, grid, (j,))
        want_features = stored_features is None
    counts = {"computed": len(missing), "reused": len(rows) - len(missing)}
    if not missing and not want_self and not top_rows and not want_features:
        return counts
    start, stop = grid.train_ranges[j]
    top = ColumnTop(grid, j, k)
    with torch_threads(1), BackgroundWriter() as writer:
        if missing or want_self or want_features:
            operand = _stored_gradients(ctx, features, stored_features)
            if operand is None:
                x, y = ctx.rows("train", start, stop)
                # layer terms instead of gradients as planning decided and the manifest records,
                # so a resumed column computes its blocks the same way
                layer_wise = columns_by_layer(config, ctx.manifest.fingerprint)
                operand = train_operand(ctx.model, x, y, mode, by_layer=layer_wise)
        if want_features:
            values = _numpy(features_of(features, operand.grads))
            writer.submit(store.write_chunk, TRAIN_FEATURES, grid, (j,), values)
        by_layer = {}
        if missing and operand.terms is not None:
            # every missing block at once, the factors read in tiles: each layer's train
            # gradients are formed once for the whole column, never all test rows in memory
            source = StoredFactors(store, grid, missing, ctx.model.dtype, ctx.model.device)
            scores = ctx.model.influences_from_terms(source, operand.terms)
            by_layer = dict(zip(missing, scores.split(source.chunk_rows)))
        for i in sorted(top_rows.union(missing)):
            if i not in missing:  # a stored block: read back for the column's top-k
                top.add(i, store.read_chunk(INFLUENCES, grid, (i, j)))
                continue
            if i in by_layer:
                block = _numpy(by_layer[i])
            else:
                factors = torch.from_numpy(_writable(store.read_chunk(FACTORS, grid, (i,))))
                block = _numpy(influence_block(ctx.model, factors, operand, mode))
            writer.submit(store.write_chunk, INFLUENCES, grid, (i, j), block)
            if i in top_rows:
                top.add(i, block)
        if want_self:
            if operand.terms is not None:
                values = ctx.model.self_influences_from_terms(operand.terms)
            else:
                grads = operand.grads
                values = _self_influences(
                    ctx.model, grads if grads is not None else ctx.model.per_sample_grads(x, y)
                )
            writer.submit(store.write_chunk, SELF_INFLUENCE, grid, (j,), _numpy(values))
    if top_rows:  # after its blocks are written: a part never describes blocks that are not
        store.write_summary_part(j, _with_kept_rows(part, top_from, top.arrays()), k)
    return counts


class StoredFactors:
    """Stored factor chunks ``chunks`` as one :class:`~prefect_influence.torch.layers.
    FactorColumns` (their rows in that order), read tile by tile from storage.

    Row tiles never span chunks and sit at fixed offsets within each, so a block's numbers do not
    depend on which other blocks of its column are computed with it (a resumed column equals an
    uninterrupted one)."""

    def __init__(self, store: InfluenceStore, grid: Grid, chunks: list[int], dtype, device):
        self.store, self.grid, self.chunks = store, grid, list(chunks)
        self.dtype, self.device = dtype, device
        self.chunk_rows = [grid.test_ranges[i][1] - grid.test_ranges[i][0] for i in self.chunks]
        self.offsets = np.concatenate([[0], np.cumsum(self.chunk_rows)]).astype(int).tolist()
        self.n_rows = self.offsets[-1]

    def row_tiles(self, max_rows: int) -> list[tuple[int, int]]:
        step = max(1, int(max_rows))
        return [
            (offset + s, offset + min(s + step, rows))
            for offset, rows in zip(self.offsets, self.chunk_rows)
            for s in range(0, rows, step)
        ]

    def read(self, rows: tuple[int, int], cols: slice) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, rows[0], side="right")) - 1
        local = slice(rows[0] - self.offsets[k], rows[1] - self.offsets[k])
        if local.stop > self.chunk_rows[k]:
            raise ValueError(f"row tile {rows} spans factor chunks")
        values = self.store.read_chunk_part(FACTORS, self.grid, (self.chunks[k],), local, cols)
        tile = torch.from_numpy(_writable(values)).to(device=self.device, dtype=self.dtype)
        check_finite_factors(tile)
        return tile


def _stored_gradients(
    ctx, features: Optional[dict[str, Any]], stored: Optional[np.ndarray]
) -> Optional[TrainOperand]:
    """A train chunk's per-sample gradients as its stored exact features (the bytes the
    gradient pass would compute: one torch thread), so appended test rows skip that pass."""
    if stored is None or features is None or features["kind"] != "exact":
        return None
    return TrainOperand(grads=torch.from_numpy(_writable(stored)).to(ctx.model.device))


def _with_kept_rows(
    part: Optional[dict[str, np.ndarray]], kept: int, tail: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A column's top-k: the first ``kept`` rows of its stored part, then the rows ranked now."""
    if part is None or kept == 0:
        return tail
    return stack_rows({name: values[:kept] for name, values in part.items()}, tail)


def _self_influences(model, grads: torch.Tensor) -> torch.Tensor:
    """``⟨H⁻¹g, g⟩`` per row, in slices of ≤ 4 MiB of rows (the ``n × p`` factors of a whole
    chunk are never needed; a solve's temporaries are a few times its input)."""
    step = rows_within(grads.shape[1], grads.element_size(), budget=4 * 2**20)
    return torch.cat([(model.factors_from_grads(g) * g).sum(dim=1) for g in grads.split(step)])


def _summary_done(
    store: InfluenceStore, config: PipelineConfig, grid: Grid
) -> Optional[dict[str, Any]]:
    """The stored summary's info if it is valid, for ``config.top_k`` and for every test row
    (not those of the test set before rows were appended)."""
    existing = store.read_summary()
    if existing is None or existing[1].get("top_k") != config.top_k:
        return None
    arrays, info = existing
    rows = {len(a) for a in arrays.values()}
    return info if not rows or rows == {grid.n_test} else None


def summary_stage(config: PipelineConfig) -> dict[str, Any]:
    """Top-k most helpful / harmful training indices per test point (Up mode), merged from the
    columns' own top-k (written by the column tasks while their blocks were in memory); a
    column without one is summarized from its stored blocks here. Returns the summary's info.
    Exact: see :mod:`.ranking`."""
    store, manifest = planned_store(config)
    grid = manifest.grid
    done = _summary_done(store, config, grid)
    if done is not None:
        return done
    info: dict[str, Any] = {"top_k": config.top_k, "mode": grid.mode}
    arrays: dict[str, np.ndarray] = {}
    if grid.mode == InfluenceMode.Up.value:
        k = min(config.top_k, grid.n_train)
        arrays = {}  # the running result, n_test × k: folded one column at a time
        for j in range(grid.shape[1]):
            part = store.read_summary_part(j, k)
            kept = 0 if part is None else kept_rows(part, grid)
            if kept < grid.n_test:
                top = ColumnTop(grid, j, k)
                for i in range(kept // grid.test_chunk, grid.shape[0]):
                    block = store.read_done_chunk(INFLUENCES, grid, (i, j))
                    if block is None:
                        raise StorageError(
                            f"{config.output!r}: influence block ({i}, {j}) is missing or does "
                            "not match its record; compute the influences (column "
                            f"{j}) before the summary."
                        )
                    top.add(i, block)
                part = _with_kept_rows(part, kept, top.arrays())
            arrays = merge_top_k(arrays, part, k) if arrays else part
    store.write_summary(arrays, info)
    return info
