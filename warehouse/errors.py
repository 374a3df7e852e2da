"""One exception tree for ew. Every message says what failed, where, and what to do.

The CLI catches :class:`EwError` once, prints ``Error: <message>`` and exits 1.
Any other exception escaping to the user is a bug.
"""
from __future__ import annotations

from pathlib import Path


class EwError(Exception):
    """Root of every error ew raises on purpose."""


def first_line(error: BaseException) -> str:
    """The first line of another library's error message, to quote inside ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class WarehouseNotFoundError(EwError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(
            f"no warehouse at {self.path}: run `ew ingest CORPUS.jsonl` to create one, "
            "or point --warehouse / EW_WAREHOUSE at an existing one"
        )


class WarehouseLockedError(EwError):
    def __init__(self, path: Path | str, holder: str):
        self.path = str(path)
        self.holder = holder
        super().__init__(
            f"another ew process ({holder}) is writing to the warehouse {self.path}; "
            "wait for it to finish and run the command again"
        )


class LockLostError(EwError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"this command lost the write lock of the warehouse {path}: it could not renew it in time "
            "(a slow or broken connection to the object store), so another writer may have taken it over; "
            "nothing more was committed: run the command again (an ingest continues from its last commit)"
        )


class VersionNotFoundError(EwError):
    def __init__(self, version: int, latest: int | None):
        self.version = version
        self.latest = latest
        known = "the warehouse has no versions yet" if latest is None else f"versions run 0..{latest}"
        super().__init__(f"version {version} does not exist ({known}); see `ew log`")


class VersionVacuumedError(VersionNotFoundError):
    """A version older than the oldest one `ew vacuum` kept: its files are gone."""

    def __init__(self, version: int, oldest: int, latest: int):
        self.version = version
        self.oldest = oldest
        self.latest = latest
        EwError.__init__(
            self,
            f"version {version} is no longer readable: `ew vacuum` deleted its files; the oldest readable version "
            f"is {oldest} (versions run {oldest}..{latest}); see `ew log`",
        )


class QueryError(EwError):
    """The SQL could not run (syntax, unknown column, ...)."""


class QueryRefusedError(QueryError):
    """The SQL was refused by the sandbox; nothing ran and nothing was written."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"query refused: {reason}. `ew query` runs one read-only SELECT over the warehouse tables")


class SelectionError(EwError):
    """The documents or vectors asked for cannot be selected (unknown column, bad condition)."""


class StorageError(EwError):
    """A table, file or artifact of the warehouse is missing, damaged or cannot be written."""
