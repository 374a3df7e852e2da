"""Is the warehouse whole? The table half of `ew verify` (pipelines.integrity adds the models and heads).

    report = check_tables(Warehouse.open("ew-warehouse"), deep=True)
    report.ok, [problem.line() for problem in report.problems]

What it checks, at the latest warehouse version (the log row that pins every table):

- each table's Delta log opens at its pinned version; when it does not, which commit file
  (``_delta_log/NNN.json``) is truncated, garbled or missing;
- every live Parquet file exists, its footer reads, and its row count is the one the Delta
  log recorded for it (``numRecords``);
- no table is ahead of the log (commits of an interrupted writer, which the next writer adopts),
  and no version of the log pins a Delta version its table does not have;
- with ``deep``, every row (:mod:`warehouse.row_checks`): unique keys, vector widths and layers
  that agree with the ``models`` table, and ``doc_hash`` = :func:`warehouse.keys.doc_hash` of the text.

Nothing is raised for what it finds: each finding is a :class:`Problem` saying what, where
and what to do.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from .errors import StorageError, first_line
from .problems import RESTORE, Problem, VerifyReport, counted
from .row_checks import check_rows
from .store import Warehouse
from .tables import LOG, TABLES
from .versions import Snapshot, snapshot_of
from .versions import entries as log_entries


WRITERS = "`ew ingest`, `ew fit-head`, `ew heads rm`, `ew compact`, `ew vacuum` or `ew rm`"


def check_tables(warehouse: Warehouse, *, deep: bool = False) -> VerifyReport:
    """Check every table as the latest warehouse version pins it (and, with ``deep``, every row)."""
    started = time.perf_counter()
    check = _TableCheck(warehouse)
    snapshot = check.log()
    for table in TABLES:
        pinned = None if snapshot is None else snapshot.table_versions[table]
        check.table(table, pinned)
    if deep and snapshot is not None:
        check.problems += check_rows(warehouse, snapshot, skip=check.damaged)
    return replace(check.report(snapshot, deep=deep), seconds=time.perf_counter() - started)


class _TableCheck:
    """Collects the problems and counts of one run of :func:`check_tables`."""

    def __init__(self, warehouse: Warehouse):
        self.warehouse = warehouse
        self.storage = warehouse.storage
        self.problems: list[Problem] = []
        self.tables = self.files = self.rows = self.versions = 0
        self.damaged: set[str] = set()  # tables whose pinned files are not all readable
        self.newest_opened: dict[str, DeltaTable | None | bool] = {}

    def add(self, kind: str, what: str, where: str, fix: str) -> None:
        self.problems.append(Problem(kind=kind, what=what, where=where, fix=fix))

    def report(self, snapshot: Snapshot | None, *, deep: bool) -> VerifyReport:
        return VerifyReport(
            root=self.warehouse.uri, version=None if snapshot is None else snapshot.version, deep=deep,
            tables=self.tables, files=self.files, rows=self.rows, versions=self.versions, problems=tuple(self.problems),
        )

    # -- the log -------------------------------------------------------------------
    def log(self) -> Snapshot | None:
        """Check the log table and its pins; the latest snapshot, or None when the log cannot be read."""
        delta = self.open(LOG, None)
        if isinstance(delta, DeltaTable):
            self.tables += 1
            self.table_files(LOG, delta)
        if delta is False or LOG in self.damaged:
            return None
        try:
            log = self.warehouse._log()
        except StorageError as error:  # its files were reported above; this is what a reader sees
            self.add("log", f"the log cannot be read ({error})", self.storage.table_uri(LOG), RESTORE)
            return None
        entries, snapshot = log_entries(log), snapshot_of(log)
        self.versions = len(entries)
        numbers = [entry.version for entry in entries]
        if numbers != list(range(len(numbers))):
            self.add("log", f"the log's versions are not 0..{len(numbers) - 1} without gaps or repeats",
                     self.storage.table_uri(LOG), RESTORE)
        for entry in entries:
            for table, pin in entry.pins.items():
                newest = self.newest(table)
                if newest is not False and pin > (-1 if newest is None else newest.version()):
                    self.add("pin", f"warehouse version {entry.version} pins Delta version {pin} of the {table} table, "
                             f"which does not exist", self.storage.table_uri(table),
                             f"the table's newer commits were lost: {RESTORE}")
        return snapshot if snapshot.version >= 0 else None

    # -- one table -----------------------------------------------------------------
    def table(self, table: str, pinned: int | None) -> None:
        """Check ``table`` at its pinned Delta version (None: the log is unreadable, so check the newest)."""
        newest = self.newest(table)
        if pinned is None or pinned < 0:
            if newest is False:
                self.open(table, None)  # again, to report it
            elif newest is not None:
                self.tables += 1
                self.table_files(table, newest)
                if pinned is not None:
                    self.ahead(table, -1, newest)
            return
        delta = self.open(table, pinned)
        if not isinstance(delta, DeltaTable):
            return
        self.tables += 1
        checked = self.table_files(table, delta)
        if newest is False:  # the pinned version opens, a later commit does not
            self.open(table, None)
        elif newest is not None and newest.version() > pinned:
            self.ahead(table, pinned, newest)
            self.table_files(table, newest, skip=checked)

    def ahead(self, table: str, pinned: int, newest: DeltaTable) -> None:
        self.add(
            "ahead",
            f"the {table} table is at Delta version {newest.version()}, the latest warehouse version pins {pinned}: "
            "commits that no reader sees yet, of a writer that was interrupted (or is running now)",
            self.storage.table_uri(table),
            f"unless an ew command is writing now, the next writing command ({WRITERS}) adopts them in a 'recover' "
            "version; run `ew verify` after it",
        )

    def newest(self, table: str) -> DeltaTable | None | bool:
        """The table's newest Delta version, opened once (None: never created; False: its log is damaged)."""
        if table not in self.newest_opened:
            self.newest_opened[table] = self.open(table, None, report=False)
        return self.newest_opened[table]

    def open(self, table: str, version: int | None, *, report: bool = True) -> DeltaTable | None | bool:
        """The Delta table at ``version`` (None: newest); None when it was never created, False when it cannot be read."""
        try:
            delta = self.warehouse._open_delta(table, version)
        except StorageError as error:
            if report:
                self.delta_log_problem(table, version, error)
            return False
        if delta is None and version is not None and version >= 0:
            if report:
                self.add("delta-log", f"the {table} table has no Delta log, but the warehouse pins its version {version}",
                         self.storage.table_uri(table), f"its folder was deleted or moved: {RESTORE}")
            return False
        return delta

    def delta_log_problem(self, table: str, version: int | None, error: StorageError) -> None:
        which = "its newest version" if version is None else f"version {version}"
        bad = _damaged_commits(self.storage, table, version)
        if not bad:
            self.add("delta-log", f"the Delta log of the {table} table cannot be read at {which} ({error})",
                     self.storage.table_uri(table), RESTORE)
        for path, reason in bad:
            self.add("delta-log", f"the {table} table cannot be read at {which}: this commit file {reason}", path,
                     f"{RESTORE}; every version of the table from this commit on needs it")
        if version is not None or table == LOG:  # a damaged commit past the pinned version leaves the pinned rows readable
            self.damaged.add(table)

    def table_files(self, table: str, delta: DeltaTable, *, skip: frozenset[str] = frozenset()) -> frozenset[str]:
        """Check every live file of this Delta version; returns the paths checked."""
        base = self.storage.fs_path(self.storage.table_uri(table)).rstrip("/") + "/"
        actions = pa.table(delta.get_add_actions(flatten=True))
        # The log's paths are URL-encoded once more than the file names on disk.
        stats = dict(zip((unquote(path) for path in actions.column("path").to_pylist()),
                         zip(actions.column("size_bytes").to_pylist(), actions.column("num_records").to_pylist())))
        paths = [self.storage.fs_path(uri) for uri in delta.file_uris()]
        for path in paths:
            if path in skip:
                continue
            size, records = stats.get(path[len(base):] if path.startswith(base) else path, (None, None))
            finding = self.data_file(table, path, size=size, records=records)
            if finding is not None:
                kind, what, fix = finding
                self.add(kind, what, path, fix)
                self.damaged.add(table)
        return frozenset(paths)

    def data_file(self, table: str, path: str, *, size: int | None, records: int | None) -> tuple[str, str, str] | None:
        """Read one data file's footer and count its rows; (kind, what, fix) when it is not what the log says."""
        holding = "" if records is None else f", holding {counted(records, 'row')},"
        lost = f"{RESTORE}: without it the table cannot be read"
        fs = self.storage.fs
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return "missing-file", f"a data file of the {table} table{holding} is missing", lost
        try:
            with fs.open_input_file(path) as handle:
                num_rows = pq.ParquetFile(handle).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            why = first_line(error) if size is None or info.size >= size else f"{info.size:,} of its {size:,} bytes are left"
            return "damaged-file", f"a data file of the {table} table{holding} is truncated or damaged ({why})", lost
        self.files += 1
        self.rows += num_rows
        if records is not None and num_rows != records:
            return ("row-count", f"the file holds {num_rows:,} rows, the {table} table's Delta log says {records:,}",
                    f"the file was replaced outside ew: {RESTORE}")
        if size is not None and info.size != size:
            return ("file-size", f"the file is {info.size:,} bytes, the {table} table's Delta log says {size:,}",
                    f"the file was changed outside ew: {RESTORE}")
        return None


def _damaged_commits(storage, table: str, version: int | None) -> list[tuple[str, str]]:
    """(path, why) of each commit file of ``table``'s Delta log up to ``version`` that is missing or unreadable."""
    fs = storage.fs
    log_dir = storage.fs_path(storage.table_uri(table)).rstrip("/") + "/_delta_log"
    infos = fs.get_file_info(pafs.FileSelector(log_dir, allow_not_found=True))
    commits = {}
    for info in infos:
        stem, _, suffix = info.base_name.partition(".")
        if suffix == "json" and stem.isdigit():
            commits[int(stem)] = info.path
    if not commits:
        return [(log_dir, "holds no commits")]
    last = max(commits) if version is None else version
    bad = [(f"{log_dir}/{number:020d}.json", "is missing") for number in range(last + 1) if number not in commits]
    for number in sorted(n for n in commits if n <= last):
        try:
            with fs.open_input_stream(commits[number]) as handle:
                text = handle.read().decode("utf-8")
            actions = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError) as error:
            bad.append((commits[number], f"is truncated or garbled ({first_line(error)})"))
            continue
        if not actions or not all(isinstance(action, dict) for action in actions):
            bad.append((commits[number], "is empty or garbled (not one JSON object per line)"))
    return bad
