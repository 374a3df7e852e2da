"""Sandboxed DuckDB over a pinned warehouse version.

The tables appear as views named after them, read through pyarrow datasets of one Delta
version each, so DuckDB streams them (projection and partition filters pushed down) and
never sees a half-written commit.

What a user's SQL may do (:func:`check_sql`, then the connection itself):

- One statement: a SELECT (including WITH, VALUES, DESCRIBE, SUMMARIZE, SHOW TABLES and
  UNPIVOT), or a PIVOT. DuckDB turns a PIVOT without an ``IN`` list into several statements
  (an ENUM type of the pivot values, then the SELECT); that one is let through only when no
  word of it starts another kind of statement (CREATE, INSERT, COPY, EXPLAIN, ...).
- Refused by name, in any case, quoted ("x" or `x`) or not, schema-qualified or not: calls of
  the functions in ``REFUSED_CALLS`` (they read files or URLs, run SQL text, reveal the machine
  or DuckDB's configuration, or change DuckDB's state), any name starting ``duckdb_`` or
  ``pragma_`` or naming ``pg_settings`` (DuckDB's own catalog of databases, settings, secrets,
  extensions, temporary files and memory), and SHOW of anything but TABLES (SHOW x reads
  setting x). The names come from DuckDB's tokenizer, so strings and comments never match.
- The connection underneath reads nothing but the views: no file system, no network, no
  extensions, and its configuration is locked, so a name the list misses still cannot escape.

Memory: DuckDB keeps its own buffers (hash tables, sorts) under ``memory_limit`` (1 GB for
``ew query``) and spills beyond it, but the values functions build (``repeat``, ``string_agg``,
long lists) fall outside that accounting: ``select repeat('x', 2000000000)`` alone peaked at
4 GB. So ``ew query`` runs under :func:`memory_cap`: the process's data segment (RLIMIT_DATA,
Linux) may grow by ``QUERY_MEMORY_CAP`` (2 GB) while the query runs; past it an allocation
fails and the query stops with "ran out of memory".

The ``log`` view lists the warehouse versions up to the pinned one (:func:`log_view`), one row
each: ``version`` (BIGINT), ``committed_at`` (TIMESTAMP WITH TIME ZONE), ``operation``
(VARCHAR: ingest, register-model, fit-head, ...), ``rows_added`` (BIGINT), ``detail`` (VARCHAR,
JSON text: ``detail::json ->> 'corpus'``) and ``pins`` (MAP(VARCHAR, BIGINT): the Delta version
of each table that version pins, -1 before the table existed; ``pins['embeddings']`` is what
``DeltaTable("WAREHOUSE/embeddings", version=...)`` opens).

Interrupts: the statement runs in a worker thread (DuckDB works without the GIL) while the
calling thread waits, so Ctrl-C and ``timeout`` reach it; both interrupt DuckDB at once.
"""
from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from .errors import QueryError, QueryRefusedError
from .tables import EMBEDDINGS, LOG_SCHEMA, fp16_vectors
from .versions import entries

DEFAULT_MEMORY_LIMIT = "1GB"
# How far `ew query` may grow its data segment: DuckDB's 1 GB of buffers, plus 1 GB for values
# DuckDB does not account and the result batches on their way out.
QUERY_MEMORY_CAP = 2 << 30

# Functions refused wherever they are called, by what they do: patterns matched against
# lowercased names. A few (getenv, sql_auto_complete) exist only in other DuckDB builds.
REFUSED_CALLS = {
    "reads files, URLs or raw memory": (
        "read_*", "*_scan", "parquet_*", "glob", "sniff_csv", "iceberg_*", "delta_*", "sqlite_*", "postgres_*",
    ),
    "runs SQL text": ("query", "query_table", "json_execute_serialized_sql", "json_serialize_plan"),
    "reveals the machine or DuckDB's configuration": (
        "current_setting", "which_secret", "getenv", "sql_auto_complete", "inet_*",
    ),
    "changes DuckDB's state": (
        "checkpoint", "force_checkpoint", "enable_logging", "disable_logging", "truncate_duckdb_logs", "write_log",
        "enable_profiling", "disable_profiling", "*external_resource*", "python_map_function",
    ),
}
# Names refused wherever they appear: DuckDB's catalog functions and views.
REFUSED_NAMES = ("duckdb_*", "pragma_*", "pg_settings")
# Words that start a statement other than a query: refused inside a PIVOT that DuckDB expands.
OTHER_STATEMENTS = frozenset(
    "alter analyze attach begin call checkpoint commit copy create deallocate delete describe detach drop execute "
    "explain export import insert install load merge pragma prepare reset rollback set show summarize truncate "
    "update use vacuum".split()
)
PIVOTS = frozenset({"pivot", "pivot_wider"})
ALLOWED_SHOW = frozenset({"tables", "all"})


@dataclass(frozen=True)
class QueryResult:
    """The result of one query: the warehouse version it read and its batches, streamed once.

    Reading to the end frees DuckDB; ``close()`` (or a ``with`` block) stops a query read only in part.
    """

    version: int
    reader: pa.RecordBatchReader
    stop: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return iter(self.reader)

    def read_all(self) -> pa.Table:
        return self.reader.read_all()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "QueryResult":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def sql_error_message(error: BaseException) -> str:
    """DuckDB's whole message on one line, hints included ("Did you mean ...", "Candidate bindings: ...").

    The echo of the SQL with a caret under the fault becomes "(line N)"; DuckDB's "Possible
    solutions" (SET statements a sandboxed query cannot run) are left out.
    """
    parts: list[str] = []
    for line in str(error).splitlines():
        text = line.strip()
        if not text or set(text) == {"^"}:
            continue
        if text.startswith("Possible solutions:"):
            break
        located = re.match(r"LINE (\d+):", text)
        parts.append(f"(line {located.group(1)})" if located else text)
    return " ".join(parts) or type(error).__name__


def check_sql(sql: str) -> str:
    """Return ``sql`` if it is one query the sandbox allows, or raise QueryRefusedError saying why not."""
    if not sql or not sql.strip():
        raise QueryRefusedError("the query is empty")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"the SQL does not parse: {sql_error_message(error)}") from None
    if len(statements) != 1:
        raise QueryRefusedError(f"found {len(statements)} statements, expected exactly one")
    words = _words(sql)
    kind = statements[0].type
    if kind == duckdb.StatementType.MULTI and PIVOTS & {word for word, _ in words}:
        starters = sorted(OTHER_STATEMENTS & {word for word, quoted in words if not quoted})
        if starters:
            raise QueryRefusedError(f"{starters[0].upper()} statements are not allowed")
    elif kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind))
        raise QueryRefusedError(f"{name} statements are not allowed")
    _check_names(words)
    return sql


def _words(sql: str) -> list[tuple[str, bool]]:
    """(lowercased name, was quoted) of each identifier and keyword, and "(" for an opening parenthesis."""
    tokens = duckdb.tokenize(sql)
    ends = [position for position, _ in tokens[1:]] + [len(sql)]
    words = []
    for (start, kind), end in zip(tokens, ends):
        text = sql[start:end].strip()
        if kind == duckdb.token_type.comment:
            continue
        if kind in (duckdb.token_type.identifier, duckdb.token_type.keyword):
            quoted = text[:1] in ('"', "`") and text[-1:] == text[:1]
            if quoted:
                text = text[1:-1].replace(text[0] * 2, text[0])
            words.append((text.lower(), quoted))
        elif kind == duckdb.token_type.operator and text.startswith("("):
            words.append(("(", False))
        else:
            words.append(("", False))
    return words


def _check_names(words: list[tuple[str, bool]]) -> None:
    for (word, quoted), (after, _) in zip(words, words[1:] + [("", False)]):
        if not word or word == "(":
            continue
        if any(fnmatch.fnmatchcase(word, pattern) for pattern in REFUSED_NAMES):
            raise QueryRefusedError(f"{word} reads DuckDB's own catalog and settings, not warehouse data")
        if after == "(":
            for reason, patterns in REFUSED_CALLS.items():
                if any(fnmatch.fnmatchcase(word, pattern) for pattern in patterns):
                    raise QueryRefusedError(f"{word}() {reason}")
        if word == "show" and not quoted and after not in ALLOWED_SHOW:
            raise QueryRefusedError("SHOW reads DuckDB's settings; use SHOW TABLES, or DESCRIBE a table")


def log_view(log: pa.Table, version: int) -> pa.Table:
    """The ``log`` view of warehouse version ``version``: the log rows up to it, pins as one map
    (rows written before the ``pins`` map existed read the same)."""
    rows = [
        {**entry.to_dict(), "committed_at": entry.committed_at, "detail": json.dumps(entry.detail),
         "pins": list(entry.pins.items())}
        for entry in entries(log) if entry.version <= version
    ]
    return pa.Table.from_pylist(rows, schema=LOG_SCHEMA)


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
        if name == EMBEDDINGS and "embedding_fp16" in dataset.schema.names:
            register_embeddings(con, dataset)
        else:
            con.register(name, dataset)
    con.execute("SET enable_progress_bar = false")  # ew's output is its own: no bar drawn over it
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def register_embeddings(con: duckdb.DuckDBPyConnection, dataset: pads.Dataset) -> None:
    """The ``embeddings`` view, whose ``embedding`` is every row's vector as FLOAT[], the fp16 ones decoded.

    DuckDB has no float16 type and no function that reads numbers out of a BLOB (a SQL macro
    over its bit strings took 19 s for 2,000 vectors), so ``ew_fp16_vector`` is a vectorized
    Python function, a batch of blobs at a time: reading 20,000 384-wide fp16 vectors this way
    took 0.32 s, as long as the same float32 ones. fp32 rows pass through the CASE untouched (a
    ``coalesce`` instead cost 35% more on a cosine scan of fp32 vectors). The table as stored is
    ``embeddings_stored``.
    """
    con.register("embeddings_stored", dataset)
    con.create_function("ew_fp16_vector", fp16_vectors, [duckdb.sqltypes.BLOB], duckdb.list_type(duckdb.sqltypes.FLOAT),
                        type="arrow", null_handling="special", side_effects=False)
    con.execute("CREATE OR REPLACE TEMP VIEW embeddings AS SELECT * REPLACE "
                "(CASE WHEN embedding_fp16 IS NULL THEN embedding ELSE ew_fp16_vector(embedding_fp16) END AS embedding) "
                "FROM embeddings_stored")


def run_query(
    sql: str,
    *,
    datasets: Mapping[str, pads.Dataset],
    version: int,
    batch_rows: int = 8192,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    timeout: float | None = None,
) -> QueryResult:
    """Check ``sql`` and return a streaming reader of its result over ``datasets`` (the tables of ``version``).

    With ``timeout`` (seconds), a query still running that long after the call is stopped with
    a QueryError. Ctrl-C stops DuckDB too, and raises KeyboardInterrupt.
    """
    check_sql(sql)
    worker = _QueryThread(connect(datasets, memory_limit=memory_limit), sql, batch_rows=batch_rows, timeout=timeout)
    schema = worker.next()  # errors of binding (unknown table, column, ...) raise here

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            while (batch := worker.next()) is not None:
                yield batch
        finally:
            worker.stop()

    return QueryResult(version=version, reader=pa.RecordBatchReader.from_batches(schema, batches()), stop=worker.stop)


class _QueryThread:
    """Runs one statement in a worker thread and hands its schema, then its batches, to the caller.

    Python runs signal handlers only in the main thread, between bytecodes: a main thread inside
    DuckDB never sees Ctrl-C. Here it waits on a queue instead, which a signal interrupts.
    """

    _DONE = object()

    def __init__(self, con: duckdb.DuckDBPyConnection, sql: str, *, batch_rows: int, timeout: float | None):
        self._con = con
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._items: queue.Queue = queue.Queue(maxsize=2)  # a batch ahead: DuckDB works while we write
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sql, batch_rows), name="ew-query", daemon=True)
        self._thread.start()

    def _run(self, sql: str, batch_rows: int) -> None:
        try:
            reader = self._con.sql(sql).to_arrow_reader(batch_rows)
            if self._put(reader.schema):
                for batch in reader:
                    if not self._put(batch):
                        return
                self._put(self._DONE)
        except BaseException as error:  # handed to the caller, who raises it
            self._put(error)

    def _put(self, item: object) -> bool:
        while not self._stopping.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        """The schema first, then each batch, then None; raises what the query raised."""
        try:
            item = self._wait()
        except BaseException:  # Ctrl-C or the timeout
            self.stop()
            raise
        if item is self._DONE:
            return None
        if isinstance(item, BaseException):
            self.stop()
            raise _query_error(item) from None
        return item

    def _wait(self) -> object:
        while True:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise QueryError(
                    f"the query did not finish within {self._timeout:g} s and was stopped; "
                    "give it more time with --timeout, or ask for less (a WHERE clause, a LIMIT, fewer joins)"
                )
            wait = 0.25 if self._deadline is None else min(0.25, max(0.0, self._deadline - time.monotonic()))
            try:
                return self._items.get(timeout=wait)
            except queue.Empty:
                continue

    def stop(self) -> None:
        """Interrupt DuckDB, wait for the worker, close the connection; safe to call twice."""
        self._stopping.set()
        while self._thread.is_alive():
            self._con.interrupt()  # again until it lands: between two batches there is nothing to interrupt
            self._thread.join(0.05)
        self._con.close()


def _query_error(error: BaseException) -> BaseException:
    if isinstance(error, duckdb.PermissionException):
        return QueryRefusedError(sql_error_message(error))
    if isinstance(error, (duckdb.OutOfMemoryException, MemoryError)):
        return QueryError(
            f"the query ran out of memory ({sql_error_message(error)}); `ew query` may use about "
            f"{QUERY_MEMORY_CAP >> 30} GB: ask for less (aggregate, filter, or build smaller values)"
        )
    if isinstance(error, duckdb.Error):
        return QueryError(f"the query failed: {sql_error_message(error)}")
    return error


@contextmanager
def memory_cap(extra_bytes: int = QUERY_MEMORY_CAP) -> Iterator[None]:
    """For the block, let this process's data segment grow by at most ``extra_bytes`` (Linux's RLIMIT_DATA).

    An allocation past it fails (DuckDB raises "out of memory") instead of growing without bound.
    Process-wide, so only the `ew query` command sets it; elsewhere (macOS, where RLIMIT_DATA does
    not cover mmap) it does nothing.
    """
    used = _data_segment_bytes()
    if used is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + extra_bytes
    for limit in (soft, hard):
        if limit != resource.RLIM_INFINITY:
            cap = min(cap, limit)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _data_segment_bytes() -> int | None:
    """VmData of this process (what RLIMIT_DATA counts), or None where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
