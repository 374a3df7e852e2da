"""One writer at a time: an advisory file lock that the kernel drops when the process dies.

Readers never take it; they read a pinned snapshot. A writer that is killed (even with
kill -9) releases the lock with its process, so the next writer never waits on a stale file.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StorageError, WarehouseLockedError

LOCK_NAME = ".ew-write.lock"


@contextmanager
def write_lock(root: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the warehouse's write lock for the duration of the block, or raise WarehouseLockedError.

    ``wait``: seconds to wait for another writer to finish first (0: fail at once). A short
    commit at the end of a long job (a head after minutes of training) waits rather than
    losing its work to a writer that holds the lock for a moment.
    """
    path = root / LOCK_NAME
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise StorageError(
            f"cannot write to the warehouse {root} ({error.strerror}: {path}); commands that write need "
            "write access to it: check its permissions and free space, or read it with `ew query`"
        ) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown process"
                    raise WarehouseLockedError(root, holder) from None
                time.sleep(0.05)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()
