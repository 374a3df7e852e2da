"""The warehouse: Delta tables plus the artifacts (models, heads) they refer to.

    wh = Warehouse.open("ew-warehouse")
    wh.query("select model, count(*) from embeddings group by all").reader.read_all()
    with wh.writer() as w:          # one writer at a time
        w.append_embeddings(rows)   # a Delta commit to one table
        w.commit("ingest", detail)  # the warehouse version that makes it visible

What a crash leaves: every table write is one atomic Delta commit, and a warehouse version
is the log row that pins them (see :mod:`warehouse.writer`). A writer killed between the two
leaves tables ahead of the log; the next writer settles that first (:meth:`Writer.settle`),
adopting the complete commits in a ``recover`` version, so no row stays hidden and none is
stored twice.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable

from .catalog import HeadRow, ModelRow
from .errors import EwError, StorageError, WarehouseNotFoundError, first_line
from .lock import LOCK_NAME
from .query import QueryResult, log_view, run_query
from .s3 import is_s3
from .storage import LocalStorage, Storage, open_storage
from .tables import DOCUMENTS, HEADS, LOG, LOG_SCHEMA, MODELS, SCHEMAS, TABLES, delta_dataset
from .versions import LogEntry, Snapshot, entries, snapshot_of
from .writer import Writer, now_utc

DEFAULT_PATH = "ew-warehouse"
ENV_VAR = "EW_WAREHOUSE"
MARKER = "ew-warehouse.json"
FORMAT = 1


def default_path() -> Path | str:
    location = os.environ.get(ENV_VAR) or DEFAULT_PATH
    return location if is_s3(location) else Path(location)


class Warehouse:
    """A warehouse. Open it with :meth:`open`; every read pins one version."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._created: str | None = None  # what open(create=True) made here: "root", "marker", or nothing

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, *, create: bool = False) -> "Warehouse":
        """Open the warehouse at ``path`` (default: $EW_WAREHOUSE or ./ew-warehouse).

        With ``create=True`` a missing warehouse is created; otherwise it is an error.
        """
        location = path if path is not None else default_path()
        storage = open_storage(location)
        if storage.exists(MARKER):
            return cls(storage)
        if not create:
            raise WarehouseNotFoundError(location if is_s3(location) else Path(location))
        made = None if not isinstance(storage, LocalStorage) else "marker" if storage.root.exists() else "root"
        storage.create(MARKER, json.dumps({"format": FORMAT, "created_at": now_utc().isoformat()}) + "\n")
        warehouse = cls(storage)
        warehouse._created = made
        return warehouse

    @contextmanager
    def discarded_if_failed(self) -> Iterator[None]:
        """If the block fails and :meth:`open` created this warehouse, and no document was stored,
        remove it again: a failed first ingest (every line bad, a model not found) leaves no empty
        warehouse behind. Only ew's own files go (not ``rejects/``); a directory that existed
        before, or holds anything else, stays."""
        try:
            yield
        except BaseException:
            if self._created is not None and self.is_local:
                self._discard()
            raise

    def _discard(self) -> None:
        try:
            if self._open_delta(DOCUMENTS) is not None:
                return
            for entry in self.root.iterdir():
                if entry.name not in (MARKER, LOCK_NAME, "artifacts", LOG, *TABLES):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            if self._created == "root" and not any(self.root.iterdir()):
                self.root.rmdir()
        except (OSError, EwError):  # the error being raised is the one to report
            pass

    # -- paths ---------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """Where the warehouse is, as a user wrote it: a directory or ``s3://bucket/prefix``."""
        return self.storage.uri

    @property
    def is_local(self) -> bool:
        return isinstance(self.storage, LocalStorage)

    def require_local(self, what: str) -> None:
        """Fail with a clear message for a feature that needs the warehouse on local disk."""
        if not self.is_local:
            raise EwError(f"{what} needs a warehouse on local disk; {self.uri} is on object storage: "
                          "use a local warehouse for it")

    @property
    def root(self) -> Path:
        """The local directory of a warehouse on local disk (tests and benchmarks look inside it)."""
        self.require_local("reading the warehouse's files directly")
        return self.storage.root

    def artifact_path(self, relative: str) -> Path:
        """A local directory with the files of the artifact ``relative`` (a models/heads row's
        ``artifact``); on an object store, a checked copy in the local cache. It does not exist
        when the warehouse holds no complete artifact there."""
        return self.storage.artifact_path(relative)

    def model_artifact(self, model_key: str) -> str:
        """Where the artifact of ``model_key`` is stored, relative to the warehouse."""
        return f"artifacts/models/{model_key}"

    def heads_dir(self) -> Path:
        return self.root / "artifacts" / "heads"

    # -- reading -------------------------------------------------------------------
    def _open_delta(self, table: str, version: int | None = None) -> DeltaTable | None:
        """The Delta table (at ``version``, default newest), None if it was never created."""
        uri = self.storage.table_uri(table)
        options = self.storage.storage_options
        try:
            if not self.storage.is_table(table):
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
            raise damaged_table(table, error) from None

    def _read(self, dataset: pads.Dataset, table: str, **options) -> pa.Table:
        try:
            return dataset.to_table(**options)
        except (OSError, pa.ArrowException) as error:
            raise damaged_table(table, error) from None

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
        """Run one sandboxed, read-only SELECT pinned to ``version``; the result streams.

        The views: the tables, and ``log`` (the versions up to the pinned one; see :func:`warehouse.query.log_view`).
        """
        log = self._log()
        snapshot = snapshot_of(log, version)
        datasets = {**self.datasets(snapshot), LOG: pads.dataset(log_view(log, snapshot.version))}
        return run_query(sql, datasets=datasets, version=snapshot.version, batch_rows=batch_rows, **options)

    def training_set(self, *, label: str, **options) -> pa.RecordBatchReader:
        """(doc_hash, label, split, embedding) batches of the labelled vectors; see :func:`warehouse.training_set.training_set`."""
        from .training_set import training_set

        return training_set(self, label=label, **options)

    # -- writing -------------------------------------------------------------------
    @contextmanager
    def writer(self, *, wait: float = 0.0) -> Iterator["Writer"]:
        """Take the write lock (waiting up to ``wait`` seconds for another writer) and settle what
        a crashed writer left; the block's table writes become visible at ``Writer.commit``."""
        with self.storage.lock(wait=wait) as hold:
            writer = Writer(self, hold=hold)
            writer.settle()
            yield writer


def damaged_table(table: str, error: BaseException) -> StorageError:
    """The one error for a table whose files cannot be read, pointing at `ew verify`."""
    # pyarrow raises FileNotFoundError(path) for a data file the Delta log lists but the disk lacks.
    detail = f"{error} is missing" if type(error) is FileNotFoundError and not error.filename else first_line(error)
    return StorageError(
        f"cannot read the {table} table ({detail}); a data file is missing or damaged: "
        "run `ew verify` to see what is wrong"
    )


