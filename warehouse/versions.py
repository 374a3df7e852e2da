"""Warehouse versions: one row in the ``log`` Delta table per commit.

A warehouse version pins one Delta version of every table (the ``pins`` map, table name ->
Delta version), so a reader of version N sees the documents, embeddings, models and heads
exactly as that commit left them, even while another process writes. Writes to the tables
that no log row points at yet (a writer killed mid-commit) are invisible to every pinned
reader until the next writer settles them (:meth:`warehouse.store.Writer.settle`).

`ew vacuum` deletes the files of old versions; the ``vacuum`` row that precedes the deletion
records the oldest version still readable (``detail.oldest_version``), and reading one below it
is a :class:`VersionVacuumedError` naming that version.

Rows written before ``pins`` existed carry one ``<table>_version`` column per table; they
read the same.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from .errors import VersionNotFoundError, VersionVacuumedError
from .tables import TABLES


@dataclass(frozen=True)
class Snapshot:
    """One warehouse version: the Delta version of every table (-1 where a table did not exist yet)."""

    version: int
    committed_at: datetime | None
    table_versions: dict[str, int]

    @classmethod
    def empty(cls) -> "Snapshot":
        return cls(version=-1, committed_at=None, table_versions={name: -1 for name in TABLES})


@dataclass(frozen=True)
class LogEntry:
    version: int
    committed_at: datetime
    operation: str
    rows_added: int
    detail: dict
    pins: dict[str, int]  # the Delta version of each table this version pins; -1: not created yet

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "committed_at": self.committed_at.isoformat(),
            "operation": self.operation,
            "rows_added": self.rows_added,
            "detail": self.detail,
            "pins": self.pins,
        }


def pins_of(row: dict) -> dict[str, int]:
    """Table -> Delta version of a log row, from ``pins`` or, in rows older than it, the per-table columns."""
    pinned = dict(row.get("pins") or [])
    for name in TABLES:
        if name not in pinned:
            legacy = row.get(f"{name}_version")
            pinned[name] = -1 if legacy is None else int(legacy)
    return {name: int(pinned[name]) for name in TABLES}


def entries(log: pa.Table) -> list[LogEntry]:
    """Every row of the log table, oldest first."""
    return [
        LogEntry(
            version=row["version"],
            committed_at=row["committed_at"],
            operation=row["operation"],
            rows_added=row["rows_added"],
            detail=json.loads(row["detail"] or "{}"),
            pins=pins_of(row),
        )
        for row in log.sort_by("version").to_pylist()
    ]


#: The operation of the log row that records the oldest readable version (``detail.oldest_version``).
VACUUM = "vacuum"


def oldest_readable(log: pa.Table) -> int:
    """The oldest version whose files `ew vacuum` kept (0: nothing was vacuumed)."""
    vacuums = log.filter(pc.equal(log.column("operation"), VACUUM)).column("detail").to_pylist()
    return max((int(json.loads(detail or "{}").get("oldest_version", 0)) for detail in vacuums), default=0)


def snapshot_of(log: pa.Table, version: int | None = None) -> Snapshot:
    """The snapshot of ``version`` (default: the latest) in the log table; VersionNotFoundError if absent."""
    if log.num_rows == 0:
        if version is None:
            return Snapshot.empty()
        raise VersionNotFoundError(version, None)
    latest = int(pc.max(log.column("version")).as_py())
    wanted = latest if version is None else version
    rows = log.filter(pc.equal(log.column("version"), wanted)).to_pylist() if 0 <= wanted <= latest else []
    if not rows:
        raise VersionNotFoundError(wanted, latest)
    if version is not None and version < (oldest := oldest_readable(log)):
        raise VersionVacuumedError(version, oldest, latest)
    return Snapshot(version=wanted, committed_at=rows[0]["committed_at"], table_versions=pins_of(rows[0]))
