"""Where a warehouse lives: a file system, the locations of its tables, and its write lock.

Every path of a warehouse goes through its :class:`LocalStorage`: the Delta tables (opened by
``table_uri`` with ``storage_options``), the Parquet files pyarrow reads (through ``fs``), and
the one-writer lock, and the artifact directories (``artifact_path`` to read one,
``new_artifact`` to write one, ``extended_artifact`` to add files to one). A warehouse on an
object store is the second implementation of this interface (:class:`warehouse.s3.S3Storage`);
:func:`open_storage` picks one from the location the user gave, and nothing above this module
needs to know which one it has.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Union

import pyarrow.fs as pafs
from deltalake import DeltaTable

from .errors import EwError, StorageError
from .lock import Hold, write_lock
from .s3 import S3Storage, is_s3

Storage = Union["LocalStorage", S3Storage]


def open_storage(location: str | os.PathLike) -> Storage:
    """The storage of the warehouse at ``location``: ``s3://bucket/prefix`` or a local directory."""
    return S3Storage(str(location)) if is_s3(location) else LocalStorage(location)


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

    def location(self, relative: str) -> str:
        """What a user is shown for ``relative``: its path."""
        return str(self.root / relative)

    def exists(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def create(self, marker: str, text: str) -> None:
        """Write the warehouse marker into an empty or new directory (whole: a temp file renamed into place)."""
        root = self.root
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise EwError(f"{root} exists and is not an ew warehouse (no {marker}); "
                          "choose an empty or new directory for --warehouse")
        try:
            root.mkdir(parents=True, exist_ok=True)
            temporary = root / f".{marker}.tmp"
            temporary.write_text(text)
            os.replace(temporary, root / marker)
        except OSError as error:
            raise StorageError(f"cannot create a warehouse at {root} ({error.strerror}); choose a writable directory") from None

    def artifact_path(self, relative: str) -> Path:
        """The directory of the artifact ``relative`` (it may not exist)."""
        return self.root / relative

    @contextmanager
    def new_artifact(self, relative: str) -> Iterator[Path]:
        """The directory to build the artifact ``relative`` in: its place itself, as the writers
        of artifacts build beside it and rename into place."""
        directory = self.root / relative
        directory.parent.mkdir(parents=True, exist_ok=True)
        yield directory

    @contextmanager
    def extended_artifact(self, relative: str) -> Iterator[Path]:
        """The directory of the stored artifact ``relative``, to add files to in place (by rename)."""
        yield self.root / relative

    def table_uri(self, table: str) -> str:
        """What deltalake opens for ``table``."""
        return str(self.root / table)

    def is_table(self, table: str) -> bool:
        """Whether ``table`` has a Delta log."""
        return DeltaTable.is_deltatable(self.table_uri(table))

    def fs_path(self, uri: str) -> str:
        """A URI deltalake lists (``file:///...`` or a plain path) as a path of :attr:`fs`."""
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def lock(self, *, wait: float = 0.0) -> AbstractContextManager[Hold]:
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
