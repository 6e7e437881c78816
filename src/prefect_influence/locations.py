"""URLs of stored things: the one place a local path or fsspec URL becomes a filesystem or a
zarr store, and the spellings used to compare two locations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec

__all__ = ["PathOrUrl", "open_store", "open_group", "output_location", "location_key", "is_local"]

PathOrUrl = Union[str, "os.PathLike[str]"]


def open_store(
    path_or_url: PathOrUrl,
    storage_options: Optional[dict[str, Any]] = None,
    read_only: bool = False,
):
    """A zarr store for a local path, a ``file://`` URL or any other fsspec URL."""
    from zarr.storage import FsspecStore, LocalStore

    url = os.fspath(path_or_url)
    is_file_url = url.startswith("file://")
    if "://" not in url or is_file_url:
        path = Path(url2pathname(urlparse(url).path) if is_file_url else url).expanduser()
        if not storage_options:
            return LocalStore(path, read_only=read_only)
        # options for the local filesystem go through fsspec; create directories like LocalStore
        url, storage_options = path.absolute().as_uri(), {"auto_mkdir": True, **storage_options}
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def open_group(path_or_url: PathOrUrl, storage_options: Optional[dict] = None, mode: str = "a"):
    """A zarr v3 group at a path or URL (``mode`` as :func:`zarr.open_group`)."""
    import zarr

    store = open_store(path_or_url, storage_options, read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3 if mode != "r" else None)


def output_location(url: str) -> str:
    """``url`` without trailing slashes on its path (``memory://out/`` → ``memory://out``, while
    ``memory://`` keeps its protocol). Refuses the root of a filesystem (``/``, ``file:///``,
    ``memory://``): ``overwrite`` would clear everything on it.
    """
    protocol, sep, path = url.rpartition("://")
    stripped = path.rstrip("/")
    if not stripped.strip():
        raise ValueError(
            f"output {url!r} is the root of a filesystem; name a directory under it (overwrite "
            "clears the whole output location)."
        )
    return f"{protocol}{sep}{stripped}"


def location_key(url: str, storage_options: Optional[dict] = None) -> str:
    """One spelling per location, to compare two URLs: the protocol plus the path (local
    paths absolute, with ``..`` and symbolic links resolved), without trailing slashes."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if is_local(fs):
        path = os.path.realpath(path)
    return fs.unstrip_protocol(path).rstrip("/")


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    proto = fs.protocol
    return "file" in ((proto,) if isinstance(proto, str) else tuple(proto))
