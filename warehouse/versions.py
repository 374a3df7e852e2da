"""Warehouse versions: one row in the ``log`` Delta table per commit.

A warehouse version pins one Delta version of every table, so a reader of version N sees
the documents, embeddings, models and heads exactly as that commit left them, even while
another process writes. Writes to the tables that no log row points at yet (a writer killed
mid-commit) are invisible to every pinned reader.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow.compute as pc
from deltalake import DeltaTable

from .errors import VersionNotFoundError
from .tables import LOG, TABLES, delta_dataset


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

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "committed_at": self.committed_at.isoformat(),
            "operation": self.operation,
            "rows_added": self.rows_added,
            "detail": self.detail,
        }


def _log_table(root: Path) -> DeltaTable | None:
    path = root / LOG
    return DeltaTable(str(path)) if DeltaTable.is_deltatable(str(path)) else None


def read_log(root: Path) -> list[LogEntry]:
    """Every warehouse version, oldest first."""
    table = _log_table(root)
    if table is None:
        return []
    rows = delta_dataset(table, root / LOG).to_table().sort_by("version").to_pylist()
    return [
        LogEntry(
            version=row["version"],
            committed_at=row["committed_at"],
            operation=row["operation"],
            rows_added=row["rows_added"],
            detail=json.loads(row["detail"] or "{}"),
        )
        for row in rows
    ]


def latest_version(root: Path) -> int | None:
    table = _log_table(root)
    if table is None:
        return None
    versions = delta_dataset(table, root / LOG).to_table(columns=["version"]).column("version")
    return None if len(versions) == 0 else int(pc.max(versions).as_py())


def resolve_snapshot(root: Path, version: int | None = None) -> Snapshot:
    """The snapshot of ``version`` (default: the latest). Raises VersionNotFoundError for unknown versions."""
    table = _log_table(root)
    if table is None:
        if version is None:
            return Snapshot.empty()
        raise VersionNotFoundError(version, None)
    log = delta_dataset(table, root / LOG).to_table()
    latest = int(pc.max(log.column("version")).as_py())
    wanted = latest if version is None else version
    if wanted < 0 or wanted > latest:
        raise VersionNotFoundError(wanted, latest)
    row = log.filter(pc.equal(log.column("version"), wanted)).to_pylist()
    if not row:
        raise VersionNotFoundError(wanted, latest)
    entry = row[0]
    return Snapshot(
        version=wanted,
        committed_at=entry["committed_at"],
        table_versions={name: int(entry[f"{name}_version"]) for name in TABLES},
    )
