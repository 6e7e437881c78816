"""Sequential and Dask calculators against the model's in-memory computation, and their errors."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DO_NOT_TRACK", "1")

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from problems import nonconvex_classifier  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from zarr.storage import MemoryStore  # noqa: E402

from prefect_influence import (  # noqa: E402
    ArrayExistsError,
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    DisableClientThreadingCheck,
    InfluenceInputError,
    InfluenceMode,
    InvalidDimensionChunksError,
    NestedTorchCatAggregator,
    NonFiniteError,
    NotFittedError,
    SequentialInfluenceCalculator,
    ShapeMismatchError,
    ThreadSafetyViolationError,
    TorchCatAggregator,
    TorchNumpyConverter,
    UnalignedChunksError,
)
from prefect_influence.errors import NotFittedException  # noqa: E402
from prefect_influence.torch import DirectInfluence  # noqa: E402

# Everything is float64 and every path performs the same arithmetic as the in-memory call, only
# split into blocks (a factor solve per test chunk, a matrix product per block): the results
# differ by re-association of sums in BLAS only, a few ulps of the largest |value|. rtol=1e-10
# with atol=1e-12 (values are O(0.1..10)) leaves a wide margin and still catches any misplaced,
# missing or transposed block.
RTOL, ATOL = 1e-10, 1e-12

TRAIN_CHUNKS = (5, 8, 3, 6, 7, 2, 6)  # 7 uneven chunks, 37 samples
TEST_CHUNKS = (4, 5, 2)  # 11 samples
MODES = [InfluenceMode.Up, InfluenceMode.Perturbation]


class Problem:
    """A fitted float64 classifier on inputs of shape (2, 3) (so Perturbation has 2 extra dims)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        n_train, n_test = sum(TRAIN_CHUNKS), sum(TEST_CHUNKS)
        self.x = torch.randn(n_train, 2, 3, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n_train,), generator=gen)
        self.x_test = torch.randn(n_test, 2, 3, generator=gen, dtype=torch.float64)
        self.y_test = torch.randint(0, 3, (n_test,), generator=gen)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
        self.net = net.to(torch.float64).eval()
        self.model = self.fresh_model().fit(self.batches(self.x, self.y, (10, 10, 10, 7)))
        self.expected = {
            mode: self.model.influences(self.x_test, self.y_test, self.x, self.y, mode).numpy()
            for mode in MODES
        }
        self.factors = self.model.influence_factors(self.x_test, self.y_test)

    def fresh_model(self):
        return DirectInfluence(self.net, F.cross_entropy, regularization=0.1)

    @staticmethod
    def batches(x, y, sizes):
        """A re-iterable list of (x, y) batches of the given (uneven) sizes."""
        edges = np.cumsum((0, *sizes))
        return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]

    def train_batches(self):
        return self.batches(self.x, self.y, TRAIN_CHUNKS)

    def test_batches(self):
        return self.batches(self.x_test, self.y_test, TEST_CHUNKS)

    def dask_train(self):
        return (
            da.from_array(self.x.numpy()).rechunk({0: TRAIN_CHUNKS}),
            da.from_array(self.y.numpy()).rechunk({0: TRAIN_CHUNKS}),
        )

    def dask_test(self):
        return (
            da.from_array(self.x_test.numpy()).rechunk({0: TEST_CHUNKS}),
            da.from_array(self.y_test.numpy()).rechunk({0: TEST_CHUNKS}),
        )

    def expected_shape(self, mode):
        n_test, n_train = len(self.x_test), len(self.x)
        return (n_test, n_train) if mode is InfluenceMode.Up else (n_test, n_train, 2, 3)


@pytest.fixture(scope="module")
def problem():
    return Problem()


def _sync_calculator(model):
    return DaskInfluenceCalculator(model, TorchNumpyConverter(), DisableClientSingleThreadCheck)


class Counting:
    """Counts the calls of a model's gradient and factor methods (synchronous use only)."""

    def __init__(self, model, train_pass: str = "per_sample_grads"):
        self.counts = {train_pass: 0, "influence_factors": 0}
        for name in self.counts:
            method = getattr(model, name)

            def counted(*args, _name=name, _method=method, **kwargs):
                self.counts[_name] += 1
                return _method(*args, **kwargs)

            setattr(model, name, counted)


# -- sequential ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sequential_influences_match_in_memory(problem, mode):
    calc = SequentialInfluenceCalculator(problem.model)
    lazy = calc.influences(problem.test_batches(), problem.train_batches(), mode)
    assert lazy.len_outer_generator == len(TEST_CHUNKS)
    rows = lazy.compute()  # default: list of rows of blocks, shaped like the chunks
    assert [[tuple(b.shape[:2]) for b in row] for row in rows] == [
        [(i, j) for j in TRAIN_CHUNKS] for i in TEST_CHUNKS
    ]
    values = lazy.compute(aggregator=NestedTorchCatAggregator()).numpy()
    assert values.shape == problem.expected_shape(mode)
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_sequential_factors_and_from_factors(problem, mode):
    calc = SequentialInfluenceCalculator(problem.model)
    factors = calc.influence_factors(problem.test_batches())
    assert [f.shape[0] for f in factors.compute()] == list(TEST_CHUNKS)
    stacked = factors.compute(aggregator=TorchCatAggregator())
    np.testing.assert_allclose(stacked, problem.factors, rtol=RTOL, atol=ATOL)
    chunks = factors.compute()
    values = calc.influences_from_factors(chunks, problem.train_batches(), mode).compute(
        NestedTorchCatAggregator()
    )
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "cache_bytes, cached_chunks",
    [(2**30, len(TRAIN_CHUNKS)), (0, 0), (sum(TRAIN_CHUNKS[:3]) * 17 * 8, 3)],
)
def test_sequential_is_lazy_and_does_each_train_pass_once(problem, cache_bytes, cached_chunks):
    # the train chunks' layer terms (no per-sample gradients) in float64: the layers' inputs and
    # output gradients, (6 + 4) + (4 + 3) numbers per sample
    assert problem.model.scores_layer_by_layer
    model = problem.fresh_model()
    model.load_fitted_state(problem.model.fitted_state())
    counter = Counting(model, "layer_terms")
    calc = SequentialInfluenceCalculator(model, train_cache_bytes=cache_bytes)
    lazy = calc.influences(problem.test_batches(), problem.train_batches())
    assert counter.counts == {"layer_terms": 0, "influence_factors": 0}
    values = lazy.compute(NestedTorchCatAggregator()).numpy()
    np.testing.assert_allclose(values, problem.expected[InfluenceMode.Up], rtol=RTOL, atol=ATOL)
    # one solve per test chunk; train terms once, except those beyond the cache budget, which
    # are recomputed in every further row
    recomputed = (len(TEST_CHUNKS) - 1) * (len(TRAIN_CHUNKS) - cached_chunks)
    assert counter.counts == {
        "influence_factors": len(TEST_CHUNKS),
        "layer_terms": len(TRAIN_CHUNKS) + recomputed,
    }
    assert model.layer_terms(problem.x[:1], problem.y[:1]).nbytes == 17 * 8


def test_non_finite_factors_are_refused(problem):
    factors = problem.factors.clone()
    factors[1, 2] = float("nan")
    lazy = SequentialInfluenceCalculator(problem.model).influences_from_factors(
        [factors], problem.train_batches()
    )
    with pytest.raises(NonFiniteError):
        lazy.compute()
    lazy = _sync_calculator(problem.model).influences_from_factors(
        da.from_array(factors.numpy(), chunks=(4, -1)), *problem.dask_train()
    )
    with pytest.raises(NonFiniteError):
        lazy.compute(scheduler="synchronous")


def test_sequential_cache_budget_is_validated(problem):
    with pytest.raises(InfluenceInputError, match="train_cache_bytes"):
        SequentialInfluenceCalculator(problem.model, train_cache_bytes=-1)


def test_sequential_to_zarr_writes_the_matrix(problem, tmp_path):
    calc = SequentialInfluenceCalculator(problem.model)
    lazy = calc.influences(problem.test_batches(), problem.train_batches())
    stored = lazy.to_zarr(tmp_path / "infl.zarr", TorchNumpyConverter(), return_stored=True)
    np.testing.assert_allclose(stored[:], problem.expected[InfluenceMode.Up], rtol=RTOL, atol=ATOL)
    reopened = zarr.open_array(str(tmp_path / "infl.zarr"), mode="r")
    np.testing.assert_array_equal(reopened[:], stored[:])


def test_unfitted_model_raises_when_computed(problem):
    lazy = SequentialInfluenceCalculator(problem.fresh_model()).influences(
        problem.test_batches(), problem.train_batches()
    )
    with pytest.raises(NotFittedError, match="fit"):
        lazy.compute()
    with pytest.raises(ValueError, match="fit"):  # pyDVL's NotFittedException is a ValueError
        lazy.compute()
    assert issubclass(NotFittedException, ValueError) and NotFittedException is NotFittedError


@pytest.mark.parametrize("mode", MODES)
def test_sequential_from_factors_takes_one_element_batches(problem, mode):
    # a DataLoader over TensorDataset(factors) yields one-element lists, each holding a chunk
    loader = DataLoader(TensorDataset(problem.factors), batch_size=4)
    assert isinstance(next(iter(loader)), list) and len(next(iter(loader))) == 1
    calc = SequentialInfluenceCalculator(problem.model)
    lazy = calc.influences_from_factors(loader, problem.train_batches(), mode)
    assert lazy.len_outer_generator == 3  # 11 test samples in batches of 4
    values = lazy.compute(NestedTorchCatAggregator()).numpy()
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)
    tuples = [(problem.factors[:6],), (problem.factors[6:],)]
    values = calc.influences_from_factors(tuples, problem.train_batches(), mode).compute(
        NestedTorchCatAggregator()
    )
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)


def test_sequential_from_factors_refuses_batches_of_several_elements(problem):
    pairs = [(problem.factors, problem.factors)]
    lazy = SequentialInfluenceCalculator(problem.model).influences_from_factors(
        pairs, problem.train_batches()
    )
    with pytest.raises(InfluenceInputError, match="Batch 0 of z_test_factors is a tuple of 2"):
        lazy.compute()


def test_to_zarr_writes_into_a_store_object(problem):
    calc = SequentialInfluenceCalculator(problem.model)
    factors = calc.influence_factors(problem.test_batches())
    store = MemoryStore()
    stored = factors.to_zarr(store, TorchNumpyConverter(), return_stored=True)
    np.testing.assert_allclose(stored[:], problem.factors.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], stored[:])
    with pytest.raises(ArrayExistsError):  # the store holds data now
        factors.to_zarr(store, TorchNumpyConverter())

    nested = calc.influences(problem.test_batches(), problem.train_batches())
    block_store = MemoryStore()
    assert nested.to_zarr(block_store, TorchNumpyConverter()) is None
    np.testing.assert_allclose(
        zarr.open_array(block_store, mode="r")[:],
        problem.expected[InfluenceMode.Up],
        rtol=RTOL,
        atol=ATOL,
    )
    with pytest.raises(InfluenceInputError, match="storage_options"):
        factors.to_zarr(MemoryStore(), TorchNumpyConverter(), storage_options={"anon": True})
    with pytest.raises(InfluenceInputError, match="got int"):
        factors.to_zarr(3, TorchNumpyConverter())


# -- dask, synchronous scheduler -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dask_synchronous_matches_in_memory(problem, mode):
    calc = _sync_calculator(problem.model)
    assert calc.n_parameters == problem.model.n_parameters
    lazy = calc.influences(*problem.dask_test(), *problem.dask_train(), mode=mode)
    assert lazy.shape == problem.expected_shape(mode)
    assert lazy.chunks[:2] == (TEST_CHUNKS, TRAIN_CHUNKS)
    assert lazy.dtype == np.float64
    values = lazy.compute(scheduler="synchronous")
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_dask_factors_and_from_factors(problem, mode):
    calc = _sync_calculator(problem.model)
    factors = calc.influence_factors(*problem.dask_test())
    assert factors.chunks == (TEST_CHUNKS, (problem.model.n_parameters,))
    np.testing.assert_allclose(
        factors.compute(scheduler="synchronous"), problem.factors, rtol=RTOL, atol=ATOL
    )
    values = calc.influences_from_factors(factors, *problem.dask_train(), mode=mode)
    np.testing.assert_allclose(
        values.compute(scheduler="synchronous"), problem.expected[mode], rtol=RTOL, atol=ATOL
    )


def test_dask_without_train_data_uses_the_test_data(problem):
    calc = _sync_calculator(problem.model)
    expected = problem.model.influences(problem.x_test, problem.y_test).numpy()
    values = calc.influences(*problem.dask_test()).compute(scheduler="synchronous")
    np.testing.assert_allclose(values, expected, rtol=RTOL, atol=ATOL)


def test_dask_computes_factors_and_train_terms_once_per_chunk(problem):
    model = problem.fresh_model()
    model.load_fitted_state(problem.model.fitted_state())
    counter = Counting(model, "layer_terms")
    lazy = _sync_calculator(model).influences(*problem.dask_test(), *problem.dask_train())
    assert counter.counts == {"layer_terms": 0, "influence_factors": 0}  # lazy
    lazy.compute(scheduler="synchronous")
    # pyDVL's calculator would solve 3 × 7 times and take gradients 3 × 7 times here
    assert counter.counts == {
        "influence_factors": len(TEST_CHUNKS),
        "layer_terms": len(TRAIN_CHUNKS),
    }


def test_dask_counts_the_memory_of_a_train_chunks_layer_terms(problem):
    """Dask's memory accounting sees the terms a train operand holds between tasks."""
    from dask.sizeof import sizeof

    from prefect_influence.blocks import train_operand

    operand = train_operand(problem.model, problem.x, problem.y, "up", by_layer=True)
    assert operand.terms is not None
    assert sizeof(operand) >= operand.terms.nbytes == len(problem.x) * 17 * 8


def test_dask_takes_gradients_once_per_chunk_where_layers_are_not_supported(problem):
    """A trainable layer of another kind: each train chunk's gradients, once."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    net = net.to(torch.float64).eval()
    model = DirectInfluence(net, F.cross_entropy, regularization=0.1)
    model.fit([(problem.x, problem.y)])
    assert not model.scores_layer_by_layer
    counter = Counting(model)
    lazy = _sync_calculator(model).influences(*problem.dask_test(), *problem.dask_train())
    values = lazy.compute(scheduler="synchronous")
    assert counter.counts == {
        "influence_factors": len(TEST_CHUNKS),
        "per_sample_grads": len(TRAIN_CHUNKS),
    }
    expected = model.influences(problem.x_test, problem.y_test, problem.x, problem.y).numpy()
    np.testing.assert_allclose(values, expected, rtol=RTOL, atol=ATOL)


def test_dask_blocks_depend_on_the_factor_solves_themselves(problem):
    """A block's factor input is the solve's own key: no alias task (a chunk of a concatenated
    array) that the scheduler would place with the solve's output and queue behind the next
    long solve on that worker while other workers idle (measured on a 2-worker cluster)."""
    from dask.core import get_dependencies

    lazy = _sync_calculator(problem.model).influences(*problem.dask_test(), *problem.dask_train())
    graph = dict(lazy.__dask_graph__())
    blocks = [k for k in graph if isinstance(k, str) and k.startswith("influence-block-")]
    assert len(blocks) == len(TEST_CHUNKS) * len(TRAIN_CHUNKS)
    for key in blocks:
        i = int(key.rsplit("-", 2)[1])
        factors = [d for d in get_dependencies(graph, key) if "influence-factors" in str(d)]
        assert len(factors) == 1 and str(factors[0]).startswith("influence-factors-")
        assert str(factors[0]).endswith(f"-{i}")


# -- dask, real multi-process cluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """One real multi-process cluster for the module (starting one takes seconds on 2 cores)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.mark.parametrize("mode", MODES)
def test_dask_local_cluster_matches_in_memory(problem, cluster, mode):
    """Real worker processes: the model is scattered, tasks and results are pickled."""
    with Client(cluster) as client:
        calc = DaskInfluenceCalculator(problem.model, TorchNumpyConverter(), client)
        lazy = calc.influences(*problem.dask_test(), *problem.dask_train(), mode=mode)
        values = client.compute(lazy).result()
    np.testing.assert_allclose(values, problem.expected[mode], rtol=RTOL, atol=ATOL)


def test_threads_per_worker_2_is_refused(problem):
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(ThreadSafetyViolationError, match="threads_per_worker=1") as info:
            DaskInfluenceCalculator(problem.model, TorchNumpyConverter(), client)
        assert "2 threads" in str(info.value)


def test_a_cluster_without_workers_gets_a_clear_error(problem, monkeypatch):
    """The model is scattered to the workers: with none, distributed's scatter waited and
    failed with 'No valid workers found', and the thread-safety check was skipped."""
    from prefect_influence import dask_calculator

    monkeypatch.setattr(dask_calculator, "WAIT_FOR_WORKERS_S", 1.0)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(TimeoutError, match="has no workers"):
            DaskInfluenceCalculator(problem.model, TorchNumpyConverter(), client)


@pytest.mark.parametrize("client", ["tcp://127.0.0.1:8786", DisableClientSingleThreadCheck(), None])
def test_client_must_be_a_client_or_the_disable_type(problem, client):
    with pytest.raises(ValueError, match="DisableClientSingleThreadCheck"):
        DaskInfluenceCalculator(problem.model, TorchNumpyConverter(), client)
    with pytest.raises(InfluenceInputError):
        DaskInfluenceCalculator(problem.model, TorchNumpyConverter(), client)


def test_threading_check_alias():
    assert DisableClientThreadingCheck is DisableClientSingleThreadCheck


# -- dask input errors ---------------------------------------------------------------------------


def test_unaligned_chunks_are_refused_with_the_chunks_named(problem):
    calc = _sync_calculator(problem.model)
    x, y = problem.dask_train()
    y = y.rechunk(10)
    with pytest.raises(UnalignedChunksError, match=r"chunk 0 holds 5 samples in x but 10 in y"):
        calc.influence_factors(x, y)
    with pytest.raises(UnalignedChunksError, match="x_test"):
        calc.influences(x, y)
    with pytest.raises(UnalignedChunksError):
        calc.influences(*problem.dask_test(), x, y)
    with pytest.raises(UnalignedChunksError):
        calc.influences_from_factors(calc.influence_factors(*problem.dask_test()), x, y)
    n = x.shape[0]  # the same rows, y with an extra empty chunk: a different number of chunks
    y_extra = da.from_array(problem.dask_train()[1].compute(), chunks=(x.chunks[0] + (0,),))
    assert y_extra.shape[0] == n and len(y_extra.chunks[0]) == len(x.chunks[0]) + 1
    with pytest.raises(UnalignedChunksError, match=rf"{len(x.chunks[0])} chunks in x but"):
        calc.influence_factors(x, y_extra)


def test_chunking_beyond_the_first_dimension_is_refused(problem):
    calc = _sync_calculator(problem.model)
    x, y = problem.dask_train()
    x = x.rechunk({1: 1})
    with pytest.raises(InvalidDimensionChunksError, match=r"dimension 1 into \(1, 1\)"):
        calc.influence_factors(x, y)
    with pytest.raises(InvalidDimensionChunksError):
        calc.influences(*problem.dask_test(), x, y)
    factors = calc.influence_factors(*problem.dask_test()).rechunk({1: 10})
    with pytest.raises(InvalidDimensionChunksError, match="z_test_factors"):
        calc.influences_from_factors(factors, *problem.dask_train())


def test_other_dask_input_errors(problem):
    calc = _sync_calculator(problem.model)
    x, y = problem.dask_train()
    with pytest.raises(InfluenceInputError, match="y is missing"):
        calc.influences(*problem.dask_test(), x)
    with pytest.raises(InfluenceInputError, match="dask.array.Array"):
        calc.influence_factors(problem.x, problem.y)
    with pytest.raises(ShapeMismatchError, match="37 samples but y has 36"):
        calc.influence_factors(x, y[:-1])
    with pytest.raises(ShapeMismatchError, match="z_test_factors"):
        calc.influences_from_factors(da.ones((3, 5), chunks=(2, -1)), x, y)
    keep = y >= 0  # a boolean mask leaves chunk sizes unknown (NaN)
    with pytest.raises(InfluenceInputError, match="compute_chunk_sizes"):
        calc.influence_factors(x[keep], y[keep])


# -- the reference's examples, as written (only the import paths changed) ------------------------

try:  # the examples use CG; fall back to the exact method while CG is not there
    from prefect_influence.torch import CgInfluence as _Cg  # noqa: F401

    _METHOD = "CgInfluence"
except ImportError:  # pragma: no cover
    _METHOD = "DirectInfluence"

DASK_EXAMPLE = f"""
import torch
from torch.utils.data import Dataset, DataLoader
from prefect_influence import DaskInfluenceCalculator
from prefect_influence.torch import {_METHOD} as CgInfluence
from prefect_influence.torch.util import (
    torch_dataset_to_dask_array,
    TorchNumpyConverter,
)
from distributed import Client

# Possible some out of memory large Dataset
train_data_set: Dataset = LargeDataSet(...)
test_data_set: Dataset = LargeDataSet(...)

train_dataloader = DataLoader(train_data_set)
infl_model = CgInfluence(model, loss, hessian_regularization=0.01)
infl_model = if_model.fit(train_dataloader)

# wrap your input data into dask arrays
chunk_size = 10
da_x, da_y = torch_dataset_to_dask_array(train_data_set, chunk_size=chunk_size)
da_x_test, da_y_test = torch_dataset_to_dask_array(test_data_set,
                                                   chunk_size=chunk_size)

# use only one thread for scheduling, due to non-thread safety of some torch
# operations
client = Client(n_workers=4, threads_per_worker=1)

infl_calc = DaskInfluenceCalculator(infl_model,
                                    TorchNumpyConverter(device=torch.device("cpu")),
                                    client)
da_influences = infl_calc.influences(da_x_test, da_y_test, da_x, da_y)
# da_influences is a dask.array.Array

# trigger computation and write chunks to disk in parallel
da_influences.to_zarr("path/or/url")
"""

SEQUENTIAL_EXAMPLE = f"""
from prefect_influence import SequentialInfluenceCalculator
from prefect_influence.torch.util import (
NestedTorchCatAggregator,
TorchNumpyConverter,
)
from prefect_influence.torch import {_METHOD} as CgInfluence

batch_size = 10
train_dataloader = DataLoader(..., batch_size=batch_size)
test_dataloader = DataLoader(..., batch_size=batch_size)

infl_model = CgInfluence(model, loss, hessian_regularization=0.01)
infl_model = infl_model.fit(train_dataloader)

infl_calc = SequentialInfluenceCalculator(if_model)

# this does not trigger the computation
lazy_influences = infl_calc.influences(test_dataloader, train_dataloader)

# trigger computation and pull the result into main memory, result is the full
# tensor for all combinations of the two loaders
influences = lazy_influences.compute(aggregator=NestedTorchCatAggregator())
# or
# trigger computation and write results chunk-wise to disk using zarr in a
# sequential manner
lazy_influences.to_zarr("local_path/or/url", TorchNumpyConverter())
"""


class _ExampleLocals(dict):
    """The examples' namespace. They say ``if_model`` where they mean ``infl_model`` (a typo in
    the reference); that one name resolves to ``infl_model`` instead of failing."""

    def __missing__(self, key):
        if key == "if_model":
            return self["infl_model"]
        raise KeyError(key)


def _example_data(kind: str = "convex"):
    """The examples' model and data, float32 like the example's casts: a linear softmax
    classifier (convex), or a tanh MLP stopped short of a minimum, whose ``H + 0.01·I`` is
    indefinite with an eigenvalue near zero (see ``nonconvex_classifier``)."""
    if kind == "nonconvex":
        model, x, y, xt, yt = nonconvex_classifier(torch.float32)
        return model, (x[:60], y[:60]), (xt[:10], yt[:10])
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Linear(4, 3).eval()
    # few samples: the example's DataLoader has batch size 1, so each CG iteration loops over
    # every training sample
    train = (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    test = (torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen))
    return model, train, test


def _assert_example_result(kind, got, model, train, test, fitted):
    """Convex: the stored blocks equal the same fitted model's in-memory result. Non-convex:
    CG's float32 solves stall short of its tolerance (and say so), chunk by chunk, so the
    result is judged against the exact influences (float64 Direct) instead."""
    if kind == "convex":
        _assert_close_f32(got, fitted.influences(*test, *train).numpy())
        return
    model64 = copy.deepcopy(model).double()
    exact = DirectInfluence(model64, F.cross_entropy, 0.01).fit([(train[0].double(), train[1])])
    truth = exact.influences(test[0].double(), test[1], train[0].double(), train[1]).numpy()
    assert np.corrcoef(np.asarray(got).ravel(), truth.ravel())[0, 1] >= 0.999


# float32 throughout (and CG's tolerance): compare to the same fitted model's in-memory result
# relative to the largest value; 1e-4 is ~1000 float32 ulps, far below any indexing error.
def _assert_close_f32(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _client_on_shared_cluster(cluster, started_with):
    """A ``distributed.Client`` stand-in for the example's ``Client(n_workers=4, ...)``.

    It connects to the module's running cluster instead of starting four more worker processes
    (about 30 s on two cores), records the arguments, and moves the workers into the current
    directory as freshly started local workers would be (the example writes to a relative
    path). Set PREFECT_INFLUENCE_EXAMPLE_OWN_CLUSTER=1 to run the example with its own cluster.
    """

    class SharedClusterClient(Client):
        def __init__(self, **kwargs):
            started_with.update(kwargs)
            super().__init__(cluster)
            self.run(os.chdir, os.getcwd())

    return SharedClusterClient


@pytest.mark.parametrize("kind", ["convex", "nonconvex"])
def test_reference_dask_example_runs_as_written(tmp_path, monkeypatch, cluster, kind):
    monkeypatch.chdir(tmp_path)
    started_with: dict = {}
    if not os.environ.get("PREFECT_INFLUENCE_EXAMPLE_OWN_CLUSTER"):
        monkeypatch.setattr("distributed.Client", _client_on_shared_cluster(cluster, started_with))
    model, train, test = _example_data(kind)
    draws = iter([train, test])

    def LargeDataSet(*_):  # the example's placeholder: the train set first, then the test set
        return TensorDataset(*next(draws))

    names = _ExampleLocals(model=model, loss=F.cross_entropy, LargeDataSet=LargeDataSet)
    try:
        exec(DASK_EXAMPLE, {"__name__": "dask_example"}, names)
        if started_with:
            assert started_with == {"n_workers": 4, "threads_per_worker": 1}
        assert names["da_y"].dtype == np.int64  # integer labels keep their dtype
        n_train = len(train[0])
        assert names["da_x"].dtype == np.float32
        assert names["da_x"].chunks[0] == (10,) * (n_train // 10) + (
            (n_train % 10,) if n_train % 10 else ()
        )
        stored = zarr.open_array("path/or/url", mode="r")[:]
        assert stored.shape == (10, n_train)
        _assert_example_result(kind, stored, model, train, test, names["infl_model"])
    finally:
        if "client" in names:
            if not started_with:
                names["client"].cluster.close()
            names["client"].close()


@pytest.mark.parametrize("kind", ["convex", "nonconvex"])
def test_reference_sequential_example_runs_as_written(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    model, train, test = _example_data(kind)
    datasets = iter([TensorDataset(*train), TensorDataset(*test)])

    def DataLoader(dataset, **kwargs):  # fills the example's `...`: train set, then test set
        if dataset is Ellipsis:
            dataset = next(datasets)
        return torch.utils.data.DataLoader(dataset, **kwargs)

    names = _ExampleLocals(model=model, loss=F.cross_entropy, DataLoader=DataLoader)
    exec(SEQUENTIAL_EXAMPLE, {"__name__": "sequential_example"}, names)
    for got in (names["influences"], zarr.open_array("local_path/or/url", mode="r")[:]):
        _assert_example_result(kind, got, model, train, test, names["infl_model"])
