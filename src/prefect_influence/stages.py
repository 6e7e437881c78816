"""The stages of an influence job as plain functions of ``(config, indices)``: plan, fit,
factors of one test chunk, one column of blocks (one train chunk against test chunks), summary.

Each stage reads what it needs from the configuration's sources and the store, skips work whose
completion record validates, and writes its results through :mod:`prefect_influence.storage`.
Prefect tasks wrap these functions one-to-one; tests and the sequential path call them directly.
Per-sample computations run with one torch thread, so a chunk's bytes never depend on where
or when it was computed: a resumed job is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from . import __version__
from .base import InfluenceMode
from .blocks import influence_block, train_operand
from .config import PipelineConfig
from .errors import ShapeMismatchError, StorageError
from .sources import (
    ConfigurationError,
    DataSource,
    build_influence_model,
    check_model_fits_data,
    is_stored,
    load_network,
    model_identity,
    open_source,
    torch_dtype,
)
from .storage import (
    FACTORS,
    INFLUENCES,
    SELF_INFLUENCE,
    ConfigMismatchError,
    Grid,
    InfluenceStore,
    location_key,
    plan_id,
)
from .torch.functional import rows_within

__all__ = [
    "Plan",
    "plan_job",
    "fit_stage",
    "factors_stage",
    "column_stage",
    "summary_stage",
    "auto_chunk_sizes",
]

logger = logging.getLogger("prefect_influence")

#: per-task overhead of a Prefect task on Dask (measured 40–90 ms), and the target share of it
TASK_OVERHEAD_S = 0.09
OVERHEAD_SHARE = 0.10
#: conservative per-worker throughput of small per-sample gradient kernels (flop/s)
WORKER_FLOPS = 1.0e9
MAX_GRAD_BYTES = 256 * 2**20
#: with glibc's adaptive mmap threshold a block above ~32 MiB is a fresh mmap (page faults) on
#: every allocation (Dask workers started with ``TORCH_WORKER_DASK_CONFIG`` map every block
#: above 4 MiB afresh and hand it back when freed: bounded memory, measured at equal speed)
MAX_BLOCK_BYTES = 32 * 2**20
#: auto train chunks are a multiple of this many rows: a block's row stride (train rows × 4
#: bytes) then is a multiple of 256 bytes. MKL's single-thread SGEMM for a 1000 × 6250 × 610
#: block ran at 38 GFLOP/s, for 1000 × 6272 × 610 at 74 (measured; 6248 rows: 68)
ALIGN_TRAIN_ROWS = 64
#: test rows are split between workers only down to this many per chunk (thinner chunks
#: multiply blocks and files, and a block CG solve shares less of its Krylov space)
MIN_SPLIT_TEST_ROWS = 128


@dataclass(frozen=True)
class Plan:
    grid: Grid
    fingerprint: dict[str, Any]
    reused_output: bool


def _config_key(config: PipelineConfig) -> str:
    return config.model_dump_json()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- planning --------------------------------------------------------------------------------------
def auto_chunk_sizes(
    n_train: int, n_test: int, n_parameters: int, n_workers: int, itemsize: int = 4
) -> tuple[int, int]:
    """Chunk sizes from the problem size and worker count (deterministic: no timing).

    A column task costs about ``train_chunk · p · (6 + 2·n_test)`` flops (per-sample gradients
    plus one GEMM against every factor). It must last ``TASK_OVERHEAD_S / OVERHEAD_SHARE`` (0.9 s)
    at ``WORKER_FLOPS`` so Prefect's overhead stays ≤ 10%; beyond that, chunks shrink to give
    each worker about four columns, and a chunk's gradients stay under 256 MiB. Test chunks
    keep a block within 32 MiB, split evenly: a column with several blocks writes one while it
    computes the next. There are at least as many test chunks as workers (when there are
    enough test rows): the factor solves, which every column waits for, then run on all
    workers at once, and every worker pays its first-task start-up there instead of one after
    the other (measured: one factor chunk on two workers left one idle for 3 s, and its first
    column then took 9 s instead of 5). Train chunks of more than ``ALIGN_TRAIN_ROWS`` rows are
    a multiple of it (rounded up while that keeps the gradient cap, else down).
    """
    flops_per_sample = n_parameters * (6 + 2 * n_test)
    min_train = math.ceil(
        TASK_OVERHEAD_S / OVERHEAD_SHARE * WORKER_FLOPS / max(flops_per_sample, 1)
    )
    spread = math.ceil(n_train / (4 * max(n_workers, 1)))
    cap = max(1, MAX_GRAD_BYTES // (n_parameters * itemsize))
    train_chunk = max(1, min(n_train, cap, max(min_train, spread)))
    if ALIGN_TRAIN_ROWS < train_chunk < n_train:
        up = -(-train_chunk // ALIGN_TRAIN_ROWS) * ALIGN_TRAIN_ROWS
        train_chunk = min(
            n_train, up if up <= cap else train_chunk // ALIGN_TRAIN_ROWS * ALIGN_TRAIN_ROWS
        )
    per_worker = max(math.ceil(n_test / max(n_workers, 1)), min(n_test, MIN_SPLIT_TEST_ROWS))
    test_chunk = max(1, min(per_worker, MAX_BLOCK_BYTES // (train_chunk * itemsize), 4096))
    test_chunk = math.ceil(n_test / math.ceil(n_test / test_chunk))  # even rows, same count
    return train_chunk, test_chunk


def _fingerprint(
    config: PipelineConfig, model_fp: str, train_fp: str, test_fp: str, grid: Grid
) -> dict[str, Any]:
    return {
        "model": model_fp,
        "train": train_fp,
        "test": test_fp,
        **_settings_fingerprint(config),
        "test_chunk": grid.test_chunk,
        "train_chunk": grid.train_chunk,
    }


def _settings_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    """The parts of the fingerprint that the configuration alone determines."""
    return {
        "loss": config.model.loss,
        "method": json.loads(config.method.model_dump_json()),
        "mode": config.mode.value,
        "dtype": config.dtype.value,
        "device": config.device.value,
    }


def _check_output_still_ours(config: PipelineConfig, manifest: dict[str, Any]) -> None:
    """A task's configuration must match the output's manifest: another run may have replaced
    the output (``overwrite``, a forced lease takeover) while this run's tasks were queued, and
    they must not write this configuration's blocks into that run's arrays."""
    stored = manifest.get("fingerprint", {})
    differs = [k for k, v in _settings_fingerprint(config).items() if stored.get(k) != v]
    if not str(stored.get("model", "")).startswith(model_identity(config) + "|"):
        differs.insert(0, "model")
    if differs:
        raise ConfigMismatchError(
            f"{config.output!r} now holds another configuration's job (differs in: "
            f"{', '.join(differs)}); another run replaced it while this one was running, so "
            "this task stops instead of writing into it."
        )


def check_output_apart_from_inputs(config: PipelineConfig) -> None:
    """Refuse an output that is, holds or lies inside one of the job's stored inputs: writing
    (and with ``overwrite``, clearing) it would destroy them."""
    out = location_key(config.output, config.storage_options)
    inputs = {
        "data.train": config.data.train,
        "data.test": config.data.test,
        "model.checkpoint": config.model.checkpoint,
    }
    for what, url in inputs.items():
        if not url or not is_stored(url):
            continue
        where = location_key(url, config.storage_options)
        if where == out or where.startswith(out + "/") or out.startswith(where + "/"):
            raise ConfigurationError(
                f"output {config.output!r} overlaps the job's input {what} ({url!r}): results "
                "written there (or cleared by overwrite) would destroy it. Choose an output "
                "location apart from the inputs."
            )


def plan_job(
    config: PipelineConfig, n_workers: int = 1, recorded: Optional[PipelineConfig] = None
) -> Plan:
    """Resolve inputs, fingerprint them, check or create the output; cheap relative to the job.

    An existing output with another fingerprint raises :class:`ConfigMismatchError` naming the
    differences, unless ``config.overwrite`` (then it is cleared). With ``auto`` chunking, an
    existing output's chunk sizes are adopted, so a resume never re-chunks (with or without
    ``overwrite``, even when the worker count changed).

    The manifest records ``recorded`` (default ``config``), redacted: a caller that merged
    secret storage options into ``config`` for access passes the configuration without them.
    """
    network, model_fp = load_network(config)
    train = open_source(config.data.train, config.storage_options, "train")
    test = open_source(config.data.test, config.storage_options, "test")
    data_fps = (train.fingerprint(), test.fingerprint())  # also refuses NaN/Inf
    if train.x_shape != test.x_shape:
        raise ShapeMismatchError(
            f"training samples have shape {train.x_shape} but test samples {test.x_shape}."
        )
    for source in (train, test):
        check_model_fits_data(network, config.model.loss, source, torch_dtype(config.dtype))
    build_influence_model(config, network)  # validates the method's options (rank, layers...)
    check_output_apart_from_inputs(config)
    p = sum(q.numel() for q in network.parameters() if q.requires_grad)
    store = InfluenceStore(config.output, config.storage_options)
    store.check_writable()
    manifest = store.read_manifest()
    itemsize = torch_dtype(config.dtype).itemsize
    auto_train, auto_test = auto_chunk_sizes(len(train), len(test), p, n_workers, itemsize)
    train_chunk = auto_train if config.train_chunk_size == "auto" else int(config.train_chunk_size)
    test_chunk = auto_test if config.test_chunk_size == "auto" else int(config.test_chunk_size)

    def grid_of(test_rows: int, train_rows: int) -> Grid:
        return Grid(
            len(test),
            len(train),
            min(test_rows, len(test)),
            min(train_rows, len(train)),
            p,
            train.x_shape,
            config.mode.value,
            config.dtype.value,
        )

    grid = grid_of(test_chunk, train_chunk)
    if manifest is not None:
        # auto chunking adopts the stored chunk sizes: a resume never re-chunks (with
        # overwrite only when the rest matches too; otherwise the output is replaced anyway)
        old = manifest.get("fingerprint", {})
        stored = grid_of(
            old.get("test_chunk", test_chunk) if config.test_chunk_size == "auto" else test_chunk,
            old.get("train_chunk", train_chunk)
            if config.train_chunk_size == "auto"
            else train_chunk,
        )
        if not config.overwrite or _fingerprint(config, model_fp, *data_fps, stored) == old:
            grid = stored
    fingerprint = _fingerprint(config, model_fp, *data_fps, grid)
    reused = False
    if manifest is not None:
        if manifest.get("fingerprint") == fingerprint:
            reused = True  # same configuration: resume, with or without overwrite
        elif config.overwrite:
            store.clear()
            store = InfluenceStore(config.output, config.storage_options)
        else:
            diff = sorted(
                k
                for k in set(fingerprint) | set(manifest.get("fingerprint", {}))
                if fingerprint.get(k) != manifest.get("fingerprint", {}).get(k)
            )
            raise ConfigMismatchError(
                f"{config.output!r} holds results of a different configuration (differs in: "
                f"{', '.join(diff)}). Use another output, or overwrite=True to replace them."
            )
    elif not store.is_empty():
        if not config.overwrite:
            raise ConfigMismatchError(
                f"{config.output!r} is not empty and holds no prefect-influence manifest; refusing "
                "to write into it. Choose an empty location or set overwrite=True."
            )
        store.clear()
        store = InfluenceStore(config.output, config.storage_options)
    if not reused:
        store.write_manifest(
            {
                "package_version": __version__,
                "fingerprint": fingerprint,
                "grid": grid.to_json(),
                "config": (recorded or config).redacted() | {"overwrite": False, "force": False},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    store.create_arrays(grid)
    return Plan(grid, fingerprint, reused)


# -- the job context of a process ------------------------------------------------------------------
class _Context:
    """What the tasks of one job share within a process: store, grid, data sources and (lazily)
    the fitted influence model, loaded once per worker process rather than once per task.

    A context belongs to one state of the output: :func:`_context` replaces it when the
    manifest changes (an ``overwrite``, new data at the same URLs), so a long-lived process
    (an external cluster's worker, a notebook) never serves an older run's model or rows.
    """

    def __init__(self, config: PipelineConfig, store: InfluenceStore, manifest: dict[str, Any]):
        self.config = config
        self.store = store
        self.grid = Grid.from_json(manifest["grid"])
        self.stamp = plan_id(manifest)
        self._sources: dict[str, DataSource] = {}
        self._lock = threading.Lock()

    def rows(self, role: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if role not in self._sources:
                url = self.config.data.train if role == "train" else self.config.data.test
                self._sources[role] = open_source(url, self.config.storage_options, role)
            source = self._sources[role]
        return _tensors(source.rows(start, stop))

    @functools.cached_property
    def model(self) -> Any:
        network, _ = load_network(self.config)
        model = build_influence_model(self.config, network)
        state = self.store.read_fitted_state()
        if state is None:
            raise StorageError(
                f"{self.config.output!r} has no valid fitted state; run the fit stage first."
            )
        return model.load_fitted_state(state)


#: job contexts kept per process (most recently used last)
MAX_CONTEXTS = 4
_contexts: "OrderedDict[str, _Context]" = OrderedDict()
_contexts_lock = threading.Lock()


def _planned_store(config: PipelineConfig) -> tuple[InfluenceStore, dict[str, Any]]:
    """The output's store and manifest, for a stage of this configuration's planned job."""
    store = InfluenceStore(config.output, config.storage_options)
    manifest = store.read_manifest()
    if manifest is None:
        raise StorageError(
            f"{config.output!r} holds no prefect-influence manifest; plan the job first."
        )
    _check_output_still_ours(config, manifest)
    store.bind_plan(manifest)  # its records count only for this plan of the output
    return store, manifest


def _context(config: PipelineConfig) -> _Context:
    """This process's context for the job, checked against the output's manifest on every
    call (one small read per task) and rebuilt when the manifest changed."""
    store, manifest = _planned_store(config)
    key, stamp = _config_key(config), plan_id(manifest)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None or ctx.stamp != stamp:
            ctx = _contexts[key] = _Context(config, store, manifest)
        _contexts.move_to_end(key)
        while len(_contexts) > MAX_CONTEXTS:
            _contexts.popitem(last=False)
    return ctx


def _tensors(rows: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A source's ``(x, y)`` rows as tensors (contiguous, as torch needs them)."""
    x, y = rows
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _writable(values: np.ndarray) -> np.ndarray:
    """torch wants writable memory; chunks read straight from storage may be read-only."""
    return values if values.flags.writeable else values.copy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# -- stages ----------------------------------------------------------------------------------------
def fit_stage(config: PipelineConfig) -> bool:
    """Fit the influence model and store its state; returns ``True`` if a valid one was reused."""
    store, _ = _planned_store(config)
    if store.read_fitted_state() is not None:
        return True
    _fit_and_store(config, store)
    release_free_memory()  # the training set and the fit's temporaries are gone by now
    return False


def _fit_and_store(config: PipelineConfig, store: InfluenceStore) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    network, _ = load_network(config)
    model = build_influence_model(config, network)
    source = open_source(config.data.train, config.storage_options, "train")
    x, y = _tensors(source.rows(0, len(source)))
    model.fit(DataLoader(TensorDataset(x, y), batch_size=config.method.fit_batch_size))
    store.write_fitted_state(model.fitted_state())


def release_free_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap pages for
    reuse): the process that fitted stays resident beside the Dask workers for the rest of
    the run. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def factors_stage(config: PipelineConfig, i: int) -> bool:
    """Factors of test chunk ``i``; returns ``True`` if the stored chunk was reused."""
    ctx = _context(config)
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
    self-influence of train chunk ``j``. The train chunk's gradients are computed once, only if
    something is missing. Returns counts of computed and reused blocks."""
    ctx = _context(config)
    grid, store, mode = ctx.grid, ctx.store, InfluenceMode.parse(config.mode)
    rows = list(range(grid.shape[0])) if test_chunks is None else list(test_chunks)
    missing = [i for i in rows if not store.chunk_done(INFLUENCES, grid, (i, j))]
    want_self = config.self_influence and not store.chunk_done(SELF_INFLUENCE, grid, (j,))
    # the column's top-k, while its blocks are in memory (whole columns only: a partial one
    # is a retry of some blocks, and the summary reads what it lacks)
    k = min(config.top_k, grid.n_train)
    want_top = (
        config.summary
        and mode is InfluenceMode.Up
        and test_chunks is None
        and store.read_summary_part(j, k) is None
        and not _summary_done(store, config)
    )
    counts = {"computed": len(missing), "reused": len(rows) - len(missing)}
    if not missing and not want_self and not want_top:
        return counts
    start, stop = grid.train_ranges[j]
    top = _ColumnTop(grid, j, k)
    with torch_threads(1), _Writer() as writer:
        if missing or want_self:
            x, y = ctx.rows("train", start, stop)
            operand = train_operand(ctx.model, x, y, mode)
        for i in rows if want_top else missing:
            if i not in missing:  # a stored block: read back for the column's top-k
                top.add(i, store.read_chunk(INFLUENCES, grid, (i, j)))
                continue
            factors = torch.from_numpy(_writable(store.read_chunk(FACTORS, grid, (i,))))
            block = _numpy(influence_block(ctx.model, factors, operand, mode))
            writer.submit(store.write_chunk, INFLUENCES, grid, (i, j), block)
            if want_top:
                top.add(i, block)
        if want_self:
            grads = operand.grads if operand.grads is not None else ctx.model.per_sample_grads(x, y)
            writer.submit(
                store.write_chunk,
                SELF_INFLUENCE,
                grid,
                (j,),
                _numpy(_self_influences(ctx.model, grads)),
            )
    if want_top:  # after its blocks are written: a part never describes blocks that are not
        store.write_summary_part(j, top.arrays(), k)
    return counts


_TOP_NAMES = ("top_helpful", "top_helpful_values", "top_harmful", "top_harmful_values")


def _summary_done(store: InfluenceStore, config: PipelineConfig) -> Optional[dict[str, Any]]:
    """The stored summary's info if it is valid and for ``config.top_k``."""
    existing = store.read_summary()
    return (
        existing[1] if existing is not None and existing[1].get("top_k") == config.top_k else None
    )


class _ColumnTop:
    """Top-k most helpful / harmful training indices per test row over one train chunk."""

    def __init__(self, grid, j: int, k: int):
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
            parts.append((*_top(idx, rows, self.k, True), *_top(idx, rows, self.k, False)))
        self.rows[i] = tuple(np.vstack([p[n] for p in parts]) for n in range(len(_TOP_NAMES)))

    def arrays(self) -> dict[str, np.ndarray]:
        ordered = [self.rows[i] for i in range(self.grid.shape[0])]
        return {name: np.vstack([r[n] for r in ordered]) for n, name in enumerate(_TOP_NAMES)}


def _self_influences(model, grads: torch.Tensor) -> torch.Tensor:
    """``⟨H⁻¹g, g⟩`` per row, in slices of ≤ 4 MiB of rows (the ``n × p`` factors of a whole
    chunk are never needed; a solve's temporaries are a few times its input)."""
    step = rows_within(grads.shape[1], grads.element_size(), budget=4 * 2**20)
    return torch.cat([(model.factors_from_grads(g) * g).sum(dim=1) for g in grads.split(step)])


class _Writer:
    """Writes chunks in one background thread while the caller computes the next: at most one
    write in flight (two blocks in memory), in submission order; a failed write is raised at
    the next ``submit`` or on exit, and no write is abandoned (exit waits for the last)."""

    def __enter__(self) -> "_Writer":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-influence-write")
        self._pending: Optional[Future] = None
        return self

    def submit(self, fn, *args) -> None:
        self._drain()
        self._pending = self._pool.submit(fn, *args)

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, *exc) -> None:
        try:
            self._drain()
        finally:
            self._pool.shutdown(wait=True)


def summary_stage(config: PipelineConfig) -> dict[str, Any]:
    """Top-k most helpful / harmful training indices per test point (Up mode), merged from the
    columns' own top-k (written by the column tasks while their blocks were in memory); a
    column without one is summarized from its stored blocks here. Returns the summary's info.

    Exact: a point in a row's overall top-k is in its column's top-k (one total order:
    value, then the smaller index), so merging the columns' lists gives the same result as
    ranking the whole row.
    """
    store, manifest = _planned_store(config)
    grid = Grid.from_json(manifest["grid"])
    done = _summary_done(store, config)
    if done is not None:
        return done
    info: dict[str, Any] = {"top_k": config.top_k, "mode": grid.mode}
    arrays: dict[str, np.ndarray] = {}
    if grid.mode == InfluenceMode.Up.value:
        k = min(config.top_k, grid.n_train)
        arrays = {}  # the running result, n_test × k: folded one column at a time
        for j in range(grid.shape[1]):
            part = store.read_summary_part(j, k)
            if part is None:
                top = _ColumnTop(grid, j, k)
                for i in range(grid.shape[0]):
                    block = store.read_done_chunk(INFLUENCES, grid, (i, j))
                    if block is None:
                        raise StorageError(
                            f"{config.output!r}: influence block ({i}, {j}) is missing or does "
                            "not match its record; compute the influences (column "
                            f"{j}) before the summary."
                        )
                    top.add(i, block)
                part = top.arrays()
            if arrays:
                part = {name: np.hstack([arrays[name], part[name]]) for name in _TOP_NAMES}
                best = _top(part["top_helpful"], part["top_helpful_values"], k, True)
                worst = _top(part["top_harmful"], part["top_harmful_values"], k, False)
                part = dict(zip(_TOP_NAMES, (*best, *worst)))
            arrays = part
    store.write_summary(arrays, info)
    return info


def _top(idx: np.ndarray, val: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest (or smallest) values; ties broken by the smaller index.

    A partition finds each row's k-th key; only keys up to it (k of them unless ties or NaNs)
    are sorted, instead of the whole row (7× faster on 1000 × 6250 blocks, measured).
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
