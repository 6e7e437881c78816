"""Queries: the most helpful and most harmful training points of a few new test points, from
an output's fitted influence model, without touching its grid.

A query computes the new points' factors, then scores them against every train chunk: with
the output's stored train features when they are there (one pass of matrix products), else
from per-sample gradients computed now. Projected features give estimated scores; a query
takes the best candidates by estimate (``max(10·k, 100)`` per test point and direction) and
scores those exactly from their gradients, so the returned values are exact and the ranking
misses a training point only if the estimate put it outside the candidates.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..config import PipelineConfig
from ..errors import ConfigMismatchError, ConfigurationError, NotFittedError, ShapeMismatchError
from ..storage import TRAIN_FEATURES, InfluenceStore, storage_options
from .context import tensors
from .data import DataSource, open_source
from .features import features_of
from .inputs import torch_dtype
from .network import build_influence_model, check_model_fits_data, load_network
from .ranking import merge_top_k, top_both

__all__ = ["QueryResult", "query_output", "CANDIDATES_PER_K", "MIN_CANDIDATES"]

#: candidates per test point and direction that projected scores choose for exact scoring
CANDIDATES_PER_K = 10
MIN_CANDIDATES = 100
#: threads reading and checksumming stored features ahead of the products (both release the
#: GIL; the checksum is the larger cost)
READERS = 2


@dataclass(frozen=True)
class QueryResult:
    """Per query point, the top-k training indices and influences in both directions (rows
    ``n_query × k``), and with ``full_rows`` every influence (``n_query × n_train``)."""

    arrays: dict[str, np.ndarray]
    n_train: int
    #: "exact" or "projected" (the output's stored features), or "gradients" (computed now)
    features: str
    #: whether the values are exact (else projected estimates: ``refine=False``)
    exact: bool
    seconds: float
    rows: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return int(self.arrays["top_helpful"].shape[1])

    def table(self) -> list[dict[str, Any]]:
        """One row per query point and rank: the most helpful and most harmful point."""
        out = []
        for q in range(self.arrays["top_helpful"].shape[0]):
            for r in range(self.k):
                out.append(
                    {
                        "query": q,
                        "rank": r + 1,
                        "helpful_train_index": int(self.arrays["top_helpful"][q, r]),
                        "helpful_influence": float(self.arrays["top_helpful_values"][q, r]),
                        "harmful_train_index": int(self.arrays["top_harmful"][q, r]),
                        "harmful_influence": float(self.arrays["top_harmful_values"][q, r]),
                    }
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "n_query": int(self.arrays["top_helpful"].shape[0]),
            "n_train": self.n_train,
            "k": self.k,
            "features": self.features,
            "exact": self.exact,
            "seconds": round(self.seconds, 3),
            "top": [
                {
                    kind: [
                        {"train_index": int(i), "influence": float(v)}
                        for i, v in zip(
                            self.arrays[f"top_{kind}"][q], self.arrays[f"top_{kind}_values"][q]
                        )
                    ]
                    for kind in ("helpful", "harmful")
                }
                for q in range(self.arrays["top_helpful"].shape[0])
            ],
        }


def query_output(
    output: str,
    test: str,
    top_k: int = 10,
    storage_options: Optional[dict[str, Any]] = None,
    full_rows: bool = False,
    use_features: bool = True,
    refine: bool = True,
    storage_secret: Optional[str] = None,
) -> QueryResult:
    """Score the points at ``test`` (any data location a job takes) against the training set
    of the job stored at ``output``, with its fitted influence model; see the module doc.

    ``use_features=False`` ignores stored features; ``refine=False`` returns projected
    features' estimates as they are. Raises a clear error, and writes nothing, for a ``top_k``
    below 1, an output without a fitted model, test points of another shape, or a model or
    training set that changed since the output was made.
    """
    started = time.perf_counter()
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigurationError(f"top_k must be a positive integer, got {top_k!r}.")
    config, store = _job_of(output, storage_options, storage_secret)
    manifest = store.planned_manifest()
    grid = manifest.grid
    if grid.mode != "up":
        raise ConfigurationError(
            f"{output!r} holds {grid.mode}-mode influences; queries rank Up-mode influences."
        )
    state = store.read_fitted_state()
    if state is None:
        raise NotFittedError(
            f"{output!r} holds no fitted influence model yet: run its job (at least the fit "
            "stage) before querying it."
        )
    network, model_fp = load_network(config)
    if model_fp != manifest.fingerprint.get("model"):
        raise ConfigMismatchError(
            f"the model of {output!r} ({config.model.factory}, checkpoint "
            f"{config.model.checkpoint!r}) changed since the output was made; run the job again."
        )
    options = store.storage_options
    queries = open_source(test, options, "test")
    if queries.x_shape != grid.x_shape:
        raise ShapeMismatchError(
            f"query points {test!r} have shape {queries.x_shape}, but the training samples of "
            f"{output!r} have shape {grid.x_shape}."
        )
    queries.fingerprint()  # refuses NaN and Inf
    dtype = torch_dtype(config.dtype)
    check_model_fits_data(network, config.model.loss, queries, dtype)
    model = build_influence_model(config, network).load_fitted_state(state)
    xq, yq = tensors(queries.rows(0, len(queries)))
    factors = model.influence_factors(xq, yq)

    k = min(int(top_k), grid.n_train)
    scorer = _Scorer(config, store, manifest, model, factors, use_features)
    candidates = k
    if scorer.kind == "projected" and refine:
        candidates = min(grid.n_train, max(CANDIDATES_PER_K * k, MIN_CANDIDATES))
    running: dict[str, np.ndarray] = {}
    rows = [] if full_rows else None
    for j, scores in scorer.columns():
        s0, s1 = grid.train_ranges[j]
        idx = np.broadcast_to(np.arange(s0, s1), scores.shape)
        part = top_both(idx, scores, candidates)
        running = merge_top_k(running, part, candidates) if running else part
        if rows is not None:
            rows.append(scores)
    exact = scorer.kind != "projected"
    if not exact and refine:
        running, exact = scorer.refine(running, k), True
    arrays = {name: values[:, :k] for name, values in running.items()}
    full = np.hstack(rows) if rows is not None else None
    return QueryResult(
        arrays, grid.n_train, scorer.kind, exact, time.perf_counter() - started, full
    )


def _read_only_tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over the bytes read (no copy): only multiplied, never written."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(values)


def _job_of(
    output: str, options: Optional[dict[str, Any]], secret: Optional[str] = None
) -> tuple[PipelineConfig, InfluenceStore]:
    """The configuration stored with the output and the output's store. Storage options and
    secret are those given, else those the job ran with (masked credentials left out)."""
    given = options is not None or secret is not None
    store = InfluenceStore(output, storage_options(_Storage(dict(options or {}), secret)))
    manifest = store.read_manifest()
    if manifest is None:
        raise ConfigurationError(f"{output!r} holds no prefect-influence output to query.")
    stored = dict(manifest.config)
    if not given:
        options = {k: v for k, v in (stored.get("storage_options") or {}).items() if v != "***"}
        secret = stored.get("storage_secret")
    config = PipelineConfig.model_validate(
        {**stored, "output": output, "storage_options": options or {}, "storage_secret": secret}
    )
    return config, InfluenceStore(output, storage_options(config))


@dataclass(frozen=True)
class _Storage:
    storage_options: dict[str, Any]
    storage_secret: Optional[str]


class _Scorer:
    """Scores of the query factors against each train chunk, from stored features or
    gradients computed now (the training set is checked against the output's first)."""

    def __init__(self, config, store, manifest, model, factors, use_features: bool):
        self.config, self.store, self.manifest, self.model = config, store, manifest, model
        self.grid = manifest.grid
        self.factors = factors
        self._train: Optional[DataSource] = None
        description = store.features_description() if use_features else None
        self.description = description
        self.kind = description["kind"] if description else "gradients"
        self.projected_factors = (
            features_of(description, factors) if description is not None else None
        )

    def columns(self):
        """``(j, scores of train chunk j)`` for every train chunk, reading (and checksumming)
        the next chunks of features on two threads while this one is scored."""
        n = self.grid.shape[1]
        with ThreadPoolExecutor(
            max_workers=READERS, thread_name_prefix="prefect-influence-read"
        ) as pool:
            pending = [pool.submit(self._features, j) for j in range(min(READERS, n))]
            for j in range(n):
                stored = pending.pop(0).result()
                if j + READERS < n:
                    pending.append(pool.submit(self._features, j + READERS))
                if stored is not None:
                    feats = _read_only_tensor(stored)
                    operand = self.projected_factors.to(feats.dtype)
                else:  # no stored features for this chunk: its gradients (exact scores)
                    feats = self._gradients(*self.grid.train_ranges[j])
                    operand = self.factors.to(feats.dtype)
                    if self.kind == "projected":
                        feats, operand = (
                            features_of(self.description, feats),
                            self.projected_factors,
                        )
                yield j, (operand @ feats.T).numpy()

    def _features(self, j: int) -> Optional[np.ndarray]:
        if self.description is None:
            return None
        return self.store.read_done_chunk(TRAIN_FEATURES, self.grid, (j,))

    def _gradients(self, start: int, stop: int) -> torch.Tensor:
        x, y = tensors(self.train.rows(start, stop))
        return self.model.per_sample_grads(x, y)

    @property
    def train(self) -> DataSource:
        """The training set, checked to be the one the output was made from."""
        if self._train is None:
            url = self.config.data.train
            source = open_source(url, self.store.storage_options, "train")
            if source.fingerprint() != self.manifest.fingerprint.get("train"):
                raise ConfigMismatchError(
                    f"the training data at {url!r} changed since {self.config.output!r} was "
                    "made; run the job again (or query without refinement and gradients)."
                )
            self._train = source
        return self._train

    def refine(self, running: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        """Exact scores of every query's candidates (their gradients), ranked again."""
        chosen = np.unique(
            np.concatenate([running["top_helpful"], running["top_harmful"]], axis=None)
        )
        xs, ys = [], []
        for i in chosen.tolist():  # sorted: each stored chunk of the data is decoded once
            x, y = self.train.rows(i, i + 1)
            xs.append(x)
            ys.append(y)
        x, y = tensors((np.concatenate(xs), np.concatenate(ys)))
        grads = self.model.per_sample_grads(x, y)
        scores = (self.factors.to(grads.dtype) @ grads.T).numpy()
        idx = np.broadcast_to(chosen, scores.shape)
        return top_both(idx, scores, k)


def draw_query(
    output: str,
    test: str,
    result: QueryResult,
    path,
    storage_options: Optional[dict[str, Any]] = None,
    storage_secret: Optional[str] = None,
) -> bool:
    """Save a picture of the query's first points beside their most helpful and most harmful
    training points (to a path or binary file); ``False`` if the samples are not images."""
    from ..pictures import draw_top_influences, image_shape

    config, store = _job_of(output, storage_options, storage_secret)
    queries = open_source(test, store.storage_options, "test")
    if image_shape(queries.x_shape) is None:
        return False
    train = open_source(config.data.train, store.storage_options, "train")
    xq, yq = queries.rows(0, min(len(queries), 4))

    def train_row(i: int):
        x, y = train.rows(i, i + 1)
        return x[0], y[0]

    draw_top_influences(
        xq,
        yq,
        train_row,
        result.arrays,
        path,
        title="Query points, their most helpful (+) and most harmful (−) training points",
    )
    return True
