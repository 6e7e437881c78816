"""``killer://``: local files, except that the process SIGKILLs itself at the N-th write whose
path contains a pattern — before the write, after half of it (torn), or right after it.

Armed by environment variables (so a subprocess can be killed at a chosen point):
``KILL_PATTERN``, ``KILL_AT`` (N, 1-based) and ``KILL_WHEN`` (``before``, ``torn``, ``after``).
"""

from __future__ import annotations

import os
import signal
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem


class KillerFileSystem(LocalFileSystem):
    protocol = ("killer",)
    _lock = threading.Lock()
    _count = 0

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("killer://"):
            path = path[len("killer://") :]
        return super()._strip_protocol(path)

    def pipe_file(self, path, value, **kwargs):
        path = self._strip_protocol(path)
        pattern = os.environ.get("KILL_PATTERN")
        when = None
        if pattern and pattern in path:
            with self._lock:
                type(self)._count += 1
                if type(self)._count == int(os.environ.get("KILL_AT", "1")):
                    when = os.environ.get("KILL_WHEN", "before")
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if when == "torn":
            super().pipe_file(path, value[: len(value) // 2], **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        super().pipe_file(path, value, **kwargs)
        if when == "after":
            os.kill(os.getpid(), signal.SIGKILL)


fsspec.register_implementation("killer", KillerFileSystem, clobber=True)
