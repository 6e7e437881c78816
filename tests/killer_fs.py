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

    def _armed(self, path: str):
        """``KILL_WHEN`` if this write (to ``path``) is the N-th matching one, else ``None``."""
        pattern = os.environ.get("KILL_PATTERN")
        if pattern and pattern in path:
            with self._lock:
                type(self)._count += 1
                if type(self)._count == int(os.environ.get("KILL_AT", "1")):
                    return os.environ.get("KILL_WHEN", "before")
        return None

    def pipe_file(self, path, value, **kwargs):
        path = self._strip_protocol(path)
        when = self._armed(path)
        if when == "before":
            _kill()
        if when == "torn":
            super().pipe_file(path, value[: len(value) // 2], **kwargs)
            _kill()
        super().pipe_file(path, value, **kwargs)
        if when == "after":
            _kill()

    def _open(self, path, mode="rb", **kwargs):
        """A file opened for writing (written in parts) counts as one write: killed when it
        opens, after its first part is on disk (torn), or when it is closed."""
        f = super()._open(path, mode, **kwargs)
        when = self._armed(self._strip_protocol(path)) if "w" in mode else None
        if when == "before":
            _kill()
        return f if when is None else _KillingFile(f, when)


class _KillingFile:
    def __init__(self, f, when: str):
        self.f, self.when = f, when

    def write(self, data):
        n = self.f.write(data)
        if self.when == "torn":
            self.f.flush()
            _kill()
        return n

    def close(self):
        self.f.close()
        if self.when == "after":
            _kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


fsspec.register_implementation("killer", KillerFileSystem, clobber=True)
