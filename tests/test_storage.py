"""The storage layout: completion records, checksums, lease — on local and memory filesystems."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest

from prefect_influence.errors import LeaseHeldError, StorageError
from prefect_influence.storage import Grid, InfluenceStore, Manifest, checksum

GRID = Grid(
    n_test=5,
    n_train=7,
    test_chunk=2,
    train_chunk=3,
    n_parameters=4,
    x_shape=(2,),
    mode="up",
    dtype="float32",
)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    url = (
        str(tmp_path / "out")
        if request.param == "local"
        else f"memory://storage-test-{os.getpid()}-{time.time_ns()}"
    )
    s = InfluenceStore(url)
    s.write_manifest(Manifest(fingerprint={}, grid=GRID))
    s.create_arrays(GRID)
    yield s
    s.clear()


def test_grid_ranges_cover_uneven_sizes():
    assert GRID.test_ranges == [(0, 2), (2, 4), (4, 5)]
    assert GRID.train_ranges == [(0, 3), (3, 6), (6, 7)]
    assert GRID.shape == (3, 3) and GRID.n_blocks == 9
    assert Grid.from_json(GRID.to_json()) == GRID


def test_chunk_round_trip_and_record(store):
    values = np.arange(3, dtype=np.float32).reshape(1, 3)
    assert not store.chunk_done("influences", GRID, (2, 0))
    store.write_chunk("influences", GRID, (2, 0), values)
    assert store.chunk_done("influences", GRID, (2, 0))
    np.testing.assert_array_equal(store.read_chunk("influences", GRID, (2, 0)), values)
    assert store.recorded("influences") == {(2, 0)}
    # rewriting is idempotent
    store.write_chunk("influences", GRID, (2, 0), values)
    assert store.chunk_done("influences", GRID, (2, 0))


@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_chunks_written_directly_are_what_zarr_itself_writes(tmp_path, mode):
    # result chunks bypass zarr's codec pipeline: every chunk file (edge chunks padded with the
    # fill value included) must be byte-identical to zarr's, and zarr must read them back
    import zarr

    grid = Grid(**{**GRID.to_json(), "x_shape": (2,), "mode": mode})
    ours = InfluenceStore(str(tmp_path / "ours"))
    ours.write_manifest(Manifest(fingerprint={}, grid=grid))
    ours.create_arrays(grid)
    theirs = zarr.open_group(str(tmp_path / "zarr"), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    for name in ("factors", "influences", "self_influence"):
        src = ours.group[name]
        twin = theirs.create_array(
            name,
            shape=src.shape,
            chunks=src.chunks,
            dtype=src.dtype,
            fill_value=np.nan,
            compressors=None,
            filters=src.filters,  # factors: stored column by column
        )
        full = rng.normal(size=src.shape).astype(np.float32)
        indices = (
            [(i,) for i in range(grid.shape[0])]
            if name == "factors"
            else [(j,) for j in range(grid.shape[1])]
            if name == "self_influence"
            else [(i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])]
        )
        for index in indices:
            slices = ours._chunk_slices(name, grid, index)
            ours.write_chunk(name, grid, index, full[slices])
            twin[slices] = full[slices]
            np.testing.assert_array_equal(ours.read_chunk(name, grid, index), full[slices])
            assert ours.chunk_done(name, grid, index)
        np.testing.assert_array_equal(
            np.asarray(zarr.open_array(str(tmp_path / "ours" / name))[...]), full
        )
        files = sorted(
            p.relative_to(tmp_path / "zarr" / name)
            for p in (tmp_path / "zarr" / name / "c").rglob("*")
            if p.is_file()
        )
        assert len(files) == len(indices)
        for rel in files:
            assert (tmp_path / "ours" / name / rel).read_bytes() == (
                tmp_path / "zarr" / name / rel
            ).read_bytes(), rel


def test_an_unwritten_chunk_reads_as_the_fill_value(store):
    values = store.read_chunk("influences", GRID, (2, 2))  # the 1 × 1 edge chunk
    assert values.shape == (1, 1) and np.isnan(values).all()
    assert store.read_chunk("self_influence", GRID, (0,)).shape == (3,)


def test_a_torn_chunk_file_is_not_done(store):
    store.write_chunk("influences", GRID, (0, 0), np.ones((2, 3), dtype=np.float32))
    path = store._plain_chunks("influences").path((0, 0))
    store.fs.pipe_file(path, store.fs.cat_file(path)[:10])
    assert not store.chunk_done("influences", GRID, (0, 0))


def test_a_chunk_changed_behind_the_record_is_not_done(store):
    store.write_chunk("factors", GRID, (0,), np.ones((2, 4), dtype=np.float32))
    store.group["factors"][0:2] = np.zeros((2, 4), dtype=np.float32)  # silent corruption
    assert not store.chunk_done("factors", GRID, (0,))
    assert store.status(verify=True)["factors"]["corrupt"] == [[0]]


def test_fitted_state_round_trip_and_corruption(store):
    import torch

    state = {"eigenvalues": torch.arange(3.0), "n_parameters": torch.tensor(4)}
    store.write_fitted_state(state)
    back = store.read_fitted_state()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    store.group["fitted/eigenvalues"][...] = np.zeros(3, dtype=np.float32)
    assert store.read_fitted_state() is None


def test_checksum_depends_on_shape_dtype_and_bytes():
    a = np.zeros((2, 3), dtype=np.float32)
    assert checksum(a) != checksum(a.reshape(3, 2))
    assert checksum(a) != checksum(a.astype(np.float64))
    assert checksum(a) == checksum(a.copy())


def test_lease_refuses_a_second_live_run_and_allows_forced_takeover(store):
    token = store.lease.acquire(ttl_seconds=60)
    with pytest.raises(LeaseHeldError, match="in use by another run"):
        store.lease.acquire(ttl_seconds=60)
    other = store.lease.acquire(ttl_seconds=60, force=True)
    with pytest.raises(LeaseHeldError, match="taken over"):
        store.lease.renew(token)
    store.lease.release(token)  # not ours any more: left alone
    with pytest.raises(LeaseHeldError):
        store.lease.acquire()
    store.lease.release(other)
    store.lease.release(store.lease.acquire())


def test_expired_lease_is_taken_over(store):
    store.lease.acquire(ttl_seconds=0.01)
    time.sleep(0.05)
    store.lease.acquire(ttl_seconds=60)


def _hold(url):
    InfluenceStore(url).lease.acquire(ttl_seconds=3600)


def test_lease_of_a_dead_process_on_this_host_is_stale(tmp_path):
    url = str(tmp_path / "out")
    proc = multiprocessing.get_context("spawn").Process(target=_hold, args=(url,))
    proc.start()
    proc.join()
    store = InfluenceStore(url)
    store.lease.release(store.lease.acquire(ttl_seconds=60))  # the holder exited: no error


def test_hold_lease_renews_and_releases(store):
    with store.lease.hold(ttl_seconds=0.4) as token:
        time.sleep(0.6)  # longer than the TTL: only renewals keep it
        assert store._read_json("lease.json")["owner"] == token
        with pytest.raises(LeaseHeldError):
            store.lease.acquire()
    assert store._read_json("lease.json") is None


def test_clear_keeps_the_lease(store):
    token = store.lease.acquire()
    store.clear()
    assert store.is_empty()
    assert store._read_json("lease.json")["owner"] == token


def test_the_same_owner_takes_its_lease_back(store):
    """A retry of the same flow run (same owner id) is not locked out by its crashed attempt."""
    store.lease.acquire(ttl_seconds=60, owner="flow-run-1")
    assert store.lease.acquire(ttl_seconds=60, owner="flow-run-1") == "flow-run-1"
    with pytest.raises(LeaseHeldError):
        store.lease.acquire(ttl_seconds=60, owner="flow-run-2")
    store.lease.release("flow-run-1")


def test_a_lease_on_an_unwritable_output_is_a_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="Cannot take the lease"):
        InfluenceStore(str(blocker / "out")).lease.acquire()


def test_two_runs_starting_at_once_on_a_free_output_get_one_lease(tmp_path):
    """Run B's writes are slow (as on S3): with read, write, pause and read back, both runs
    believed they held the lease. The lease of a free output is created if absent (atomic on
    local disks and S3), so exactly one run gets it."""
    import threading

    url = str(tmp_path / "out")
    a, b = InfluenceStore(url), InfluenceStore(url)

    class SlowWrites:
        def __init__(self, fs, delay):
            self._fs, self._delay = fs, delay

        def __getattr__(self, name):
            return getattr(self._fs, name)

        def pipe_file(self, *args, **kwargs):
            time.sleep(self._delay)
            return self._fs.pipe_file(*args, **kwargs)

    # both read "no lease" before either write lands; B's lands after A has read its own back
    a.fs, b.fs = SlowWrites(a.fs, 0.02), SlowWrites(a.fs, 0.1)
    results: dict[str, str] = {}

    def take(name, store):
        try:
            results[name] = store.lease.acquire(ttl_seconds=60)
        except LeaseHeldError:
            results[name] = "refused"

    threads = [threading.Thread(target=take, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v == "refused" for v in results.values()) == [False, True]
    winner = next(v for v in results.values() if v != "refused")
    assert a._read_json("lease.json")["owner"] == winner == results["a"]


def test_a_manifest_round_trips_and_names_what_differs(store):
    """The manifest read back equals the one written (its id too); ``differences`` names the
    fingerprint entries that changed; a file that is not a manifest is refused by name."""
    fingerprint = {"model": "m|sha256:1", "train": "sha256:2", "method": {"name": "cg"}}
    manifest = Manifest(fingerprint=fingerprint, grid=GRID, config={"top_k": 3}, created="now")
    store.write_manifest(manifest)
    again = store.read_manifest()
    assert again == manifest and again.id == manifest.id
    other = {**fingerprint, "train": "sha256:9", "mode": "up"}
    assert manifest.differences(other) == ["mode", "train"]
    assert manifest.differences(dict(fingerprint)) == []
    assert Manifest(fingerprint=fingerprint, grid=GRID, created="later").id != manifest.id
    store.fs.pipe_file(store._path("manifest.json"), b'{"fingerprint": {}}')
    with pytest.raises(StorageError, match="not a prefect-influence manifest"):
        store.read_manifest()
