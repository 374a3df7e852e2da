"""The warehouse: a directory of Delta tables plus the artifacts (models, heads) they refer to.

    wh = Warehouse.open("ew-warehouse")
    wh.query("select model, count(*) from embeddings group by all").read_all()  # a QueryResult
    with wh.writer() as w:          # one writer at a time
        w.append_embeddings(rows)   # a Delta commit to one table
        w.commit("ingest", detail)  # the warehouse version that makes it visible
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake

from .errors import EwError, WarehouseNotFoundError, first_line
from .lock import write_lock
from .query import QueryResult, run_query
from .tables import (
    delta_dataset,
    DOCUMENTS,
    EMBEDDINGS,
    HEADS,
    LOG,
    LOG_SCHEMA,
    MODELS,
    PARTITIONS,
    SCHEMAS,
    TABLES,
)
from .versions import LogEntry, Snapshot, latest_version, read_log, resolve_snapshot

DEFAULT_PATH = "ew-warehouse"
ENV_VAR = "EW_WAREHOUSE"
MARKER = "ew-warehouse.json"
FORMAT = 1


# Every version must stay readable: delta-rs would otherwise delete log files older than
# 30 days at each checkpoint, and time travel to those versions would break.
TABLE_CONFIGURATION = {"delta.enableExpiredLogCleanup": "false"}


# Float vectors gain nothing from dictionaries (the writer tries one, then falls back, and the
# file keeps both); without them and with ZSTD a vector takes ~0.95 of its raw 4 x dim bytes.
# Row groups of at most VECTOR_ROW_GROUP rows (~12 MB of 384-wide vectors): readers hold one
# row group at a time, so a large append does not become one huge unit of reading.
VECTOR_ROW_GROUP = 8192
VECTOR_FILES = WriterProperties(
    compression="ZSTD", max_row_group_size=VECTOR_ROW_GROUP,
    default_column_properties=ColumnProperties(dictionary_enabled=False),
)


def default_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class Warehouse:
    """A warehouse directory. Open it with :meth:`open`; every read pins one version."""

    def __init__(self, root: Path):
        self.root = root

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, *, create: bool = False) -> "Warehouse":
        """Open the warehouse at ``path`` (default: $EW_WAREHOUSE or ./ew-warehouse).

        With ``create=True`` a missing warehouse is created; otherwise it is an error.
        """
        root = Path(path) if path is not None else default_path()
        marker = root / MARKER
        if marker.is_file():
            return cls(root.resolve())
        if not create:
            raise WarehouseNotFoundError(root)
        if root.exists() and any(root.iterdir()):
            raise EwError(
                f"{root} exists and is not an ew warehouse (no {MARKER}); "
                "choose an empty or new directory for --warehouse"
            )
        root.mkdir(parents=True, exist_ok=True)
        temporary = root / f".{MARKER}.tmp"
        temporary.write_text(json.dumps({"format": FORMAT, "created_at": now_utc().isoformat()}) + "\n")
        os.replace(temporary, marker)
        return cls(root.resolve())

    # -- paths ---------------------------------------------------------------------
    def table_path(self, table: str) -> Path:
        return self.root / table

    def model_dir(self, model_key: str) -> Path:
        return self.root / "artifacts" / "models" / model_key

    def head_dir(self, name: str) -> Path:
        return self.root / "artifacts" / "heads" / name

    # -- reading -------------------------------------------------------------------
    def latest_version(self) -> int | None:
        return latest_version(self.root)

    def snapshot(self, version: int | None = None) -> Snapshot:
        return resolve_snapshot(self.root, version)

    def log(self) -> list[LogEntry]:
        """Every version, oldest first."""
        return read_log(self.root)

    def delta_table(self, table: str, snapshot: Snapshot) -> DeltaTable | None:
        table_version = snapshot.table_versions.get(table, -1)
        if table_version < 0:
            return None
        try:
            return DeltaTable(str(self.table_path(table)), version=table_version)
        except Exception as error:  # deltalake raises its own errors for a missing log or version
            raise EwError(
                f"cannot read version {table_version} of the {table} table for warehouse version {snapshot.version} "
                f"({first_line(error)}); its Delta log may have been cleaned up or damaged"
            ) from None

    def dataset(self, table: str, snapshot: Snapshot) -> pads.Dataset:
        """A pyarrow dataset of ``table`` as ``snapshot`` pins it (an empty one before the table exists)."""
        delta = self.delta_table(table, snapshot)
        if delta is None:
            return pads.dataset(SCHEMAS[table].empty_table())
        return delta_dataset(delta, self.table_path(table))

    def current_dataset(self, table: str) -> pads.Dataset:
        """The table's newest Delta version, including writes no warehouse version points at yet.

        Only writers use this, under the write lock, to never store a row twice.
        """
        path = str(self.table_path(table))
        if not DeltaTable.is_deltatable(path):
            return pads.dataset(SCHEMAS[table].empty_table())
        return delta_dataset(DeltaTable(path), self.table_path(table))

    def datasets(self, snapshot: Snapshot) -> dict[str, pads.Dataset]:
        """Every table as ``snapshot`` pins it, by name: what DuckDB sees in ``connect``."""
        return {table: self.dataset(table, snapshot) for table in TABLES}

    def query(
        self, sql: str, *, version: int | None = None, batch_rows: int = 8192, timeout: float | None = None
    ) -> QueryResult:
        """Run one sandboxed, read-only SELECT pinned to ``version`` (default latest); streams its result."""
        snapshot = self.snapshot(version)
        return run_query(sql, datasets=self.datasets(snapshot), version=snapshot.version,
                         batch_rows=batch_rows, timeout=timeout)

    # -- writing -------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator["Writer"]:
        """Take the write lock; the block's table writes become visible at ``Writer.commit``."""
        with write_lock(self.root):
            yield Writer(self)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns in its order: missing ones null, others cast."""
    columns = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        column = batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, field.type)
        columns.append(column if column.type == field.type else column.cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


@dataclass
class Writer:
    """Writes Delta commits under the warehouse's write lock.

    Each method is one atomic Delta commit to one table; :meth:`commit` then appends the log
    row that pins every table's version. Until then readers of the warehouse do not see them.
    """

    warehouse: Warehouse
    rows_added: int = 0

    def _write(self, table: str, data: pa.Table) -> None:
        path = str(self.warehouse.table_path(table))
        write_deltalake(
            path,
            data,
            mode="append",
            partition_by=PARTITIONS[table] or None,
            schema_mode="merge",
            configuration=None if DeltaTable.is_deltatable(path) else TABLE_CONFIGURATION,
            writer_properties=VECTOR_FILES if table == EMBEDDINGS else None,
        )
        self.rows_added += data.num_rows

    def append_embeddings(self, rows: pa.Table) -> int:
        """Append embedding rows (caller guarantees none is stored yet, under this lock)."""
        if rows.num_rows:
            self._write(EMBEDDINGS, rows.cast(SCHEMAS[EMBEDDINGS]))
        return rows.num_rows

    def upsert_documents(self, rows: pa.Table) -> int:
        """Insert new (corpus, id) rows and replace changed ones; one Delta commit per corpus.

        New rows are appended. When some rows replace stored ones, the corpus's partition is
        rewritten in one overwrite commit (streamed: the stored rows minus the replaced ids,
        then the given rows), so a changed record replaces its whole row: fields it no longer
        has become null. (Delta's MERGE would do the same but writes Parquet files with Arrow
        view types that pyarrow's dataset filters cannot read.)
        """
        if not rows.num_rows:
            return 0
        path = str(self.warehouse.table_path(DOCUMENTS))
        if not DeltaTable.is_deltatable(path):
            self._write(DOCUMENTS, rows)
            return rows.num_rows
        for corpus in pc.unique(rows.column("corpus")).to_pylist():
            part = rows.filter(pc.equal(rows.column("corpus"), corpus))
            self._upsert_corpus(path, corpus, part)
        return rows.num_rows

    def _upsert_corpus(self, path: str, corpus: str, rows: pa.Table) -> None:
        stored = delta_dataset(DeltaTable(path), Path(path))
        in_corpus = pc.field("corpus") == corpus
        stored_ids = stored.to_table(columns=["id"], filter=in_corpus).column("id")
        replaced = pc.is_in(rows.column("id"), value_set=stored_ids.combine_chunks())
        if not pc.any(replaced).as_py():
            self._write(DOCUMENTS, rows)
            return
        schema = pa.unify_schemas([stored.schema, rows.schema], promote_options="permissive")
        keep = pc.invert(pc.is_in(pc.field("id"), value_set=rows.column("id").combine_chunks()))

        def batches():
            for batch in stored.to_batches(filter=in_corpus & keep):
                if batch.num_rows:
                    yield conform(batch, schema)
            for batch in rows.to_batches():
                yield conform(batch, schema)

        escaped = corpus.replace("'", "''")
        write_deltalake(
            path,
            pa.RecordBatchReader.from_batches(schema, batches()),
            mode="overwrite",
            predicate=f"corpus = '{escaped}'",
            partition_by=PARTITIONS[DOCUMENTS],
            schema_mode="merge",
        )
        self.rows_added += rows.num_rows

    def register_model(self, row: dict) -> None:
        self._write(MODELS, pa.Table.from_pylist([row], schema=SCHEMAS[MODELS]))

    def add_head(self, row: dict) -> None:
        self._write(HEADS, pa.Table.from_pylist([row], schema=SCHEMAS[HEADS]))

    def commit(self, operation: str, detail: dict | None = None) -> int:
        """Append the log row that makes every write so far visible; returns the new version."""
        root = self.warehouse.root
        previous = latest_version(root)
        version = 0 if previous is None else previous + 1
        row = {
            "version": version,
            "committed_at": now_utc(),
            "operation": operation,
            "rows_added": self.rows_added,
            "detail": json.dumps(detail or {}, sort_keys=True, default=str),
        }
        for name in TABLES:
            path = str(self.warehouse.table_path(name))
            row[f"{name}_version"] = DeltaTable(path).version() if DeltaTable.is_deltatable(path) else -1
        log_path = str(root / LOG)
        write_deltalake(
            log_path,
            pa.Table.from_pylist([row], schema=LOG_SCHEMA),
            mode="append",
            configuration=None if DeltaTable.is_deltatable(log_path) else TABLE_CONFIGURATION,
        )
        self.rows_added = 0
        return version
