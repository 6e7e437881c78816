"""Helpers every input of a job uses: import paths, bytes at a URL, dtype names."""

from __future__ import annotations

import importlib
from typing import Any

import fsspec

from ..errors import ConfigurationError

__all__ = ["resolve_import", "read_bytes", "torch_dtype"]


def torch_dtype(name: Any) -> "torch.dtype":  # noqa: F821
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[getattr(name, "value", name)]


def resolve_import(path: str, what: str) -> Any:
    """``'package.module:attribute'`` → the object. The configuration is trusted code."""
    if ":" not in path:
        raise ConfigurationError(f"{what} {path!r} must look like 'package.module:attribute'.")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ConfigurationError(
            f"{what} {path!r}: module {module_name!r} has no {attr!r}."
        ) from exc
    return obj


def read_bytes(url: str, storage_options: dict, what: str) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{what} {url!r} does not exist.") from exc
    except Exception as exc:  # network, permissions, bad protocol
        raise ConfigurationError(f"{what} {url!r} cannot be read: {exc}") from exc
