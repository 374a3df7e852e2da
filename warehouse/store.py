"""The warehouse: Delta tables plus the artifacts (models, heads) they refer to.

    wh = Warehouse.open("ew-warehouse")
    wh.query("select model, count(*) from embeddings group by all").reader.read_all()
    with wh.writer() as w:          # one writer at a time
        w.append_embeddings(rows)   # a Delta commit to one table
        w.commit("ingest", detail)  # the warehouse version that makes it visible

What a crash leaves: every table write is one atomic Delta commit, and a warehouse version
is the log row that pins them. A writer killed between the two leaves tables ahead of the
log; the next writer settles that first (:meth:`Writer.settle`), adopting the complete
commits in a ``recover`` version, so no row stays hidden and none is stored twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake

from .catalog import HeadRow, ModelRow
from .errors import EwError, StorageError, WarehouseNotFoundError, first_line
from .query import QueryResult, run_query
from .storage import LocalStorage
from .tables import (
    DOCUMENTS, EMBEDDINGS, HEADS, LOG, LOG_SCHEMA, MODELS, PARTITIONS, SCHEMAS, TABLES, TOKEN_STATES, delta_dataset,
)
from .versions import LogEntry, Snapshot, entries, snapshot_of

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


def default_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class Warehouse:
    """A warehouse. Open it with :meth:`open`; every read pins one version."""

    def __init__(self, storage: LocalStorage):
        self.storage = storage

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, *, create: bool = False) -> "Warehouse":
        """Open the warehouse at ``path`` (default: $EW_WAREHOUSE or ./ew-warehouse).

        With ``create=True`` a missing warehouse is created; otherwise it is an error.
        """
        root = Path(path) if path is not None else default_path()
        marker = root / MARKER
        if marker.is_file():
            return cls(LocalStorage(root))
        if not create:
            raise WarehouseNotFoundError(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise EwError(
                f"{root} exists and is not an ew warehouse (no {MARKER}); "
                "choose an empty or new directory for --warehouse"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            temporary = root / f".{MARKER}.tmp"
            temporary.write_text(json.dumps({"format": FORMAT, "created_at": now_utc().isoformat()}) + "\n")
            os.replace(temporary, marker)
        except OSError as error:
            raise StorageError(f"cannot create a warehouse at {root} ({error.strerror}); choose a writable directory") from None
        return cls(LocalStorage(root))

    # -- paths ---------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The local directory of the warehouse (artifacts live below it)."""
        return self.storage.root

    def model_dir(self, model_key: str) -> Path:
        return self.root / "artifacts" / "models" / model_key

    def heads_dir(self) -> Path:
        return self.root / "artifacts" / "heads"

    # -- reading -------------------------------------------------------------------
    def _open_delta(self, table: str, version: int | None = None) -> DeltaTable | None:
        """The Delta table (at ``version``, default newest), None if it was never created."""
        uri = self.storage.table_uri(table)
        options = self.storage.storage_options
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=options):
                return None
            return DeltaTable(uri, version=version, storage_options=options)
        except Exception as error:  # deltalake raises its own errors (and panics) for a damaged log
            which = "the newest version" if version is None else f"version {version}"
            raise StorageError(
                f"cannot read {which} of the {table} table at {uri} ({first_line(error)}); its Delta log is "
                "missing or damaged: run `ew verify` to see what is wrong"
            ) from None

    def _log(self) -> pa.Table:
        table = self._open_delta(LOG)
        if table is None:
            return LOG_SCHEMA.empty_table()
        return self._read(self._delta_dataset(table, LOG), LOG)

    def _delta_dataset(self, delta: DeltaTable, table: str) -> pads.Dataset:
        try:
            return delta_dataset(delta, self.storage, table)
        except (OSError, pa.ArrowException) as error:  # pyarrow looks at every file as it lists them
            raise _damaged_table(table, error) from None

    def _read(self, dataset: pads.Dataset, table: str, **options) -> pa.Table:
        try:
            return dataset.to_table(**options)
        except (OSError, pa.ArrowException) as error:
            raise _damaged_table(table, error) from None

    def latest_version(self) -> int | None:
        log = self._log()
        return None if log.num_rows == 0 else int(pc.max(log.column("version")).as_py())

    def snapshot(self, version: int | None = None) -> Snapshot:
        """The tables as warehouse version ``version`` (default: the latest) pins them."""
        return snapshot_of(self._log(), version)

    def log(self) -> list[LogEntry]:
        """Every version, oldest first."""
        return entries(self._log())

    def delta_table(self, table: str, snapshot: Snapshot) -> DeltaTable | None:
        table_version = snapshot.table_versions.get(table, -1)
        return None if table_version < 0 else self._open_delta(table, table_version)

    def dataset(self, table: str, snapshot: Snapshot) -> pads.Dataset:
        """A pyarrow dataset of ``table`` as ``snapshot`` pins it (an empty one before the table exists)."""
        delta = self.delta_table(table, snapshot)
        if delta is None:
            return pads.dataset(SCHEMAS[table].empty_table())
        return self._delta_dataset(delta, table)

    def datasets(self, snapshot: Snapshot) -> dict[str, pads.Dataset]:
        """Every pinned table of ``snapshot``, by name."""
        return {table: self.dataset(table, snapshot) for table in TABLES}

    def current_dataset(self, table: str) -> pads.Dataset:
        """The table's newest Delta version. Only writers use this, under the write lock,
        after :meth:`Writer.settle` has made it the one the latest warehouse version pins."""
        delta = self._open_delta(table)
        if delta is None:
            return pads.dataset(SCHEMAS[table].empty_table())
        return self._delta_dataset(delta, table)

    def current_versions(self) -> dict[str, int]:
        """The newest Delta version of every table (-1: not created yet)."""
        versions = {}
        for table in TABLES:
            delta = self._open_delta(table)
            versions[table] = -1 if delta is None else delta.version()
        return versions

    def models(self, *, version: int | None = None) -> list[ModelRow]:
        """The registered models at ``version`` (default latest), oldest first."""
        rows = self._read(self.dataset(MODELS, self.snapshot(version)), MODELS).to_pylist()
        return sorted((ModelRow.from_dict(row) for row in rows), key=lambda row: row.created_at)

    def heads(self, *, version: int | None = None) -> list[HeadRow]:
        """The registered heads at ``version`` (default latest), oldest first."""
        rows = self._read(self.dataset(HEADS, self.snapshot(version)), HEADS).to_pylist()
        return sorted((HeadRow.from_dict(row) for row in rows), key=lambda row: row.created_at)

    def query(self, sql: str, *, version: int | None = None, batch_rows: int = 8192, **options) -> QueryResult:
        """Run one sandboxed, read-only SELECT pinned to ``version``; the result streams."""
        snapshot = self.snapshot(version)
        return run_query(sql, datasets=self.datasets(snapshot), version=snapshot.version, batch_rows=batch_rows, **options)

    def training_set(self, *, label: str, **options) -> pa.RecordBatchReader:
        """(doc_hash, label, split, embedding) batches of the labelled vectors; see :func:`warehouse.training_set.training_set`."""
        from .training_set import training_set

        return training_set(self, label=label, **options)

    # -- writing -------------------------------------------------------------------
    @contextmanager
    def writer(self, *, wait: float = 0.0) -> Iterator["Writer"]:
        """Take the write lock (waiting up to ``wait`` seconds for another writer) and settle what
        a crashed writer left; the block's table writes become visible at ``Writer.commit``."""
        with self.storage.lock(wait=wait):
            writer = Writer(self)
            writer.settle()
            yield writer


def _damaged_table(table: str, error: BaseException) -> StorageError:
    # pyarrow raises FileNotFoundError(path) for a data file the Delta log lists but the disk lacks.
    detail = f"{error} is missing" if type(error) is FileNotFoundError and not error.filename else first_line(error)
    return StorageError(
        f"cannot read the {table} table ({detail}); a data file is missing or damaged: "
        "run `ew verify` to see what is wrong"
    )


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

    def __init__(self, warehouse: Warehouse):
        self.warehouse = warehouse
        self.rows_added = 0
        #: Rows of an interrupted writer that :meth:`settle` made visible (0: nothing to settle).
        self.recovered_rows = 0

    def _delta_write(self, table: str, data, **options) -> None:
        storage = self.warehouse.storage
        uri = storage.table_uri(table)
        try:
            exists = DeltaTable.is_deltatable(uri, storage_options=storage.storage_options)
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
        """Append embedding rows (caller guarantees none is stored yet, under this lock)."""
        if rows.num_rows:
            self._write(EMBEDDINGS, rows.cast(SCHEMAS[EMBEDDINGS]))
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
