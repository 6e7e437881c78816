"""The lease of an output: which run writes there, until when.

``lease.json`` names an owner token, host, pid and expiry. A run takes the lease before it
plans or writes and renews it from a background thread every quarter of its time to live; a
lease counts as stale when it expired or when its process is gone from this host. Taking a
free lease is a create-if-absent write (atomic on local disks and on S3's conditional PUT),
and every taker reads the lease back, so of two runs starting at once exactly one proceeds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from ..errors import LeaseHeldError, StorageError
from .jsonfiles import read_json, remove, write_json

__all__ = ["LEASE", "Lease"]

LEASE = "lease.json"


def _stale(lease: dict) -> bool:
    if lease.get("expires", 0) < time.time():
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return True  # its process died on this host
        except (PermissionError, ValueError, OSError):
            return False
    return False


class Lease:
    """The lease file of the output at ``url`` (``path`` on filesystem ``fs``)."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url

    def read(self) -> Optional[dict]:
        return read_json(self.fs, self.path)

    def check_free(self, force: bool = False, owner: Optional[str] = None) -> None:
        """Raise :class:`LeaseHeldError` if another live run holds the lease (what
        :meth:`acquire` would refuse), without taking it."""
        current = self.read()
        ours = owner is not None and current is not None and current.get("owner") == owner
        if current and not force and not ours and not _stale(current):
            raise LeaseHeldError(self._held_message(current))

    def _held_message(self, current: dict) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current.get("expires", 0)))
        return (
            f"{self.url!r} is in use by another run (owner {current.get('owner')}, host "
            f"{current.get('host')}, pid {current.get('pid')}) until {until}. "
            "Wait for it, or take over with force=True (CLI: --force) if it is dead."
        )

    def acquire(
        self, ttl_seconds: float = 600.0, force: bool = False, owner: Optional[str] = None
    ) -> str:
        """Take the output for this run; returns the owner token to renew and release with."""
        try:
            return self._acquire(ttl_seconds, force, owner)
        except StorageError:
            raise
        except Exception as exc:  # e.g. a path under a file, no permission, unreachable
            raise StorageError(
                f"Cannot take the lease on the output {self.url!r} (is it writable?): {exc}"
            ) from exc

    def _acquire(self, ttl_seconds: float, force: bool, owner: Optional[str]) -> str:
        token = owner or uuid.uuid4().hex
        current = self.read()
        created = False
        if current is None:
            try:
                self._write(token, ttl_seconds, mode="create")
                created = True
            except FileExistsError:
                current = self.read()
        if not created:
            ours = owner is not None and current is not None and current.get("owner") == owner
            if current and not force and not ours and not _stale(current):
                raise LeaseHeldError(self._held_message(current))
            self._write(token, ttl_seconds)  # taking over a stale, forced or own lease
        # two runs taking over at once (or a backend without atomic create): the last writer
        # wins, the other notices here
        time.sleep(0.05)
        held = self.read()
        if not held or held.get("owner") != token:
            raise LeaseHeldError(f"{self.url!r} was taken by another run at the same moment.")
        return token

    @contextlib.contextmanager
    def hold(
        self, force: bool = False, ttl_seconds: float = 600.0, owner: Optional[str] = None
    ) -> Iterator[str]:
        """Hold the lease while the block runs, renewed by a background thread every ttl/4.
        ``owner`` (e.g. a flow-run id) lets a retry of the same run take its own lease back."""
        token = self.acquire(ttl_seconds, force, owner)
        stop = threading.Event()
        failure: list[BaseException] = []

        def keep() -> None:
            while not stop.wait(ttl_seconds / 4):
                try:
                    self.renew(token, ttl_seconds)
                except LeaseHeldError as exc:
                    failure.append(exc)
                    return
                except Exception:  # a transient storage error: try again next round
                    continue

        thread = threading.Thread(target=keep, name="prefect-influence-lease", daemon=True)
        thread.start()
        try:
            yield token
        finally:
            stop.set()
            thread.join()
            self.release(token)
        if failure:
            raise failure[0]

    def renew(self, token: str, ttl_seconds: float = 600.0) -> None:
        held = self.read()
        if held and held.get("owner") != token:
            raise LeaseHeldError(
                f"{self.url!r}: this run's lease was taken over by {held.get('owner')} "
                f"(host {held.get('host')}); stopping so the two runs do not interleave."
            )
        self._write(token, ttl_seconds)

    def release(self, token: str) -> None:
        held = self.read()
        if held and held.get("owner") == token:
            remove(self.fs, self.path)

    def _write(self, token: str, ttl_seconds: float, mode: str = "overwrite") -> None:
        lease = {
            "owner": token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + ttl_seconds,
        }
        write_json(self.fs, self.path, lease, mode=mode)
