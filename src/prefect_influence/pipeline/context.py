"""What the stages of one job share within a process: the output's store and manifest, the
data sources, and the fitted influence model, loaded once per worker process rather than once
per task."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..config import PipelineConfig
from ..errors import StorageError
from ..storage import Grid, InfluenceStore, Manifest, storage_options
from .data import DataSource, open_source
from .network import build_influence_model, load_network
from .planning import check_output_still_ours

__all__ = ["JobContext", "job_context", "planned_store", "tensors", "MAX_CONTEXTS"]

#: job contexts kept per process (most recently used last)
MAX_CONTEXTS = 4


def tensors(rows: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A source's ``(x, y)`` rows as tensors (contiguous, as torch needs them)."""
    x, y = rows
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def planned_store(config: PipelineConfig) -> tuple[InfluenceStore, Manifest]:
    """The output's store and manifest, for a stage of this configuration's planned job; the
    store accepts and writes records of this manifest only."""
    store = InfluenceStore(config.output, storage_options(config))
    manifest = store.read_manifest()
    if manifest is None:
        raise StorageError(
            f"{config.output!r} holds no prefect-influence manifest; plan the job first."
        )
    check_output_still_ours(config, manifest)
    store.bind(manifest)
    return store, manifest


class JobContext:
    """One job's shared state in a process, for one manifest of its output: a context is
    replaced when the manifest changes (an ``overwrite``, new data at the same URLs), so a
    long-lived process (an external cluster's worker, a notebook) never serves an older run's
    model or rows."""

    def __init__(self, config: PipelineConfig, store: InfluenceStore, manifest: Manifest):
        self.config = config
        self.store = store
        self.manifest = manifest
        self._sources: dict[str, DataSource] = {}
        self._lock = threading.Lock()

    @property
    def grid(self) -> Grid:
        return self.manifest.grid

    def rows(self, role: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if role not in self._sources:
                url = self.config.data.train if role == "train" else self.config.data.test
                self._sources[role] = open_source(url, self.store.storage_options, role)
            source = self._sources[role]
        return tensors(source.rows(start, stop))

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


_contexts: "OrderedDict[str, JobContext]" = OrderedDict()
_contexts_lock = threading.Lock()


def job_context(config: PipelineConfig) -> JobContext:
    """This process's context for the job, checked against the output's manifest on every
    call (one small read per task) and rebuilt when the manifest changed."""
    store, manifest = planned_store(config)
    key = config.model_dump_json()
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None or ctx.manifest.id != manifest.id:
            ctx = _contexts[key] = JobContext(config, store, manifest)
        _contexts.move_to_end(key)
        while len(_contexts) > MAX_CONTEXTS:
            _contexts.popitem(last=False)
    return ctx
