"""Storage options with their credentials, resolved where storage is opened.

A configuration names a *secret* (``storage_secret``) instead of carrying credentials, so the
same configuration travels through a flow, its tasks and their logs without them. The process
that opens storage merges the secret's value (a JSON object of fsspec options) into the
configured options. Credentials may also come from the environment, as fsspec's backends read
it (``AWS_ACCESS_KEY_ID`` and friends for S3).

Loading a secret is the orchestration layer's business: it registers a loader with
:func:`set_secret_loader` (``prefect_influence.tasks`` registers Prefect's Secret blocks).
A loaded value is kept for :data:`SECRET_TTL_S` per process, so the tasks of a job running in
one worker load it once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Optional, Protocol

from ..errors import ConfigurationError, InfluenceInputError

__all__ = ["set_secret_loader", "storage_options", "SECRET_TTL_S"]

#: seconds a loaded secret is reused within a process (rotated credentials reach new tasks then)
SECRET_TTL_S = 300.0

_loader: Optional[Callable[[str], Any]] = None
_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


class _HasStorage(Protocol):
    storage_options: dict[str, Any]
    storage_secret: Optional[str]


def set_secret_loader(loader: Optional[Callable[[str], Any]]) -> None:
    """Use ``loader(name)`` to read secrets (its value: a dict, or a JSON object as text)."""
    global _loader
    with _lock:
        _loader = loader
        _cache.clear()


def storage_options(config: _HasStorage) -> dict[str, Any]:
    """``config.storage_options`` with the value of ``config.storage_secret`` merged in."""
    options = dict(config.storage_options or {})
    name = config.storage_secret
    return {**options, **_secret(name)} if name else options


def _secret(name: str) -> dict[str, Any]:
    now = time.monotonic()
    with _lock:
        cached = _cache.get(name)
        loader = _loader
    if cached is not None and now - cached[0] < SECRET_TTL_S:
        return cached[1]
    if loader is None:
        raise ConfigurationError(
            f"storage_secret {name!r} needs a secret loader: import prefect_influence.tasks "
            "(Prefect Secret blocks) or call storage.credentials.set_secret_loader."
        )
    value = loader(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None  # a plain string: refused below, without echoing it
    if not isinstance(value, dict):
        raise InfluenceInputError(
            f"Secret block {name!r} must hold a JSON object of storage options."
        )
    with _lock:
        _cache[name] = (now, value)
    return value
