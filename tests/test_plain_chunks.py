"""Whole uncompressed zarr v3 chunks written and read as files give exactly what zarr itself
writes and reads (edge chunks padded with the fill value), on local disk and memory://."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import zarr

from prefect_influence.errors import StorageError
from prefect_influence.locations import open_group
from prefect_influence.storage.plain_chunks import PlainChunks


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path):
    url = str(tmp_path / "g") if request.param == "local" else f"memory://plain-{tmp_path.name}/g"
    fs, root = fsspec.core.url_to_fs(url)
    return url, fs, root


def _array(url, name="a", compressors=None, dtype="float32"):
    group = open_group(url)
    return group.create_array(
        name, shape=(5, 7), chunks=(2, 3), dtype=dtype, fill_value=np.nan, compressors=compressors
    )


def test_files_written_as_plain_chunks_read_back_through_zarr(location):
    url, fs, root = location
    array = _array(url)
    plain = PlainChunks.of(array, fs, f"{root}/a")
    assert plain is not None and plain.chunk_shape == (2, 3)
    values = np.arange(35, dtype=np.float32).reshape(5, 7)
    for i, r in enumerate(range(0, 5, 2)):
        for j, c in enumerate(range(0, 7, 3)):
            plain.write((i, j), values[r : r + 2, c : c + 3])  # edge chunks are smaller
    np.testing.assert_array_equal(zarr.open_array(array.store_path, mode="r")[...], values)
    got = plain.read((2, 2), (1, 1))  # the corner chunk, cut to its true size
    np.testing.assert_array_equal(got, values[4:, 6:])


def test_chunks_written_by_zarr_read_back_as_plain_chunks(location):
    url, fs, root = location
    array = _array(url)
    values = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    array[...] = values
    plain = PlainChunks.of(array, fs, f"{root}/a")
    np.testing.assert_array_equal(plain.read((1, 1), (2, 3)), values[2:4, 3:6])
    np.testing.assert_array_equal(plain.read((2, 0), (1, 3)), values[4:, :3])


def test_an_unwritten_chunk_reads_as_the_fill_value_and_a_torn_one_is_refused(location):
    url, fs, root = location
    plain = PlainChunks.of(_array(url), fs, f"{root}/a")
    assert np.isnan(plain.read((0, 0), (2, 3))).all()
    plain.write((0, 1), np.ones((2, 3), dtype=np.float32))
    path = plain.path((0, 1))
    fs.pipe_file(path, fs.cat_file(path)[:-4])
    with pytest.raises(StorageError, match="torn write"):
        plain.read((0, 1), (2, 3))


def test_compressed_arrays_have_no_plain_layout(location):
    url, fs, root = location
    compressed = _array(url, "c", compressors=zarr.codecs.ZstdCodec())
    assert PlainChunks.of(compressed, fs, f"{root}/c") is None


def _rows_array(url, name: str, transposed: bool):
    """A 5 × 7 array in chunks of whole rows (3 × 7), stored row-major or column by column."""
    return open_group(url).create_array(
        name,
        shape=(5, 7),
        chunks=(3, 7),
        dtype="float32",
        fill_value=np.nan,
        compressors=None,
        filters=[zarr.codecs.TransposeCodec(order=(1, 0))] if transposed else [],
    )


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "columns"])
def test_parts_of_a_chunk_read_only_their_rows_and_columns(location, transposed):
    url, fs, root = location
    array = _rows_array(url, "f", transposed)
    values = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    array[...] = values
    plain = PlainChunks.of(array, fs, f"{root}/f")
    assert plain is not None and plain.transposed == transposed
    np.testing.assert_array_equal(plain.read((1,), (2, 7)), values[3:])
    for rows, cols in [
        (slice(0, 3), slice(0, 7)),
        (slice(1, 3), slice(2, 5)),
        (slice(2, 3), slice(6, 7)),
    ]:
        np.testing.assert_array_equal(plain.read_part((0,), rows, cols), values[rows, cols])
    # the edge chunk (rows 3-4 of the array), and a part of no rows
    np.testing.assert_array_equal(plain.read_part((1,), slice(0, 2), slice(1, 4)), values[3:5, 1:4])
    assert plain.read_part((1,), slice(1, 1), slice(0, 7)).shape == (0, 7)
    # never written: the fill value; cut short: refused, naming the file
    fs.rm(plain.path((1,)))
    assert np.isnan(plain.read_part((1,), slice(0, 2), slice(0, 3))).all()
    fs.pipe_file(plain.path((0,)), b"\0" * 20)
    with pytest.raises(StorageError, match="torn write"):
        plain.read_part((0,), slice(1, 2), slice(0, 3))


def test_transposed_chunks_written_as_files_read_back_through_zarr(location, monkeypatch):
    """A chunk stored column by column (zarr's transpose codec), written in slabs of columns
    (two at a time here) and padded when it is an edge chunk: zarr reads what was written."""
    import prefect_influence.storage.plain_chunks as plain_chunks

    monkeypatch.setattr(plain_chunks, "SLAB_BYTES", 2 * 3 * 4)
    url, fs, root = location
    array = _rows_array(url, "t", transposed=True)
    plain = PlainChunks.of(array, fs, f"{root}/t")
    values = np.arange(35, dtype=np.float32).reshape(5, 7)
    plain.write((0,), values[:3])
    plain.write((1,), values[3:])  # the edge chunk: two of three rows
    np.testing.assert_array_equal(zarr.open_array(array.store_path, mode="r")[...], values)
    assert len(fs.cat_file(plain.path((1,)))) == 3 * 7 * 4


def test_a_checksum_follows_the_stored_order_whatever_the_memory_layout():
    from prefect_influence.storage.store import checksum

    values = np.random.default_rng(2).standard_normal((9, 5)).astype(np.float32)
    columns = np.asfortranarray(values)  # as a transposed chunk is read: its columns in a row
    assert not columns.flags.c_contiguous
    assert checksum(columns) == checksum(values)
    assert checksum(columns, by_columns=True) == checksum(values, by_columns=True)
    assert checksum(values, by_columns=True) != checksum(values)
    changed = columns.copy(order="F")
    changed[8, 4] += 1
    assert checksum(changed, by_columns=True) != checksum(values, by_columns=True)
