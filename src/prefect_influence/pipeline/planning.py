"""Planning a job on an output: the grid (auto chunk sizes), the fingerprint of what determines
the numbers, and the overwrite policy that decides whether an existing output is resumed,
extended (test rows appended), replaced or refused. Planning reads the inputs' contents once and writes only the manifest
and the empty result arrays."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from .. import __version__
from ..config import JobSpec, Method, PipelineConfig
from ..errors import ConfigMismatchError, ConfigurationError, ShapeMismatchError
from ..locations import location_key
from ..storage import Grid, InfluenceStore, Manifest, storage_options
from .data import is_stored, open_source
from .inputs import torch_dtype

# the network module (and with it torch, about a second to import) is loaded only once the
# data has passed its checks: a missing or malformed data file is refused before that

__all__ = [
    "planned_workers",
    "PlannedJob",
    "Survey",
    "survey_job",
    "plan_job",
    "auto_chunk_sizes",
    "check_output_still_ours",
    "check_output_apart_from_inputs",
    "fingerprint",
    "columns_by_layer",
]

#: per-task overhead of a Prefect task on Dask (40–90 ms), and the target share of it
TASK_OVERHEAD_S = 0.09
OVERHEAD_SHARE = 0.10
#: conservative per-worker throughput of small per-sample gradient kernels (flop/s)
WORKER_FLOPS = 1.0e9
MAX_GRAD_BYTES = 256 * 2**20
#: a column that scores layer by layer holds its train chunk's layer terms instead of gradients;
#: every column reads all test factors, so larger train chunks read them fewer times
MAX_TERMS_BYTES = 2**30
#: a factor chunk is computed and written whole by one task
MAX_FACTOR_BYTES = 2**30
#: with glibc's adaptive mmap threshold a block above ~32 MiB is a fresh mmap (page faults) on
#: every allocation
MAX_BLOCK_BYTES = 32 * 2**20
#: auto train chunks are a multiple of this many rows, so a block's row stride (train rows × 4
#: bytes) is a multiple of 256 bytes, which single-thread SGEMM runs about twice as fast
ALIGN_TRAIN_ROWS = 64
#: test rows are split between workers only down to this many per chunk (thinner chunks
#: multiply blocks and files, and a block CG solve shares less of its Krylov space)
MIN_SPLIT_TEST_ROWS = 128


def n_local_workers(config: PipelineConfig) -> int:
    return config.n_workers or os.cpu_count() or 1


#: seconds to reach an external scheduler (``dask_address``) when planning
SCHEDULER_CONNECT_S = 30


def planned_workers(config: PipelineConfig) -> int:
    """Workers the grid's auto chunks are planned for: the local cluster's, or on an external
    scheduler (``dask_address``) ``n_workers`` if given, else its workers at planning time."""
    if not config.dask_address:
        return n_local_workers(config)
    if config.n_workers:
        return config.n_workers
    from distributed import Client

    try:
        with Client(config.dask_address, timeout=SCHEDULER_CONNECT_S) as client:
            return max(1, len(client.nthreads()))
    except OSError as exc:  # before anything is written to the output
        raise ConfigurationError(
            f"dask_address {config.dask_address!r} cannot be reached: {exc}"
        ) from exc


#: how each field of :class:`JobSpec` enters the fingerprint (a test keeps this complete)
FINGERPRINTED = {
    "model": ("model", "loss"),  # factory, arguments and checkpoint digest; the loss by name
    "data": ("train", "test"),  # by content
    "method": ("method",),
    "mode": ("mode",),
    "dtype": ("dtype",),
    "device": ("device",),
    "test_chunk_size": ("test_chunk",),  # as resolved
    "train_chunk_size": ("train_chunk",),
}


def auto_chunk_sizes(
    n_train: int,
    n_test: int,
    n_parameters: int,
    n_workers: int,
    itemsize: int = 4,
    train_sample_bytes: Optional[int] = None,
) -> tuple[int, int]:
    """Chunk sizes from the problem size and worker count (deterministic: no timing).

    A column task costs about ``train_chunk · p · (6 + 2·n_test)`` flops (per-sample gradients
    plus one GEMM against every factor). It must last ``TASK_OVERHEAD_S / OVERHEAD_SHARE`` (0.9 s)
    at ``WORKER_FLOPS`` so Prefect's overhead stays ≤ 10%; beyond that, chunks shrink to give
    each worker about four columns, and a chunk's gradients stay under 256 MiB (for a column
    that scores layer by layer, ``train_sample_bytes`` per sample of layer terms: under 1 GiB).
    Test chunks keep a block within 32 MiB and a chunk of factors within 1 GiB, split evenly: a column with several blocks writes one while it
    computes the next; when a slightly larger number of chunks divides the test rows exactly,
    that number is taken (no partial last chunk for appended rows to grow). There are at least
    as many test chunks as workers (when there are enough test rows): the factor solves, which every column waits for, then run on all
    workers at once, and every worker pays its first-task start-up there instead of one after
    the other. Train chunks of more than ``ALIGN_TRAIN_ROWS`` rows are
    a multiple of it (rounded up while that keeps the gradient cap, else down).
    """
    flops_per_sample = n_parameters * (6 + 2 * n_test)
    min_train = math.ceil(
        TASK_OVERHEAD_S / OVERHEAD_SHARE * WORKER_FLOPS / max(flops_per_sample, 1)
    )
    spread = math.ceil(n_train / (4 * max(n_workers, 1)))
    if train_sample_bytes is None:
        cap = max(1, MAX_GRAD_BYTES // (n_parameters * itemsize))
    else:
        cap = max(1, MAX_TERMS_BYTES // max(1, int(train_sample_bytes)))
    train_chunk = max(1, min(n_train, cap, max(min_train, spread)))
    if ALIGN_TRAIN_ROWS < train_chunk < n_train:
        up = -(-train_chunk // ALIGN_TRAIN_ROWS) * ALIGN_TRAIN_ROWS
        train_chunk = min(
            n_train, up if up <= cap else train_chunk // ALIGN_TRAIN_ROWS * ALIGN_TRAIN_ROWS
        )
    per_worker = max(math.ceil(n_test / max(n_workers, 1)), min(n_test, MIN_SPLIT_TEST_ROWS))
    test_chunk = max(
        1,
        min(
            per_worker,
            MAX_BLOCK_BYTES // (train_chunk * itemsize),
            MAX_FACTOR_BYTES // (n_parameters * itemsize),
            4096,
        ),
    )
    n_chunks = math.ceil(n_test / test_chunk)
    # a chunk count up to half larger (or two more) that divides the rows exactly leaves no partial
    # last chunk, which test rows appended later would make grow (and be computed again)
    exact = [c for c in range(n_chunks, n_chunks + max(2, n_chunks // 2) + 1) if n_test % c == 0]
    n_chunks = exact[0] if exact else n_chunks
    test_chunk = math.ceil(n_test / n_chunks)  # even rows
    return train_chunk, test_chunk


#: the fingerprint entry of a job whose columns score layer by layer (from each train chunk's
#: layer terms) with a method whose columns formed gradients before (every one but EK-FAC):
#: its numbers round differently, and an output written before resumes the way it began
LAYER_COLUMNS = {"columns": "layer terms"}


def columns_entry(config: PipelineConfig, by_layer: bool) -> dict[str, str]:
    """The fingerprint entry that records how the job's columns score (see
    :data:`LAYER_COLUMNS`); empty for EK-FAC, whose columns always scored layer by layer."""
    return dict(LAYER_COLUMNS) if by_layer and config.method.name is not Method.ekfac else {}


def columns_by_layer(config: PipelineConfig, fingerprint: dict[str, Any]) -> bool:
    """Whether the columns of the job with this (planned) fingerprint score from layer terms:
    as planning decided and the manifest records it, so every column of an output computes the
    same way."""
    if config.train_features.value != "none" or config.mode.value != "up":
        return False  # Perturbation mode, and stored train features, need the gradients
    if config.method.name is Method.ekfac:
        return True
    return all(fingerprint.get(k) == v for k, v in LAYER_COLUMNS.items())


def _settings(job: JobSpec) -> dict[str, Any]:
    """The fingerprint entries that the configuration alone determines."""
    return {
        "loss": job.model.loss,
        "method": job.method.fingerprinted(),
        "mode": job.mode.value,
        "dtype": job.dtype.value,
        "device": job.device.value,
    }


def fingerprint(
    job: JobSpec,
    model_fp: str,
    train_fp: str,
    test_fp: str,
    grid: Grid,
    columns: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Everything that determines the stored numbers (see :data:`FINGERPRINTED`), and how the
    columns score (:func:`columns_entry`)."""
    return {
        "model": model_fp,
        "train": train_fp,
        "test": test_fp,
        **_settings(job),
        "test_chunk": grid.test_chunk,
        "train_chunk": grid.train_chunk,
        **(columns or {}),
    }


def check_output_still_ours(config: PipelineConfig, manifest: Manifest) -> None:
    """A task's configuration must match the output's manifest: another run may have replaced
    the output (``overwrite``, a forced lease takeover) while this run's tasks were queued, and
    they must not write this configuration's blocks into that run's arrays."""
    from .network import model_identity

    stored = manifest.fingerprint
    differs = [k for k, v in _settings(config.job()).items() if stored.get(k) != v]
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
    options = storage_options(config)
    out = location_key(config.output, options)
    inputs = {
        "data.train": config.data.train,
        "data.test": config.data.test,
        "model.checkpoint": config.model.checkpoint,
    }
    for what, url in inputs.items():
        if not url or not is_stored(url):
            continue
        where = location_key(url, options)
        if where == out or where.startswith(out + "/") or out.startswith(where + "/"):
            raise ConfigurationError(
                f"output {config.output!r} overlaps the job's input {what} ({url!r}): results "
                "written there (or cleared by overwrite) would destroy it. Choose an output "
                "location apart from the inputs."
            )


@dataclass(frozen=True)
class PlannedJob:
    """The output's manifest after planning, and whether it was there already (a resume)."""

    manifest: Manifest
    resumed: bool
    #: "new", "resume", "replace" or "append" (see :class:`Survey`)
    action: str = "resume"

    @property
    def grid(self) -> Grid:
        return self.manifest.grid


@dataclass(frozen=True)
class Survey:
    """What planning would do, found without writing anything: the job's grid and fingerprint,
    the output's manifest if it has one, and the action planning would take on it."""

    config: PipelineConfig
    grid: Grid
    fingerprint: dict[str, Any]
    existing: Optional[Manifest]
    #: "new" (an empty output), "resume" (the same job), "replace" (``overwrite`` clears it),
    #: "append" (the same job with test rows appended: only the new rows are computed)
    action: str
    train_rows: int
    test_rows: int
    parameter_count: int


def survey_job(config: PipelineConfig, n_workers: int = 1, check_lease: bool = False) -> Survey:
    """Every check of :func:`plan_job` without its writes: inputs readable and finite, model,
    loss and data fitting together, the method's options, the output's location, contents and
    (with ``check_lease``) lease. Raises what :func:`plan_job` would raise; writes nothing but
    a probe file that it deletes (the output must be writable)."""
    options = storage_options(config)
    job = config.job()
    train = open_source(config.data.train, options, "train")
    test = open_source(config.data.test, options, "test")
    data_fps = (train.fingerprint(), test.fingerprint())  # also refuses NaN/Inf
    if train.x_shape != test.x_shape:
        raise ShapeMismatchError(
            f"training samples have shape {train.x_shape} but test samples {test.x_shape}."
        )
    from .network import (
        build_influence_model,
        check_model_fits_data,
        layer_terms_bytes,
        load_network,
    )

    network, model_fp = load_network(config)
    for source in (train, test):
        check_model_fits_data(network, config.model.loss, source, torch_dtype(config.dtype))
    model = build_influence_model(config, network)  # validates the options (rank, layers...)
    if config.train_features.value != "none" and config.mode.value != "up":
        raise ConfigurationError(
            f"train_features {config.train_features.value!r} are per-sample gradients, which "
            f"only Up-mode influences use; mode is {config.mode.value!r}. Set train_features "
            "to 'none' or mode to 'up'."
        )
    check_output_apart_from_inputs(config)
    p = sum(q.numel() for q in network.parameters() if q.requires_grad)
    store = InfluenceStore(config.output, options)
    store.check_writable()
    if check_lease:
        store.lease.check_free(force=config.force)
    existing = store.read_manifest()
    itemsize = torch_dtype(config.dtype).itemsize
    sample_bytes = layer_terms_bytes(config, model, train)
    auto_train, auto_test = auto_chunk_sizes(
        len(train), len(test), p, n_workers, itemsize, sample_bytes
    )
    auto = {"test": config.test_chunk_size == "auto", "train": config.train_chunk_size == "auto"}
    train_chunk = auto_train if auto["train"] else int(config.train_chunk_size)
    test_chunk = auto_test if auto["test"] else int(config.test_chunk_size)

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
    columns = columns_entry(config, sample_bytes is not None)
    action = None
    if existing is not None:
        # auto chunking adopts the stored chunk sizes: a resume or an append never re-chunks
        # (with overwrite only when it is one; otherwise the output is replaced anyway)
        old = existing.fingerprint
        stored = grid_of(
            old.get("test_chunk", test_chunk) if auto["test"] else test_chunk,
            old.get("train_chunk", train_chunk) if auto["train"] else train_chunk,
        )
        # an output whose columns formed gradients (written before they could score layer by
        # layer) goes on forming them: its blocks keep their rounding
        stored_columns = {k: old[k] for k in LAYER_COLUMNS if k in old}
        stored_fp = fingerprint(job, model_fp, *data_fps, stored, stored_columns)
        if stored_fp == old:
            grid, columns, action = stored, stored_columns, "resume"  # with or without overwrite
        elif _appends_to(existing, stored_fp, test):
            # with or without overwrite: replacing would compute the same bytes again
            grid, columns, action = stored, stored_columns, "append"
        elif not config.overwrite:
            grid = stored
    fp = fingerprint(job, model_fp, *data_fps, grid, columns)
    if action is not None:
        pass
    elif existing is not None and not config.overwrite:
        differs = existing.differences(fp)
        why = ""
        if "test" in differs:
            why = (
                f" The test set ({len(test)} rows) neither equals the stored one "
                f"({existing.grid.n_test} rows) nor starts with it: an output takes only new "
                "test rows appended after the ones it holds."
            )
        raise ConfigMismatchError(
            f"{config.output!r} holds results of a different configuration (differs in: "
            f"{', '.join(differs)}).{why} Use another output, or overwrite=True to replace them."
        )
    elif existing is None and not store.is_empty() and not config.overwrite:
        raise ConfigMismatchError(
            f"{config.output!r} is not empty and holds no prefect-influence manifest; refusing "
            "to write into it. Choose an empty location or set overwrite=True."
        )
    else:
        action = "replace" if existing is not None or not store.is_empty() else "new"
    return Survey(config, grid, fp, existing, action, len(train), len(test), p)


def _create_features_array(config: PipelineConfig, store: InfluenceStore, grid: Grid) -> None:
    from .features import features_description

    description = features_description(config, grid)
    if description is not None:
        store.create_features_array(grid, description)


def _appends_to(existing: Manifest, fp: dict[str, Any], test: Any) -> bool:
    """Whether the job ``fp`` is the stored job with test rows appended: only the test set
    differs, it is longer, and its first rows are the stored test set."""
    n_old = existing.grid.n_test
    return (
        existing.differences(fp) == ["test"]
        and len(test) > n_old
        and test.fingerprint(stop=n_old) == existing.fingerprint.get("test")
    )


def plan_job(config: PipelineConfig, n_workers: int = 1) -> PlannedJob:
    """Resolve inputs, fingerprint them, check or create the output; cheap relative to the job.

    An existing output with another fingerprint raises :class:`ConfigMismatchError` naming the
    differences, unless ``config.overwrite`` (then it is cleared). With ``auto`` chunking, an
    existing output's chunk sizes are adopted, so a resume never re-chunks (with or without
    ``overwrite``, even when the worker count changed).
    """
    survey = survey_job(config, n_workers)
    store = InfluenceStore(config.output, storage_options(config))
    if survey.action == "resume":
        store.create_arrays(survey.grid)  # also completes the growth of an interrupted append
        _create_features_array(config, store, survey.grid)
        return PlannedJob(survey.existing, True, "resume")
    if survey.action == "replace":
        store.clear()
        store = InfluenceStore(config.output, storage_options(config))
    manifest = Manifest(
        fingerprint=survey.fingerprint,
        grid=survey.grid,
        config=config.redacted() | {"overwrite": False, "force": False},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        package_version=__version__,
        inherits=survey.existing.accepted_ids if survey.action == "append" else (),
    )
    # the manifest first: a run stopped before the arrays grow resumes this manifest, and
    # planning it again grows them
    store.write_manifest(manifest)
    store.create_arrays(survey.grid)
    _create_features_array(config, store, survey.grid)
    return PlannedJob(manifest, survey.action in ("resume", "append"), survey.action)
