"""ew's storage layer: versioned Delta tables keyed by document hash and model/layer."""
from .errors import (
    EwError,
    LockLostError,
    QueryError,
    QueryRefusedError,
    SelectionError,
    StorageError,
    VersionNotFoundError,
    VersionVacuumedError,
    WarehouseLockedError,
    WarehouseNotFoundError,
)
from .keys import doc_hash, fingerprint, model_key
from .query import QueryResult, check_sql, run_query
from .store import Warehouse, Writer
from .versions import LogEntry, Snapshot

__all__ = [
    "EwError",
    "LockLostError",
    "LogEntry",
    "QueryError",
    "QueryRefusedError",
    "QueryResult",
    "SelectionError",
    "Snapshot",
    "StorageError",
    "VersionNotFoundError",
    "VersionVacuumedError",
    "Warehouse",
    "WarehouseLockedError",
    "WarehouseNotFoundError",
    "Writer",
    "check_sql",
    "doc_hash",
    "fingerprint",
    "model_key",
    "run_query",
]
