"""Writing a warehouse: one Delta commit per table write, one log row per warehouse version.

A :class:`Writer` exists only under the warehouse's write lock (``Warehouse.writer()``). Each
of its table methods is one atomic Delta commit; :meth:`Writer.commit` appends the log row
that pins every table's version, and until then readers do not see them. A writer killed
between the two leaves tables ahead of the log: :meth:`Writer.settle` (run when the next
writer opens) adopts those complete commits in a ``recover`` version.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake

from .catalog import HeadRow, ModelRow
from .errors import StorageError, first_line
from .tables import DOCUMENTS, EMBEDDINGS, HEADS, LOG, LOG_SCHEMA, MODELS, PARTITIONS, SCHEMAS, TABLES, TOKEN_STATES

if TYPE_CHECKING:
    from .lock import Hold
    from .store import Warehouse


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


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
# Token states are ~70 KB a row (MiniLM, ~100 tokens, fp16): row groups of STATES_ROW_GROUP rows
# (~18 MB) keep a streaming reader's unit small. No statistics on the blobs: their min/max
# would only bloat the files and the Delta log.
STATES_ROW_GROUP = 256
STATES_FILES = WriterProperties(
    compression="ZSTD", max_row_group_size=STATES_ROW_GROUP,
    default_column_properties=ColumnProperties(dictionary_enabled=False),
    column_properties={"states": ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")},
)
WRITER_PROPERTIES = {EMBEDDINGS: VECTOR_FILES, TOKEN_STATES: STATES_FILES}



def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns in its order: missing ones null, others cast."""
    columns = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        column = batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, field.type)
        columns.append(column if column.type == field.type else column.cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _is_failure(error: BaseException) -> bool:
    """An error of a write to report: any Exception, and the Rust panics deltalake raises on a
    full disk (pyo3's PanicException derives from BaseException), but not Ctrl-C or exit."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


class Writer:
    """Writes Delta commits under the warehouse's write lock.

    Each method is one atomic Delta commit to one table; :meth:`commit` then appends the log
    row that pins every table's version. Until then readers of the warehouse do not see them.
    """

    def __init__(self, warehouse: Warehouse, *, hold: Hold | None = None):
        self.warehouse = warehouse
        self.hold = hold  # the write lock: checked before each commit (an object lock can be lost)
        self.rows_added = 0
        #: Rows of an interrupted writer that :meth:`settle` made visible (0: nothing to settle).
        self.recovered_rows = 0

    def _delta_write(self, table: str, data, **options) -> None:
        storage = self.warehouse.storage
        uri = storage.table_uri(table)
        try:
            exists = storage.is_table(table)
            write_deltalake(
                uri, data, partition_by=PARTITIONS[table] or None, schema_mode="merge",
                configuration=None if exists else TABLE_CONFIGURATION, storage_options=storage.storage_options,
                **options,
            )
        except BaseException as error:
            if not _is_failure(error):
                raise
            raise StorageError(
                f"writing to the {table} table failed ({first_line(error)}); the warehouse stays at its last "
                "version: check free space and permissions, then run the command again"
            ) from None

    def _write(self, table: str, data: pa.Table) -> None:
        self._delta_write(table, data, mode="append", writer_properties=WRITER_PROPERTIES.get(table))
        self.rows_added += data.num_rows

    def append_embeddings(self, rows: pa.Table) -> int:
        """Append embedding rows (caller guarantees none is stored yet, under this lock); a vector
        column the rows lack (``embedding_fp16`` of fp32 rows) is written null."""
        if rows.num_rows:
            schema = SCHEMAS[EMBEDDINGS]
            self._write(EMBEDDINGS, pa.Table.from_batches([conform(b, schema) for b in rows.to_batches()], schema))
        return rows.num_rows

    def append_token_states(self, rows: pa.Table) -> int:
        """Append ``token_states`` rows (caller guarantees none is stored yet, under this lock)."""
        if rows.num_rows:
            self._write(TOKEN_STATES, rows.cast(SCHEMAS[TOKEN_STATES]))
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
        for corpus in pc.unique(rows.column("corpus")).to_pylist():
            self._upsert_corpus(corpus, rows.filter(pc.equal(rows.column("corpus"), corpus)))
        return rows.num_rows

    def _upsert_corpus(self, corpus: str, rows: pa.Table) -> None:
        stored = self.warehouse.current_dataset(DOCUMENTS)
        in_corpus = pc.field("corpus") == corpus
        stored_ids = self.warehouse._read(stored, DOCUMENTS, columns=["id"], filter=in_corpus).column("id").combine_chunks()
        if not pc.any(pc.is_in(rows.column("id"), value_set=stored_ids)).as_py():
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
        self._delta_write(DOCUMENTS, pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite",
                          predicate=f"corpus = '{escaped}'")
        self.rows_added += rows.num_rows

    def register_model(self, row: ModelRow) -> None:
        self._write(MODELS, row.table())

    def add_head(self, row: HeadRow) -> None:
        self._write(HEADS, row.table())

    def remove_head(self, name: str) -> None:
        """Delete the ``heads`` row of ``name`` (its artifact stays for older versions until a vacuum)."""
        delta = self.warehouse._open_delta(HEADS)
        if delta is None:
            return
        escaped = name.replace("'", "''")
        try:
            delta.delete(f"head = '{escaped}'")
        except Exception as error:
            raise StorageError(f"removing head {name!r} failed ({first_line(error)}); run the command again") from None

    def remove_corpus(self, corpus: str) -> int:
        """Delete every ``documents`` row of ``corpus`` in one Delta commit (whole partition files
        leave the table; they stay on disk for older versions until a vacuum); returns the rows deleted."""
        delta = self.warehouse._open_delta(DOCUMENTS)
        if delta is None:
            return 0
        escaped = corpus.replace("'", "''")
        try:
            metrics = delta.delete(f"corpus = '{escaped}'")
        except BaseException as error:
            if not _is_failure(error):
                raise
            raise StorageError(f"removing corpus {corpus!r} failed ({first_line(error)}); the warehouse stays at its "
                               "last version: run the command again") from None
        return int(metrics.get("num_deleted_rows") or 0)

    def compact(self, table: str, *, target_size: int) -> dict:
        """Rewrite the small files of each partition of ``table`` into files of about ``target_size``
        bytes: one Delta commit that removes them and adds the new ones with the same rows (in the
        same order), so older Delta versions still read the old files. Returns deltalake's metrics."""
        delta = self.warehouse._open_delta(table)
        if delta is None:
            return {}
        try:
            return delta.optimize.compact(target_size=target_size, writer_properties=WRITER_PROPERTIES.get(table))
        except BaseException as error:
            if not _is_failure(error):
                raise
            raise StorageError(
                f"compacting the {table} table failed ({first_line(error)}); the warehouse stays at its last version: "
                "check free space, then run `ew compact` again"
            ) from None

    def settle(self) -> int | None:
        """Adopt table commits that no warehouse version pins yet (a writer killed before its
        log commit) in a ``recover`` version; returns that version, or None when all was pinned.

        Each table commit is complete on its own (Delta commits are atomic, and ingest writes
        embeddings and token states before the documents that use them), so adopting them is always consistent.
        """
        pinned = self.warehouse.snapshot().table_versions
        current = self.warehouse.current_versions()
        ahead = {table: (pinned[table], current[table]) for table in TABLES if current[table] > pinned[table]}
        if not ahead:
            return None
        for table, (old, new) in ahead.items():
            self.rows_added += _rows_added(self.warehouse._open_delta(table), old, new)
        self.recovered_rows = self.rows_added
        detail = {"adopted": {table: {"from": old, "to": new} for table, (old, new) in ahead.items()},
                  "reason": "commits of an interrupted writer"}
        return self.commit("recover", detail)

    def commit(self, operation: str, detail: dict | None = None) -> int:
        """Append the log row that makes every write so far visible; returns the new version."""
        if self.hold is not None:
            self.hold.check()
        previous = self.warehouse.latest_version()
        version = 0 if previous is None else previous + 1
        row = {
            "version": version,
            "committed_at": now_utc(),
            "operation": operation,
            "rows_added": self.rows_added,
            "detail": json.dumps(detail or {}, sort_keys=True, default=str),
            "pins": list(self.warehouse.current_versions().items()),
        }
        self._delta_write(LOG, pa.Table.from_pylist([row], schema=LOG_SCHEMA), mode="append")
        self.rows_added = 0
        return version


def _rows_added(delta: DeltaTable, old: int, new: int) -> int:
    """Rows the commits old+1..new of a Delta table added, from its history's metrics."""
    added = 0
    for commit in delta.history():
        if old < commit.get("version", -1) <= new:
            added += int((commit.get("operationMetrics") or {}).get("num_added_rows") or 0)
    return added
