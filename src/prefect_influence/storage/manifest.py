"""What an output holds, in its own words: the block grid and the manifest that names the job.

The manifest is written when a job is planned on an output (and again when test rows are
appended to it), and read by every stage, the CLI and ``status``. Its :attr:`Manifest.id`
(fingerprint plus creation time) stamps every completion record, so a record counts only for
the manifest it was written under, or for a later one that grew out of it by appending test
rows (:attr:`Manifest.inherits`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import StorageError

__all__ = ["SCHEMA_VERSION", "Grid", "Manifest"]

SCHEMA_VERSION = 1


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass(frozen=True)
class Grid:
    """The block grid: test rows × train columns, both chunked along samples."""

    n_test: int
    n_train: int
    test_chunk: int
    train_chunk: int
    n_parameters: int
    x_shape: tuple[int, ...]
    mode: str  # "up" or "perturbation"
    dtype: str  # "float32" or "float64"

    @property
    def test_ranges(self) -> list[tuple[int, int]]:
        return _ranges(self.n_test, self.test_chunk)

    @property
    def train_ranges(self) -> list[tuple[int, int]]:
        return _ranges(self.n_train, self.train_chunk)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.test_ranges), len(self.train_ranges)

    @property
    def n_blocks(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def influence_shape(self) -> tuple[int, ...]:
        extra = self.x_shape if self.mode == "perturbation" else ()
        return (self.n_test, self.n_train, *extra)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["x_shape"] = list(self.x_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Grid":
        return cls(**{**data, "x_shape": tuple(data["x_shape"])})


@dataclass(frozen=True)
class Manifest:
    """The job an output holds: the fingerprint of everything that determines its numbers,
    the grid, the (redacted) configuration that planned it, and when and by what it was made."""

    fingerprint: dict[str, Any]
    grid: Grid
    config: dict[str, Any] = field(default_factory=dict)
    created: Optional[str] = None
    package_version: Optional[str] = None
    schema_version: int = SCHEMA_VERSION
    #: ids of the earlier manifests this one extends with appended test rows, oldest first:
    #: their records stay valid (a chunk whose rows changed fails its checksum instead)
    inherits: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """Identifies this manifest among all the output has had: its fingerprint and when it
        was written (a job planned again on a cleared output gets a new id)."""
        stamp = json.dumps([self.fingerprint, self.created], sort_keys=True)
        return hashlib.sha256(stamp.encode()).hexdigest()[:16]

    @property
    def accepted_ids(self) -> tuple[str, ...]:
        """The manifest ids whose records count for this manifest: its own and those it extends."""
        return (*self.inherits, self.id)

    def differences(self, fingerprint: dict[str, Any]) -> list[str]:
        """The fingerprint entries (``model``, ``train``, ``method``...) in which ``fingerprint``
        differs from this manifest's, sorted; empty when it is the same job."""
        keys = set(fingerprint) | set(self.fingerprint)
        return sorted(k for k in keys if fingerprint.get(k) != self.fingerprint.get(k))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "package_version": self.package_version,
            "fingerprint": self.fingerprint,
            "grid": self.grid.to_json(),
            "config": self.config,
            "created": self.created,
            "inherits": list(self.inherits),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            return cls(
                fingerprint=dict(data.get("fingerprint") or {}),
                grid=Grid.from_json(data["grid"]),
                config=dict(data.get("config") or {}),
                created=data.get("created"),
                package_version=data.get("package_version"),
                schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
                inherits=tuple(str(i) for i in data.get("inherits") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{where} is not a prefect-influence manifest: {exc!r}") from exc
