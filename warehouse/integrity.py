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
- with ``deep``, every row, streamed through DuckDB: unique keys, vector widths and layers
  that agree with the ``models`` table, and ``doc_hash`` = :func:`warehouse.keys.doc_hash` of the text.

Nothing is raised for what it finds: each finding is a :class:`Problem` saying what, where
and what to do.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import unquote

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from .errors import StorageError, first_line
from .keys import doc_hash
from .query import connect
from .store import Warehouse
from .tables import DOCUMENTS, EMBEDDINGS, HEADS, LOG, MODELS, TABLES, TOKEN_STATES
from .versions import Snapshot, snapshot_of
from .versions import entries as log_entries

#: The columns that identify one row of each table.
KEYS: dict[str, tuple[str, ...]] = {
    DOCUMENTS: ("corpus", "id"),
    EMBEDDINGS: ("doc_hash", "model", "layer", "pooling"),
    MODELS: ("model",),
    HEADS: ("head",),
    TOKEN_STATES: ("doc_hash", "model", "layer", "precision"),
}
EXAMPLES = 3  # rows quoted per finding of the deep checks
RESTORE = "restore it from a backup of the warehouse"
WRITERS = "`ew ingest`, `ew fit-head` or `ew heads rm`"


@dataclass(frozen=True)
class Problem:
    """One finding: ``what`` is wrong, ``where`` (a file, or a table and key), and ``fix``: what to do."""

    # log, pin, delta-log, ahead, missing-file, damaged-file, row-count, file-size (tables);
    # duplicate-key, doc-hash, vector-width, layer-range, unknown-model, unreadable-rows (deep);
    # model-artifact, head-artifact (pipelines.integrity)
    kind: str
    what: str
    where: str
    fix: str

    def line(self) -> str:
        return f"{self.where}: {self.what}; {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    """What `ew verify` checked and found; sound when ``problems`` is empty."""

    root: str
    version: int | None      # the warehouse version checked (None: no version could be read)
    deep: bool
    tables: int = 0          # tables whose Delta log was read
    files: int = 0           # Parquet files whose footer was read
    rows: int = 0            # rows in those files
    versions: int = 0        # rows of the log whose pins were checked
    models: int = 0          # model artifacts checked
    heads: int = 0           # head artifacts checked
    seconds: float = 0.0
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(_count(n, noun) for n, noun in (
            (self.tables, "table"), (self.files, "file"), (self.rows, "row"), (self.versions, "version"),
            (self.models, "model"), (self.heads, "head")))
        checked = f"{counts} checked{' row by row' if self.deep else ''} in {self.seconds:.1f}s"
        at = "no version" if self.version is None else f"version {self.version}"
        if self.ok:
            return f"warehouse {self.root} ({at}) is sound: {checked}"
        return f"found {_count(len(self.problems), 'problem')} in warehouse {self.root} ({at}): {checked}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        data["problems"] = [problem.to_dict() for problem in self.problems]
        return data


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'s' * (number != 1)}"


def check_tables(warehouse: Warehouse, *, deep: bool = False) -> VerifyReport:
    """Check every table as the latest warehouse version pins it (and, with ``deep``, every row)."""
    started = time.perf_counter()
    check = _TableCheck(warehouse)
    snapshot = check.log()
    for table in TABLES:
        pinned = None if snapshot is None else snapshot.table_versions[table]
        check.table(table, pinned)
    if deep and snapshot is not None:
        check.every_row(snapshot)
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
            root=str(self.warehouse.root), version=None if snapshot is None else snapshot.version, deep=deep,
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
        fs = self.storage.fs
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
            holding = "" if records is None else f", holding {_count(records, 'row')},"
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                self.add("missing-file", f"a data file of the {table} table{holding} is missing", path,
                         f"{RESTORE}: without it the table cannot be read")
                self.damaged.add(table)
                continue
            try:
                with fs.open_input_file(path) as handle:
                    num_rows = pq.ParquetFile(handle).metadata.num_rows
            except (OSError, pa.ArrowException) as error:
                why = first_line(error) if size is None or info.size >= size else f"{info.size:,} of its {size:,} bytes are left"
                self.add("damaged-file", f"a data file of the {table} table{holding} is truncated or damaged ({why})",
                         path, f"{RESTORE}: without it the table cannot be read")
                self.damaged.add(table)
                continue
            self.files += 1
            self.rows += num_rows
            if records is not None and num_rows != records:
                self.add("row-count", f"the file holds {num_rows:,} rows, the {table} table's Delta log says {records:,}",
                         path, f"the file was replaced outside ew: {RESTORE}")
                self.damaged.add(table)
            elif size is not None and info.size != size:
                self.add("file-size", f"the file is {info.size:,} bytes, the {table} table's Delta log says {size:,}",
                         path, f"the file was changed outside ew: {RESTORE}")
                self.damaged.add(table)
        return frozenset(paths)

    # -- every row (deep) ----------------------------------------------------------
    def every_row(self, snapshot: Snapshot) -> None:
        """Stream every row of the intact pinned tables through DuckDB."""
        datasets = {}
        for table in TABLES:
            if table in self.damaged:
                continue
            try:
                datasets[table] = self.warehouse.dataset(table, snapshot)
            except StorageError:  # reported by the file checks
                continue
        con = connect(datasets)
        try:
            for table in datasets:
                self.query(datasets, (table,), self.duplicate_keys, con, table)
            if DOCUMENTS in datasets:
                self.query(datasets, (DOCUMENTS,), self.document_hashes, con)
            if EMBEDDINGS in datasets and MODELS in datasets:
                self.query(datasets, (EMBEDDINGS, MODELS), self.vectors, con)
            if TOKEN_STATES in datasets and MODELS in datasets:
                self.query(datasets, (TOKEN_STATES, MODELS), self.token_states, con)
        finally:
            con.close()

    def query(self, datasets: dict[str, pads.Dataset], tables: tuple[str, ...], run, *args) -> None:
        """Run one deep check over ``tables``; when reading them fails, name the damaged files."""
        if any(table in self.damaged for table in tables):
            return
        try:
            run(*args)
        except (duckdb.InvalidInputException, duckdb.IOException) as error:  # a file damaged past its footer
            named = [self.damaged_fragments(table, datasets[table]) for table in tables]
            if not any(named):
                self.add("unreadable-rows", f"reading every row of the {' and '.join(tables)} tables failed "
                         f"({first_line(error)})", self.storage.table_uri(tables[0]), RESTORE)
            self.damaged.update(tables)

    def damaged_fragments(self, table: str, dataset: pads.Dataset) -> bool:
        """Read ``table`` file by file, reporting each that fails; whether any did."""
        found = False
        for fragment in dataset.get_fragments():
            try:
                for _ in fragment.to_batches():
                    pass
            except (OSError, pa.ArrowException) as error:
                found = True
                self.add("damaged-file", f"a data file of the {table} table is damaged inside ({first_line(error)})",
                         fragment.path, f"{RESTORE}: without it the table cannot be read")
        return found

    def duplicate_keys(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        keys = ", ".join(KEYS[table])
        # Group 64-bit hashes of the keys first (8 bytes a row, not the ~100 of the keys themselves:
        # 140 MB less at 900k embeddings), then only the rows whose hash repeats by their keys.
        rows = con.sql(
            f"with candidates as (select hash({keys}) as h from {table} group by h having count(*) > 1) "
            f"select {keys}, n, count(*) over () as repeated from (select {keys}, count(*) as n from {table} "
            f"where hash({keys}) in (select h from candidates) group by all having n > 1) "
            f"order by n desc, {keys} limit {EXAMPLES}"
        ).fetchall()
        if rows:
            examples = "; ".join(
                ", ".join(f"{name}={value!r}" for name, value in zip(KEYS[table], row)) + f" ({row[-2]} rows)"
                for row in rows
            )
            self.add("duplicate-key", f"{rows[0][-1]:,} keys ({keys}) occur more than once, e.g. {examples}",
                     self.storage.table_uri(table),
                     f"queries count these rows more than once; {RESTORE}, or rewrite the table without the repeats")

    def document_hashes(self, con: duckdb.DuckDBPyConnection) -> None:
        # DuckDB finds the candidates in one streamed pass; warehouse.keys.doc_hash, the definition,
        # decides (DuckDB's Unicode tables may be of another version than Python's).
        reader = con.sql(
            "select corpus, id, doc_hash, text from documents "
            "where text is null or doc_hash is distinct from sha256(nfc_normalize(text))"
        ).fetch_record_batch()
        wrong, examples = 0, []
        for batch in reader:
            for row in batch.to_pylist():
                if row["text"] is not None and row["doc_hash"] == doc_hash(row["text"]):
                    continue
                wrong += 1
                if len(examples) < EXAMPLES:
                    examples.append(f"corpus={row['corpus']!r}, id={row['id']!r}")
        if wrong:
            self.add("doc-hash", f"{wrong:,} documents have a doc_hash that is not the hash of their text, e.g. "
                     + "; ".join(examples), self.storage.table_uri(DOCUMENTS),
                     "their vectors cannot be found by text; ingest those records again to rewrite them")

    def vectors(self, con: duckdb.DuckDBPyConnection) -> None:
        groups = con.sql(
            "select e.model, e.layer, len(e.embedding) as width, m.dim, m.num_layers, count(*) as n "
            "from embeddings e left join (select model, any_value(dim) as dim, any_value(num_layers) as num_layers "
            "from models group by model) m on e.model = m.model "
            "where m.model is null or len(e.embedding) is distinct from m.dim or e.layer not between 0 and m.num_layers "
            "group by all order by all"
        ).fetchall()
        where = self.storage.table_uri(EMBEDDINGS)
        for model, layer, width, dim, num_layers, n in groups:
            at = f"{where} (model={model}, layer={layer})"
            if dim is None:
                self.add("unknown-model", f"{n:,} vectors of model {model}, which the models table does not list", at,
                         f"{RESTORE}, or ingest with that model again to register it")
            elif layer is None or not 0 <= layer <= num_layers:
                self.add("layer-range", f"{n:,} vectors of layer {layer}, outside its model's layers 0..{num_layers}", at,
                         f"they were written outside ew: {RESTORE}")
            elif width != dim:
                self.add("vector-width", f"{n:,} vectors {'are null' if width is None else f'have {width} values'}, "
                         f"the model's dim is {dim}", at, f"they were written outside ew: {RESTORE}")


    def token_states(self, con: duckdb.DuckDBPyConnection) -> None:
        """Every states blob holds n_tokens x dim values of its precision, dim being its model's."""
        bad = con.sql(
            "select t.model, t.layer, count(*) as n from token_states t "
            "left join (select model, any_value(dim) as dim from models group by model) m on t.model = m.model "
            "where m.model is null or t.dim is distinct from m.dim or octet_length(t.states) is distinct from "
            "t.n_tokens * t.dim * (case t.precision when 'fp16' then 2 when 'fp32' then 4 end) "
            "group by all order by all"
        ).fetchall()
        for model, layer, n in bad:
            self.add("state-width", f"{n:,} token-state rows whose size disagrees with n_tokens, dim and precision, "
                     "or whose model is not registered", f"{self.storage.table_uri(TOKEN_STATES)} (model={model}, "
                     f"layer={layer})", f"they were written outside ew: {RESTORE}")


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
