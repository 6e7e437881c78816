"""Small JSON files on an fsspec filesystem: manifests, completion records, the lease."""

from __future__ import annotations

import json
from typing import Optional

__all__ = ["read_json", "write_json", "remove"]


def write_json(fs, path: str, data: dict, mode: str = "overwrite") -> None:
    """Write ``data`` at ``path`` (``mode="create"`` fails with ``FileExistsError`` if present)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=mode)


def read_json(fs, path: str) -> Optional[dict]:
    """The file's object, or ``None`` if it is missing or torn (a torn record is no record)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def remove(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
