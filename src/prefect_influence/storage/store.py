"""The on-disk layout of an influence job, owned by this module alone.

Under the output URL (any fsspec URL: local directory, ``file://``, ``memory://``, ``s3://``)::

    manifest.json                     schema version, package version, fingerprint, grid
    fitted/<key>                      zarr arrays: the influence model's fitted state (no pickle)
    factors                           zarr array n_test × p, chunks (test_chunk, p)
    influences                        zarr array n_test × n_train [× input shape],
                                      chunks (test_chunk, train_chunk [, input shape])
    self_influence                    zarr array n_train, chunks (train_chunk,)
    train_features                    optional zarr array n_train × width, chunks
                                      (train_chunk, width): per-sample gradients (width p) or
                                      their projection; its attributes say which
    summary/top_helpful, ...          zarr arrays n_test × k (indices and values)
    summary_parts/<j>/top_helpful, …  the same over train chunk j only (written by its column)
    records/<array>/<i>[.<j>].json    completion record of one chunk: sha256, shape, dtype,
                                      manifest id (under the key "plan")
    records/fitted.json, records/summary.json, records/summary_parts/<j>.json
    lease.json                        which run is writing here, until when (see below)
    runs/<flow run id>.json           the run log: each attempt of a flow run on this output,
                                      when it started and ended, and how

A chunk counts as done only when its record exists **and** the chunk read back hashes to the
recorded sha256: the record is written after the data, so a crash between the two, a truncated
or a bit-flipped chunk all read as "not done" and are recomputed. Every write covers exactly one
chunk, so rewriting it is idempotent. Records also name the manifest they were written under
(the :attr:`~.manifest.Manifest.id` of the manifest they were written under): a late write by
a run whose output was since replaced (``overwrite``, a lease takeover) never counts for the run
that replaced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import fsspec
import numpy as np

from ..errors import StorageError
from ..locations import open_group, output_location
from .jsonfiles import read_json, remove, write_json
from .lease import LEASE, Lease
from .manifest import Grid, Manifest
from .plain_chunks import PlainChunks

__all__ = [
    "InfluenceStore",
    "checksum",
    "MANIFEST",
    "FACTORS",
    "INFLUENCES",
    "SELF_INFLUENCE",
    "TRAIN_FEATURES",
    "SUMMARY_ARRAYS",
]

MANIFEST = "manifest.json"
FACTORS, INFLUENCES, SELF_INFLUENCE = "factors", "influences", "self_influence"
TRAIN_FEATURES = "train_features"
RUNS = "runs"
#: the summary's arrays: per test point, the top-k training indices and their values
SUMMARY_ARRAYS = ("top_helpful", "top_helpful_values", "top_harmful", "top_harmful_values")


def checksum(values: np.ndarray, by_columns: bool = False) -> str:
    """SHA-256 of the array's shape, dtype and bytes in C order, or (``by_columns``, a 2-d
    chunk stored column by column) of its transpose's: the order the chunk's file holds them,
    so that verifying a stored chunk hashes its bytes as they were read."""
    h = hashlib.sha256(f"{values.shape}|{values.dtype.str}|".encode())
    ordered = values.T if by_columns else values
    if ordered.flags.c_contiguous or ordered.ndim == 0:
        h.update(memoryview(np.ascontiguousarray(ordered)).cast("B"))  # no copy of the chunk
        return h.hexdigest()
    # another memory layout: the bytes in slabs of rows of at most 16 MiB, never one copy
    step = max(1, (16 * 2**20) // max(1, ordered[0].nbytes))
    for s in range(0, ordered.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(ordered[s : s + step])).cast("B"))
    return h.hexdigest()


class InfluenceStore:
    """Reads and writes one job's outputs under ``url`` (see the module docstring)."""

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        try:
            self.url = output_location(url)
        except ValueError as exc:
            raise StorageError(str(exc)) from None
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except Exception as exc:
            raise StorageError(f"Cannot open output location {self.url!r}: {exc}") from exc
        self._group = None
        self._plain: dict[str, Optional[PlainChunks]] = {}
        self._columns: dict[str, bool] = {}
        self._manifest_id: Optional[str] = None
        self._accepted: tuple[str, ...] = ()
        self._manifest_id_known = False

    @property
    def lease(self) -> Lease:
        """The output's lease, on this store's filesystem."""
        return Lease(self.fs, self._path(LEASE), self.url)

    # -- the manifest records are written under ----------------------------------------------------
    def bind(self, manifest: Manifest) -> None:
        """Write and accept records of ``manifest`` only (default: the manifest found when a
        record is first written or checked)."""
        self._manifest_id, self._accepted = manifest.id, manifest.accepted_ids
        self._manifest_id_known = True

    @property
    def manifest_id(self) -> Optional[str]:
        if not self._manifest_id_known:
            manifest = self.read_manifest()
            if manifest is None:
                self._manifest_id, self._accepted = None, ()
            else:
                self._manifest_id, self._accepted = manifest.id, manifest.accepted_ids
            self._manifest_id_known = True
        return self._manifest_id

    def _of_this_manifest(self, record: dict[str, Any]) -> bool:
        # records written before manifests were stamped on them have no id: accepted
        plan = record.get("plan")
        return plan is None or plan == self.manifest_id or plan in self._accepted

    def _stamped(self, record: dict[str, Any]) -> dict[str, Any]:
        return record if self.manifest_id is None else {**record, "plan": self.manifest_id}

    # -- paths and small files -------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_json(self, rel: str, data: dict, mode: str = "overwrite") -> None:
        write_json(self.fs, self._path(rel), data, mode)

    def _read_json(self, rel: str) -> Optional[dict]:
        return read_json(self.fs, self._path(rel))

    def _remove(self, rel: str) -> None:
        remove(self.fs, self._path(rel))

    def is_empty(self) -> bool:
        """Whether nothing but (possibly) a lease lies under the output URL."""
        self.fs.invalidate_cache(self.root)
        try:
            if not self.fs.exists(self.root):
                return True
            entries = [e.rstrip("/") for e in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return True
        return all(e == self._path(LEASE) for e in entries)

    def check_writable(self) -> None:
        """Write and delete a probe file, so an unwritable output fails before any work; a
        directory made for the probe is removed again (a check leaves nothing behind)."""
        probe = self._path(f".write-probe-{uuid.uuid4().hex}")
        try:
            made = not self.fs.exists(self.root)
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise StorageError(f"The output location {self.url!r} is not writable: {exc}") from exc
        if made:
            with contextlib.suppress(OSError):
                self.fs.rmdir(self.root)

    def clear(self) -> None:
        """Delete everything under the output URL except the lease (used for ``overwrite``)."""
        if self.fs.exists(self.root):
            lease = self._path(LEASE)
            for entry in self.fs.ls(self.root, detail=False):
                if entry.rstrip("/") != lease:
                    self.fs.rm(entry, recursive=True)
        self._group = None
        self._plain = {}
        self._columns = {}
        self._manifest_id_known = False

    # -- manifest --------------------------------------------------------------------------------
    def read_manifest(self) -> Optional[Manifest]:
        """The output's manifest; ``None`` if there is none (a malformed one raises)."""
        data = self._read_json(MANIFEST)
        return None if data is None else Manifest.from_json(data, f"{self.url}/{MANIFEST}")

    def write_manifest(self, manifest: Manifest) -> None:
        self._write_json(MANIFEST, manifest.to_json())
        self.bind(manifest)

    def planned_manifest(self) -> Manifest:
        """The manifest, which must exist (a job was planned here)."""
        manifest = self.read_manifest()
        if manifest is None:
            raise StorageError(f"{self.url!r} holds no prefect-influence manifest.")
        return manifest

    # -- zarr ------------------------------------------------------------------------------------
    @property
    def group(self):
        if self._group is None:
            self._group = open_group(self.url, self.storage_options)
        return self._group

    def create_arrays(self, grid: Grid) -> None:
        """Create the result arrays if missing (existing ones are kept: resume); arrays of
        fewer test rows with the same chunks grow to the grid's (appended test rows)."""
        dtype = np.dtype(grid.dtype)
        specs = {
            FACTORS: (
                (grid.n_test, grid.n_parameters),
                (grid.test_chunk, grid.n_parameters),
                dtype,
            ),
            INFLUENCES: (
                grid.influence_shape,
                (grid.test_chunk, grid.train_chunk, *grid.influence_shape[2:]),
                dtype,
            ),
            SELF_INFLUENCE: ((grid.n_train,), (grid.train_chunk,), dtype),
        }
        for name, (shape, chunks, dt) in specs.items():
            arr = self._array_or_none(name)
            if arr is not None:
                if _grows_along_rows(name, tuple(arr.shape), shape, arr.chunks, chunks):
                    arr.resize(shape)
                    self._plain.pop(name, None)
                    self._columns.pop(name, None)
                    continue
                if tuple(arr.shape) != tuple(shape) or tuple(arr.chunks) != tuple(chunks):
                    raise StorageError(
                        f"{self.url}/{name} has shape {arr.shape} and chunks {arr.chunks}, expected "
                        f"{shape} and {chunks}; use overwrite=True to start over."
                    )
                continue
            # float scores barely compress: a compressor would cost far more than it saves
            self.group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dt,
                fill_value=np.nan,
                compressors=None,
                filters=_layout(name),
            )

    def create_features_array(self, grid: Grid, description: dict[str, Any]) -> None:
        """The array of stored train features described by ``description`` (``kind``,
        ``width`` and what else determines them): kept if it is there with the same
        description, else made anew (features of another kind or width are dropped)."""
        arr = self._array_or_none(TRAIN_FEATURES)
        if arr is not None and self.features_description() == description:
            return
        if arr is not None or self.recorded(TRAIN_FEATURES):
            self._remove_array(TRAIN_FEATURES)
        width = int(description["width"])
        created = self.group.create_array(
            TRAIN_FEATURES,
            shape=(grid.n_train, width),
            chunks=(grid.train_chunk, width),
            dtype=np.dtype(grid.dtype),
            fill_value=np.nan,
            compressors=None,
        )
        created.attrs.update({"features": description})

    def features_description(self) -> Optional[dict[str, Any]]:
        """What the stored train features are (``kind``, ``width``...), ``None`` if none."""
        arr = self._array_or_none(TRAIN_FEATURES)
        return None if arr is None else dict(arr.attrs.get("features") or {}) or None

    def _remove_array(self, name: str) -> None:
        for path in (self._path(name), self._path("records", name)):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        self._group = None
        self._plain.pop(name, None)
        self._columns.pop(name, None)

    def _array_or_none(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            return None

    # -- chunks with completion records ----------------------------------------------------------
    def _record_path(self, name: str, index: tuple[int, ...]) -> str:
        return f"records/{name}/{'.'.join(map(str, index))}.json"

    def _chunk_slices(self, name: str, grid: Grid, index: tuple[int, ...]) -> tuple[slice, ...]:
        if name == FACTORS:
            (i,) = index
            return (slice(*grid.test_ranges[i]),)
        if name in (SELF_INFLUENCE, TRAIN_FEATURES):
            (j,) = index
            return (slice(*grid.train_ranges[j]),)
        i, j = index
        return (slice(*grid.test_ranges[i]), slice(*grid.train_ranges[j]))

    def write_chunk(
        self, name: str, grid: Grid, index: tuple[int, ...], values: np.ndarray
    ) -> None:
        """Write one chunk, then its completion record (in that order)."""
        values = np.asarray(values, dtype=np.dtype(grid.dtype))
        self._remove(self._record_path(name, index))
        plain = self._plain_chunks(name)
        # hashing and writing both release the GIL: the checksum runs beside the write
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-influence-hash") as pool:
            digest = pool.submit(checksum, values, self._by_columns(name))
            if plain is None:
                self.group[name][self._chunk_slices(name, grid, index)] = values
            else:
                plain.write(index, values)
            sha256 = digest.result()
        self._write_json(
            self._record_path(name, index),
            self._stamped(
                {"sha256": sha256, "shape": list(values.shape), "dtype": values.dtype.str}
            ),
        )

    def read_chunk(self, name: str, grid: Grid, index: tuple[int, ...]) -> np.ndarray:
        """One chunk's values (possibly a read-only view of the bytes read)."""
        slices = self._chunk_slices(name, grid, index)
        plain = self._plain_chunks(name)
        if plain is not None:
            return plain.read(index, tuple(s.stop - s.start for s in slices))
        return np.asarray(self.group[name][slices])

    def read_chunk_part(
        self, name: str, grid: Grid, index: tuple[int, ...], rows: slice, cols: slice
    ) -> np.ndarray:
        """Rows ``rows`` (within the chunk) and columns ``cols`` of a chunk of a 2-d array
        (factors, features), reading only those bytes where the chunk is a plain file."""
        plain = self._plain_chunks(name)
        if plain is not None:
            return plain.read_part(index, rows, cols)
        first = self._chunk_slices(name, grid, index)[0].start
        return np.asarray(self.group[name][first + rows.start : first + rows.stop, cols])

    def _plain_chunks(self, name: str) -> Optional[PlainChunks]:
        if name not in self._plain:
            self._plain[name] = PlainChunks.of(self.group[name], self.fs, self._path(name))
        return self._plain[name]

    def chunk_done(self, name: str, grid: Grid, index: tuple[int, ...]) -> bool:
        """True only if the record exists and the stored chunk matches its checksum."""
        return self.read_done_chunk(name, grid, index) is not None

    def read_done_chunk(
        self, name: str, grid: Grid, index: tuple[int, ...]
    ) -> Optional[np.ndarray]:
        """The chunk's values if it is done (see :meth:`chunk_done`), else ``None``."""
        record = self._read_json(self._record_path(name, index))
        if record is None or not self._of_this_manifest(record):
            return None
        try:
            values = self.read_chunk(name, grid, index)
        except Exception:
            return None  # unreadable (e.g. truncated, undecodable) chunk
        matches = checksum(values, self._by_columns(name)) == record.get("sha256")
        return values if matches else None

    def _by_columns(self, name: str) -> bool:
        """Whether the array's chunks are stored column by column (see :func:`_layout`)."""
        if name not in self._columns:
            from zarr.codecs import TransposeCodec

            codecs = tuple(getattr(self.group[name].metadata, "codecs", ()))
            self._columns[name] = bool(
                codecs
                and isinstance(codecs[0], TransposeCodec)
                and tuple(codecs[0].order) == (1, 0)
            )
        return self._columns[name]

    def recorded(self, name: str) -> set[tuple[int, ...]]:
        """Indices that have a completion record (not verified; see :meth:`chunk_done`)."""
        folder = self._path("records", name)
        self.fs.invalidate_cache(folder)
        try:
            files = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for f in files:
            stem = f.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                out.add(tuple(int(p) for p in stem.split(".")))
            except ValueError:
                continue
        return out

    # -- fitted state ----------------------------------------------------------------------------
    def write_fitted_state(self, state: dict[str, Any]) -> None:
        import torch

        arrays = {
            k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in state.items()
        }
        self._write_array_set("fitted", arrays, "records/fitted.json", {})

    def read_fitted_state(self) -> Optional[dict[str, Any]]:
        """The fitted state as torch tensors, or ``None`` if missing or corrupt."""
        import torch

        found = self._read_array_set("fitted", "records/fitted.json")
        if found is None:
            return None
        return {k: torch.from_numpy(np.array(v)) for k, v in found[0].items()}

    # -- summary ---------------------------------------------------------------------------------
    def write_summary(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        self._write_array_set("summary", arrays, "records/summary.json", {"info": info})

    def read_summary(self) -> Optional[tuple[dict[str, np.ndarray], dict]]:
        """Summary arrays and info, or ``None`` if missing or corrupt."""
        found = self._read_array_set("summary", "records/summary.json")
        return None if found is None else (found[0], found[1]["info"])

    def write_summary_part(self, j: int, arrays: dict[str, np.ndarray], top_k: int) -> None:
        """Top-k arrays over train chunk ``j`` alone (merged by the summary)."""
        self._write_array_set(
            f"summary_parts/{j}", arrays, f"records/summary_parts/{j}.json", {"top_k": top_k}
        )

    def read_summary_part(self, j: int, top_k: int) -> Optional[dict[str, np.ndarray]]:
        """Column ``j``'s top-k arrays, or ``None`` if missing, corrupt or for another k."""
        found = self._read_array_set(f"summary_parts/{j}", f"records/summary_parts/{j}.json")
        return None if found is None or found[1].get("top_k") != top_k else found[0]

    # -- small sets of whole arrays with one record ----------------------------------------------
    def _write_array_set(
        self, prefix: str, arrays: dict[str, np.ndarray], record: str, extra: dict
    ) -> None:
        self._remove(record)
        sums = {}
        for key, arr in arrays.items():
            name = f"{prefix}/{key}"
            self.group.create_array(
                name,
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=arr.shape or (),
                overwrite=True,
                fill_value=0,
            )
            self.group[name][...] = arr
            sums[key] = checksum(arr)
        self._write_json(record, self._stamped({"arrays": sums, **extra}))

    def _read_array_set(
        self, prefix: str, record: str
    ) -> Optional[tuple[dict[str, np.ndarray], dict]]:
        entry = self._read_json(record)
        if entry is None or not self._of_this_manifest(entry):
            return None
        out = {}
        try:
            for key, digest in entry["arrays"].items():
                arr = np.asarray(self.group[f"{prefix}/{key}"][...])
                if checksum(arr) != digest:
                    return None
                out[key] = arr
        except Exception:  # missing or undecodable array: not done
            return None
        return out, entry

    # -- run log ---------------------------------------------------------------------------------
    def log_attempt(self, run_id: str, entry: dict[str, Any]) -> None:
        """Add or complete (same ``attempt`` number) an attempt of flow run ``run_id`` in the
        output's run log (written by the lease holder only)."""
        rel = f"{RUNS}/{run_id}.json"
        data = self._read_json(rel) or {"flow_run": run_id, "attempts": []}
        attempts = {int(a.get("attempt", 0)): a for a in data.get("attempts", [])}
        number = int(entry.get("attempt", 0))
        attempts[number] = {**attempts.get(number, {}), **entry}
        data["attempts"] = [attempts[n] for n in sorted(attempts)]
        self._write_json(rel, data)

    def run_log(self) -> list[dict[str, Any]]:
        """Every flow run's attempts on this output, oldest run first."""
        folder = self._path(RUNS)
        self.fs.invalidate_cache(folder)
        try:
            files = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        runs = []
        for f in files:
            data = read_json(self.fs, f)
            if data and data.get("attempts"):
                runs.append(data)
        return sorted(runs, key=lambda r: r["attempts"][0].get("started", ""))

    # -- status ----------------------------------------------------------------------------------
    def status(self, verify: bool = False) -> dict[str, Any]:
        """Completion of every stage; with ``verify`` every recorded chunk is checksummed."""
        manifest = self.read_manifest()
        if manifest is None:
            return {"url": self.url, "exists": not self.is_empty(), "manifest": None}
        grid = manifest.grid
        out: dict[str, Any] = {"url": self.url, "exists": True, "manifest": manifest}
        totals = {FACTORS: grid.shape[0], INFLUENCES: grid.n_blocks, SELF_INFLUENCE: grid.shape[1]}
        for name, total in totals.items():
            recorded = self.recorded(name)
            entry: dict[str, Any] = {"total": total, "recorded": len(recorded)}
            if verify:
                corrupt = sorted(ix for ix in recorded if not self.chunk_done(name, grid, ix))
                entry["corrupt"] = [list(ix) for ix in corrupt]
                entry["done"] = len(recorded) - len(corrupt)
            out[name] = entry
        features = self.features_description()
        if features is not None:
            recorded = self.recorded(TRAIN_FEATURES)
            out[TRAIN_FEATURES] = {**features, "total": grid.shape[1], "recorded": len(recorded)}
        out["fitted"] = self._read_json("records/fitted.json") is not None
        out["summary"] = self._read_json("records/summary.json") is not None
        return out


def _layout(name: str) -> list:
    """Factor chunks are stored column by column: a layer-wise column reads a few columns of
    every row of a chunk, which is then one contiguous range instead of one per row."""
    from zarr.codecs import TransposeCodec

    return [TransposeCodec(order=(1, 0))] if name == FACTORS else []


def _grows_along_rows(name: str, old: tuple, new: tuple, old_chunks, new_chunks) -> bool:
    """Whether an array indexed by test row only needs more rows to fit ``new``."""
    return (
        name in (FACTORS, INFLUENCES)
        and tuple(old_chunks) == tuple(new_chunks)
        and len(old) == len(new)
        and old[1:] == tuple(new[1:])
        and old[0] < new[0]
    )
