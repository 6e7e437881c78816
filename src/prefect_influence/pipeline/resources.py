"""What a stage does to the process it runs in: torch's thread count, memory handed back to
the OS, and a background writer that overlaps storage writes with the next computation."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import torch

__all__ = ["torch_threads", "release_free_memory", "BackgroundWriter"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_free_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap pages for
    reuse): the process that fitted stays resident beside the Dask workers for the rest of
    the run. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """Writes chunks in one background thread while the caller computes the next: at most one
    write in flight (two blocks in memory), in submission order; a failed write is raised at
    the next ``submit`` or on exit, and no write is abandoned (exit waits for the last)."""

    def __enter__(self) -> "BackgroundWriter":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-influence-write")
        self._pending: Optional[Future] = None
        return self

    def submit(self, fn, *args) -> None:
        self._drain()
        self._pending = self._pool.submit(fn, *args)

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, *exc) -> None:
        try:
            self._drain()
        finally:
            self._pool.shutdown(wait=True)
