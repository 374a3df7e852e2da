"""Sandboxed DuckDB over a pinned warehouse version.

The tables appear as views named after them, read through pyarrow datasets of one Delta
version each, so DuckDB streams them (projection and partition filters pushed down) and
never sees a half-written commit. The connection can read nothing else: one SELECT
statement, no file system, no extensions, no network, configuration locked.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from .errors import QueryError, QueryRefusedError, first_line

DEFAULT_MEMORY_LIMIT = "1GB"


@dataclass(frozen=True)
class QueryResult:
    """The result of one query: the warehouse version it read and its batches, streamed once."""

    version: int
    reader: pa.RecordBatchReader

    def __iter__(self):
        return iter(self.reader)

    def read_all(self) -> pa.Table:
        return self.reader.read_all()


def check_sql(sql: str) -> str:
    """Return the one SELECT statement in ``sql``, or raise QueryRefusedError saying why not."""
    if not sql or not sql.strip():
        raise QueryRefusedError("the query is empty")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"the SQL does not parse: {first_line(error)}") from None
    if len(statements) != 1:
        raise QueryRefusedError(f"found {len(statements)} statements, expected exactly one")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind))
        raise QueryRefusedError(f"{name} statements are not allowed")
    return sql


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def connect(
    datasets: Mapping[str, pads.Dataset],
    *,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int | None = None,
    database: str = ":memory:",
    settings: dict[str, object] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB (in memory by default) with one view per entry of ``datasets``, then locked down.

    ``settings`` are further DuckDB settings for ew's own queries (never a user's).
    """
    con = duckdb.connect(
        database,
        config={
            "memory_limit": memory_limit,
            "threads": threads or usable_cores(),
            # Spill files of this user only; DuckDB creates the folder when it first spills.
            "temp_directory": os.path.join(tempfile.gettempdir(), f"ew-duckdb-{os.getuid()}"),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "python_enable_replacements": False,
            # Where DuckDB is built with jemalloc, hand freed memory back to the OS early (and in
            # the background): peak RSS, not only DuckDB's own limit, stays low. Builds on glibc
            # malloc ignore both.
            "allocator_flush_threshold": "32MB",
            "allocator_background_threads": True,
            **(settings or {}),
        },
    )
    for name, dataset in datasets.items():
        con.register(name, dataset)
    con.execute("SET enable_progress_bar = false")  # ew's output is its own: no bar drawn over it
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(
    sql: str,
    *,
    datasets: Mapping[str, pads.Dataset],
    version: int,
    batch_rows: int = 8192,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    timeout: float | None = None,
) -> QueryResult:
    """Check ``sql`` and return a streaming reader of its result over ``datasets`` (the tables of ``version``)."""
    check_sql(sql)
    con = connect(datasets, memory_limit=memory_limit)
    try:
        reader = con.sql(sql).to_arrow_reader(batch_rows)
    except duckdb.PermissionException as error:
        raise QueryRefusedError(first_line(error)) from None
    except duckdb.Error as error:
        raise QueryError(f"the query failed: {first_line(error)}") from None
    return QueryResult(version=version, reader=_keep_alive(reader, con))


def _keep_alive(reader: pa.RecordBatchReader, con: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
    """Tie the connection's lifetime to the reader's, and turn DuckDB errors mid-stream into QueryError."""

    def batches():
        try:
            for batch in reader:
                yield batch
        except duckdb.PermissionException as error:
            raise QueryRefusedError(first_line(error)) from None
        except duckdb.Error as error:
            raise QueryError(f"the query failed: {first_line(error)}") from None
        finally:
            con.close()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())
