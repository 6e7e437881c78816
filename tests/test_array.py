"""Lazy chunk sequences: laziness, in-memory aggregation and chunk-wise zarr writing."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from prefect_influence import (
    ArrayExistsError,
    EmptyDataError,
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedListAggregator,
    NumpyConverter,
    ShapeMismatchError,
)

ROWS = (3, 1, 4)  # uneven chunk sizes along the first axis
COLS = (2, 5, 1, 3)  # uneven block widths along the second axis


class Identity(NumpyConverter):
    def to_numpy(self, x):
        return np.asarray(x)

    def from_numpy(self, x):
        return x


class Factory:
    """A generator factory that counts how often it was called (to prove laziness)."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self):
        self.calls += 1
        return self.make()


def full_matrix(trailing=()):
    """The matrix the nested sequence below stands for: value = 1000·row + column (+ k/10)."""
    r, c = np.meshgrid(np.arange(sum(ROWS)), np.arange(sum(COLS)), indexing="ij")
    base = 1000.0 * r + c
    if not trailing:
        return base
    extra = np.arange(np.prod(trailing)).reshape(trailing) / 10
    return base.reshape(*base.shape, *(1,) * len(trailing)) + extra


def nested_sequence(trailing=()):
    full = full_matrix(trailing)
    r_edges, c_edges = np.cumsum((0, *ROWS)), np.cumsum((0, *COLS))

    def rows():
        for r0, r1 in zip(r_edges[:-1], r_edges[1:]):
            yield (full[r0:r1, c0:c1] for c0, c1 in zip(c_edges[:-1], c_edges[1:]))

    return NestedLazyChunkSequence(Factory(rows), len_outer_generator=len(ROWS))


def flat_sequence():
    full = np.arange(sum(ROWS) * 2, dtype=np.float32).reshape(-1, 2)
    edges = np.cumsum((0, *ROWS))
    return LazyChunkSequence(
        Factory(lambda: (full[a:b] for a, b in zip(edges[:-1], edges[1:])))
    ), full


def memory_url():
    return f"memory://test-array/{uuid.uuid4().hex}.zarr"


def file_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# -- laziness and aggregation --------------------------------------------------------------------


def test_nothing_runs_until_compute():
    seq, full = flat_sequence()
    assert seq.generator_factory.calls == 0
    chunks = seq.compute()
    assert seq.generator_factory.calls == 1
    assert [len(c) for c in chunks] == list(ROWS)
    np.testing.assert_array_equal(np.concatenate(chunks), full)
    assert len(seq.compute(aggregator=ListAggregator())) == len(ROWS)  # recomputable


def test_nested_compute_gives_rows_of_blocks():
    seq = nested_sequence()
    assert seq.generator_factory.calls == 0
    rows = seq.compute()
    assert [[b.shape for b in row] for row in rows] == [[(r, c) for c in COLS] for r in ROWS]
    np.testing.assert_array_equal(np.block(rows), full_matrix())
    assert seq.compute(NestedListAggregator()) is not rows


# -- zarr ----------------------------------------------------------------------------------------


def test_flat_to_zarr_memory_url_round_trip():
    seq, full = flat_sequence()
    url = memory_url()
    stored = seq.to_zarr(url, Identity(), return_stored=True)
    assert stored.shape == full.shape and stored.dtype == np.float32
    assert stored.metadata.zarr_format == 3
    np.testing.assert_array_equal(zarr.open_array(url, mode="r")[:], full)


@pytest.mark.parametrize("trailing", [(), (2, 3)])
def test_nested_to_zarr_memory_url_round_trip(trailing):
    url = memory_url()
    assert nested_sequence(trailing).to_zarr(url, Identity()) is None  # return_stored=False
    np.testing.assert_array_equal(zarr.open_array(url, mode="r")[:], full_matrix(trailing))


@pytest.mark.parametrize("as_url", [False, True])
def test_nested_to_zarr_local_directory(tmp_path, as_url):
    target = tmp_path / "influences.zarr"
    location = target.as_uri() if as_url else str(target)
    stored = nested_sequence().to_zarr(location, Identity(), return_stored=True)
    np.testing.assert_array_equal(stored[:], full_matrix())
    assert (target / "zarr.json").is_file()
    np.testing.assert_array_equal(zarr.open_array(str(target), mode="r")[:], full_matrix())


@pytest.mark.parametrize("as_url", [False, True])
def test_local_target_with_storage_options_goes_through_fsspec(tmp_path, as_url):
    target = tmp_path / "deep" / "er" / "x.zarr"
    seq, full = flat_sequence()
    location = target.as_uri() if as_url else target
    seq.to_zarr(location, Identity(), storage_options={"use_listings_cache": False})
    np.testing.assert_array_equal(zarr.open_array(str(target), mode="r")[:], full)


def test_existing_array_is_refused_and_left_byte_identical(tmp_path):
    target = tmp_path / "influences.zarr"
    nested_sequence().to_zarr(target, Identity())
    before = file_bytes(target)
    assert before
    again = nested_sequence(trailing=(2,))  # different content and shape
    with pytest.raises(ArrayExistsError, match="overwrite=True"):
        again.to_zarr(target, Identity())
    assert again.generator_factory.calls == 0  # refused before computing anything
    assert file_bytes(target) == before
    with pytest.raises(FileExistsError):  # ArrayExistsError is also a FileExistsError
        flat_sequence()[0].to_zarr(target, Identity())
    assert file_bytes(target) == before


def test_existing_memory_array_is_refused_then_overwritten():
    url = memory_url()
    nested_sequence().to_zarr(url, Identity())
    fs, root = fsspec.core.url_to_fs(url)
    before = {p: fs.cat_file(p) for p in fs.find(root)}
    with pytest.raises(ArrayExistsError):
        nested_sequence((2,)).to_zarr(url, Identity())
    assert {p: fs.cat_file(p) for p in fs.find(root)} == before
    stored = nested_sequence((2,)).to_zarr(url, Identity(), return_stored=True, overwrite=True)
    np.testing.assert_array_equal(stored[:], full_matrix((2,)))


def test_non_zarr_content_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ArrayExistsError):
        flat_sequence()[0].to_zarr(tmp_path, Identity())
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_rows_of_different_widths_are_refused():
    def rows():
        yield iter([np.zeros((2, 3))])
        yield iter([np.zeros((1, 2))])

    with pytest.raises(ShapeMismatchError, match="covers 2 columns, row 0 covered 3"):
        NestedLazyChunkSequence(rows).to_zarr(memory_url(), Identity())


def test_blocks_of_different_heights_in_a_row_are_refused():
    def rows():
        yield iter([np.zeros((2, 3)), np.zeros((1, 3))])

    with pytest.raises(ShapeMismatchError, match="block at column 3 has 1 rows"):
        NestedLazyChunkSequence(rows).to_zarr(memory_url(), Identity())


def test_empty_sequence_writes_nothing():
    url = memory_url()
    with pytest.raises(EmptyDataError, match="no chunks"):
        LazyChunkSequence(lambda: iter([])).to_zarr(url, Identity())
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(root)


def test_s3_url_with_storage_options():
    """An s3:// URL through a local moto S3 server; storage_options reach s3fs."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
        }
        boto3 = pytest.importorskip("boto3")
        boto3.client(
            "s3",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            **options["client_kwargs"],
        ).create_bucket(Bucket="influence-bucket")
        url = "s3://influence-bucket/run/influences.zarr"
        nested_sequence().to_zarr(url, Identity(), storage_options=options)
        stored = zarr.open_array(url, mode="r", storage_options=options)
        np.testing.assert_array_equal(stored[:], full_matrix())
        with pytest.raises(ArrayExistsError):
            nested_sequence().to_zarr(url, Identity(), storage_options=options)
    finally:
        server.stop()
