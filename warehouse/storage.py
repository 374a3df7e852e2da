"""Where a warehouse lives: a file system, the locations of its tables, and its write lock.

Every path of a warehouse goes through its :class:`LocalStorage`: the Delta tables (opened by
``table_uri`` with ``storage_options``), the Parquet files pyarrow reads (through ``fs``), and
the one-writer lock. A warehouse on an object store is a second implementation of this
interface (an S3 ``fs``, ``s3://`` URIs, delta-rs' storage options and an object-store lock);
nothing above this module needs to know which one it has.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pyarrow.fs as pafs

from .lock import write_lock


class LocalStorage:
    """A warehouse in a directory of the local file system."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.fs: pafs.FileSystem = pafs.LocalFileSystem()
        #: Options deltalake needs to reach the tables (credentials, endpoints); none for local disk.
        self.storage_options: dict[str, str] | None = None

    @property
    def uri(self) -> str:
        return str(self.root)

    def table_uri(self, table: str) -> str:
        """What deltalake opens for ``table``."""
        return str(self.root / table)

    def fs_path(self, uri: str) -> str:
        """A URI deltalake lists (``file:///...`` or a plain path) as a path of :attr:`fs`."""
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def lock(self, *, wait: float = 0.0) -> AbstractContextManager[None]:
        """The warehouse's write lock: one writer at a time, released when the process dies."""
        return write_lock(self.root, wait=wait)

    def iter_files(self, relative: str) -> Iterator[tuple[str, int]]:
        """(path relative to the root, size in bytes) of every file below ``relative``."""
        base = self.root / relative
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file():
                yield str(path.relative_to(self.root)), path.stat().st_size

    def children(self, relative: str) -> list[str]:
        """The entries directly below ``relative`` (paths relative to the root), sorted; none if it is missing."""
        base = self.root / relative
        if not base.is_dir():
            return []
        return sorted(str(path.relative_to(self.root)) for path in base.iterdir())

    def modified_at(self, relative: str) -> float:
        """The newest modification time (seconds since the epoch) of ``relative`` and the entries directly in it."""
        base = self.root / relative
        times = [base.stat().st_mtime]
        if base.is_dir():
            times += [path.stat().st_mtime for path in base.iterdir()]
        return max(times)

    def delete(self, relative: str) -> None:
        """Delete a file, or a directory and everything below it. A missing one is no error: a
        rerun after a crash deletes what is left."""
        path = self.root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def remove_empty_dir(self, relative: str) -> bool:
        """Remove the directory ``relative`` if it is empty; whether it was removed."""
        try:
            os.rmdir(self.root / relative)
        except OSError:  # not empty, or gone already
            return False
        return True
