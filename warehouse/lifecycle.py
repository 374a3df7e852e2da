"""The warehouse over its life: compact small files, vacuum what no kept version needs, remove a corpus.

    compact(wh)                                  # one 'compact' version; every query reads the same rows
    vacuum(wh, keep_versions=1)                  # a dry run: what it would delete
    vacuum(wh, keep_versions=1, dry_run=False)   # a 'vacuum' version, then the files go
    remove_corpus(wh, "debian")                  # one 'remove-corpus' version

Delta Lake's OPTIMIZE and VACUUM, by ew's versions: a warehouse version pins one Delta version of
every table, so the files a kept version needs are exactly the files those pinned Delta versions
list. Vacuum deletes every other Parquet file of the tables (Delta's own vacuum goes by file age,
which knows nothing of ew's pins), and the artifact directories no kept ``models`` or ``heads``
row refers to.

What a crash leaves: compact writes one Delta commit per table, then the log row; a writer
killed in between leaves commits that the next writer adopts (a ``recover`` version), and a
rerun compacts what is left. Vacuum first commits the ``vacuum`` version that records the oldest
readable version, then deletes files no kept version lists, one at a time: after any prefix of
those deletions every kept version is whole, and a rerun deletes the rest.

Both take the write lock like every writer, without waiting: an ingest running meanwhile makes
them fail with "another ew process ... is writing" (and an ingest started meanwhile fails the
same way), so nothing is lost and the command is run again after the other one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc

from .errors import EwError
from .store import Warehouse, Writer, now_utc
from .tables import DOCUMENTS, HEADS, MODELS, TABLES
from .versions import VACUUM, LogEntry, entries, oldest_readable

#: Files of a partition smaller than this are merged into files of about this size (delta-rs' default is 100 MB).
TARGET_FILE_SIZE = 128 * 2**20
#: Artifact directories (models, heads) that no kept version refers to but that changed more recently than
#: this are left alone: `ew fit-head` writes a head's files before it takes the lock to register them.
ARTIFACT_GRACE = timedelta(hours=1)
ARTIFACT_DIRS = ("artifacts/models", "artifacts/heads")


# -- compact ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TableCompaction:
    """One table before and after compaction (after: an estimate in a dry run)."""

    table: str
    files_before: int
    bytes_before: int
    files_after: int
    bytes_after: int
    partitions: int  # partitions whose small files are (or would be) rewritten


@dataclass(frozen=True)
class CompactResult:
    dry_run: bool
    version: int | None  # the 'compact' version (None: a dry run, or nothing to compact)
    tables: tuple[TableCompaction, ...]
    seconds: float

    @property
    def files_before(self) -> int:
        return sum(table.files_before for table in self.tables)

    @property
    def files_after(self) -> int:
        return sum(table.files_after for table in self.tables)

    def to_dict(self) -> dict:
        return asdict(self)


def compact(warehouse: Warehouse, *, dry_run: bool = False, target_size: int = TARGET_FILE_SIZE) -> CompactResult:
    """Rewrite the small files of every partition of every table into files of about ``target_size``
    bytes, as one ``compact`` version; with ``dry_run``, only say what it would do (nothing is written).

    Every query reads the same rows after it; versions before it still read their own files.
    """
    started = time.perf_counter()
    if dry_run:
        snapshot = warehouse.snapshot()
        plans = tuple(_plan(table, _files(warehouse, table, snapshot.table_versions[table]), target_size)
                      for table in TABLES)
        return CompactResult(dry_run=True, version=None, tables=tuple(p for p in plans if p.partitions),
                             seconds=time.perf_counter() - started)
    with warehouse.writer() as writer:
        done = []
        for table in TABLES:
            before = _files(warehouse, table, None)
            plan = _plan(table, before, target_size)
            if not plan.partitions:
                continue
            if not writer.compact(table, target_size=target_size).get("numFilesRemoved"):
                continue  # deltalake found nothing to merge after all (and committed nothing)
            after = _files(warehouse, table, None)
            done.append(TableCompaction(table, len(before), sum(size for size, _ in before.values()), len(after),
                                        sum(size for size, _ in after.values()), plan.partitions))
        version = None
        if done:  # (the tables a compaction killed earlier compacted were adopted by the writer's settle)
            detail = {table.table: {"files_before": table.files_before, "files_after": table.files_after,
                                    "bytes_before": table.bytes_before, "bytes_after": table.bytes_after}
                      for table in done}
            version = writer.commit("compact", {"tables": detail, "target_size": target_size})
    return CompactResult(dry_run=False, version=version, tables=tuple(done), seconds=time.perf_counter() - started)


def _files(warehouse: Warehouse, table: str, version: int | None) -> dict[tuple[str, str], tuple[int, int]]:
    """(partition, path) -> (size, modification time) of every live file of ``table`` at a Delta version
    (None: the newest; -1: the table did not exist yet)."""
    if version is not None and version < 0:
        return {}
    delta = warehouse._open_delta(table, version)
    if delta is None:
        return {}
    actions = pa.table(delta.get_add_actions(flatten=True))
    partition_columns = [name for name in actions.column_names if name.startswith("partition.")]
    partitions = zip(*(actions.column(name).to_pylist() for name in partition_columns)) if partition_columns else \
        ((),) * actions.num_rows
    return {(str(partition), path): (size, modified) for partition, path, size, modified in zip(
        partitions, actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(),
        actions.column("modification_time").to_pylist())}


def _plan(table: str, files: dict[tuple[str, str], tuple[int, int]], target_size: int) -> TableCompaction:
    """What compaction does to ``files``, as deltalake plans it: in each partition, the files below
    the target size, in the order they were written, fill bins of at most that size; every bin of
    two or more files becomes one file."""
    small: dict[str, list[tuple[int, int]]] = {}
    for (partition, _), (size, modified) in files.items():
        if size < target_size:
            small.setdefault(partition, []).append((modified, size))
    removed = added = partitions = 0
    for written in small.values():
        bins: list[list[int]] = [[]]
        for _, size in sorted(written):
            if bins[-1] and sum(bins[-1]) + size > target_size:
                bins.append([])
            bins[-1].append(size)
        merged = [sizes for sizes in bins if len(sizes) > 1]
        removed += sum(len(sizes) for sizes in merged)
        added += len(merged)
        partitions += bool(merged)
    total = sum(size for size, _ in files.values())
    return TableCompaction(table, len(files), total, len(files) - removed + added, total, partitions)


# -- vacuum ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VacuumResult:
    dry_run: bool
    oldest_version: int | None  # the oldest version readable after it (None: the warehouse has no versions)
    latest_version: int | None
    version: int | None  # the 'vacuum' version that recorded it (None: a dry run, or nothing to delete)
    files: int  # data files no kept version lists
    bytes: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> (files, bytes)
    artifacts: tuple[str, ...] = ()  # artifact directories (relative to the warehouse) no kept version refers to
    artifact_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def vacuum(warehouse: Warehouse, *, keep_versions: int | None = None, older_than: timedelta | None = None,
           dry_run: bool = True, artifact_grace: timedelta = ARTIFACT_GRACE) -> VacuumResult:
    """Delete the data files and artifact directories that no kept version needs (a dry run by default).

    Kept: the newest ``keep_versions`` versions (``vacuum`` versions, which change no table, do not
    count), or with ``older_than`` every version since the one that was the latest that long ago
    (so the warehouse as it was then stays readable), and always the latest. Reading an older
    version afterwards is a :class:`warehouse.errors.VersionVacuumedError` naming the oldest readable one.
    """
    if (keep_versions is None) == (older_than is None):
        raise EwError("say which versions to keep with one of --keep-versions N or --older-than AGE (e.g. 7d)")
    if keep_versions is not None and keep_versions < 1:
        raise EwError(f"--keep-versions {keep_versions}: keep at least 1 version (the latest)")
    started = time.perf_counter()
    if dry_run:
        result = _garbage(warehouse, keep_versions=keep_versions, older_than=older_than, artifact_grace=artifact_grace)
        return _with_time(result, started)
    with warehouse.writer() as writer:
        result = _garbage(warehouse, keep_versions=keep_versions, older_than=older_than, artifact_grace=artifact_grace)
        paths = result.paths
        version = None
        if paths and result.oldest_version > result.recorded:
            # Recorded before anything is deleted: a reader of an older version is told why it is gone.
            version = writer.commit(VACUUM, {"oldest_version": result.oldest_version, "files": result.files,
                                             "bytes": result.bytes, "artifacts": list(result.artifacts)})
        _delete(warehouse, paths)
    return _with_time(_Garbage(**{**result.__dict__, "dry_run": False, "version": version}), started)


@dataclass(frozen=True)
class _Garbage(VacuumResult):
    recorded: int = 0  # the oldest readable version recorded before this run
    paths: tuple[str, ...] = ()  # what to delete, files first


def _with_time(result: _Garbage, started: float) -> VacuumResult:
    public = {name: value for name, value in result.__dict__.items() if name not in ("recorded", "paths")}
    return VacuumResult(**{**public, "seconds": time.perf_counter() - started})


def _oldest_kept(entries: list[LogEntry], *, keep_versions: int | None, older_than: timedelta | None) -> int:
    if keep_versions is not None:
        counted = [entry.version for entry in entries if entry.operation != VACUUM] or [entries[-1].version]
        return counted[-min(keep_versions, len(counted))]
    cutoff = now_utc() - older_than
    current_then = [entry.version for entry in entries if entry.committed_at <= cutoff]
    return current_then[-1] if current_then else entries[0].version


def _garbage(warehouse: Warehouse, *, keep_versions: int | None, older_than: timedelta | None,
             artifact_grace: timedelta) -> _Garbage:
    log = warehouse._log()
    versions = entries(log)
    if not versions:
        return _Garbage(dry_run=True, oldest_version=None, latest_version=None, version=None, files=0, bytes=0)
    recorded = oldest_readable(log)
    oldest = max(_oldest_kept(versions, keep_versions=keep_versions, older_than=older_than), recorded)
    kept = [entry for entry in versions if entry.version >= oldest]
    paths: list[str] = []
    tables: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        live = set()
        for delta in _kept_deltas(warehouse, table, kept):
            # The log's paths are URL-encoded once more than the file names on disk.
            live.update(f"{table}/{unquote(path)}" for path in delta.get_add_actions(flatten=True).column("path").to_pylist())
        unreferenced = [(path, size) for path, size in warehouse.storage.iter_files(table)
                        if path.endswith(".parquet") and not path.startswith(f"{table}/_delta_log/") and path not in live]
        if unreferenced:
            tables[table] = (len(unreferenced), sum(size for _, size in unreferenced))
            paths += [path for path, _ in unreferenced]
    artifacts = _stale_artifacts(warehouse, kept, artifact_grace)
    artifact_bytes = sum(size for directory in artifacts for _, size in warehouse.storage.iter_files(directory))
    return _Garbage(
        dry_run=True, oldest_version=oldest, latest_version=versions[-1].version, version=None,
        files=sum(files for files, _ in tables.values()), bytes=sum(size for _, size in tables.values()),
        tables=tables, artifacts=tuple(artifacts), artifact_bytes=artifact_bytes, recorded=recorded,
        paths=tuple(paths) + tuple(artifacts),
    )


def _kept_deltas(warehouse: Warehouse, table: str, kept: list[LogEntry]):
    """``table`` at every Delta version a kept version pins, and at its newest (commits of an
    interrupted writer, which the next writer adopts, are kept too)."""
    for delta_version in sorted({entry.pins[table] for entry in kept if entry.pins[table] >= 0}) + [None]:
        delta = warehouse._open_delta(table, delta_version)
        if delta is not None:
            yield delta


def _stale_artifacts(warehouse: Warehouse, kept: list[LogEntry], grace: timedelta) -> list[str]:
    referenced: set[str] = set()
    for table in (MODELS, HEADS):
        for delta in _kept_deltas(warehouse, table, kept):
            rows = warehouse._read(warehouse._delta_dataset(delta, table), table, columns=["artifact"])
            referenced.update(str(path).rstrip("/") for path in rows.column("artifact").to_pylist() if path)
    settled = now_utc().timestamp() - grace.total_seconds()
    storage = warehouse.storage
    return [directory for parent in ARTIFACT_DIRS for directory in storage.children(parent)
            if directory not in referenced and storage.modified_at(directory) < settled]


def _delete(warehouse: Warehouse, paths: tuple[str, ...]) -> None:
    """Delete ``paths`` one by one (each unreferenced, so any prefix is safe), then the partition folders left empty."""
    storage = warehouse.storage
    folders = set()
    for path in paths:
        storage.delete(path)
        parent = path.rsplit("/", 1)[0]
        if parent not in TABLES and parent.split("/", 1)[0] in TABLES:
            folders.add(parent)
    for folder in sorted(folders, key=len, reverse=True):
        storage.remove_empty_dir(folder)


# -- remove ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoveResult:
    corpus: str
    documents: int
    version: int


def remove_corpus(warehouse: Warehouse, corpus: str) -> RemoveResult:
    """Delete every document of ``corpus`` in one ``remove-corpus`` version.

    Its vectors stay (other corpora may hold the same texts); older versions still read the
    documents until `ew vacuum` drops them.
    """
    with warehouse.writer() as writer:
        corpora = _corpora(writer)
        if corpus not in corpora:
            raise EwError(f"no corpus named {corpus!r} (corpora: {', '.join(sorted(corpora)) or 'none yet'}); "
                          "see `ew query \"select corpus, count(*) from documents group by all\"`")
        removed = writer.remove_corpus(corpus)
        version = writer.commit("remove-corpus", {"corpus": corpus, "documents": removed})
    return RemoveResult(corpus=corpus, documents=removed, version=version)


def _corpora(writer: Writer) -> set[str]:
    stored = writer.warehouse.current_dataset(DOCUMENTS)
    column = writer.warehouse._read(stored, DOCUMENTS, columns=["corpus"]).column("corpus")
    return set(pc.unique(column).to_pylist())


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``2w`` or ``90s`` as a timedelta."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1].strip(), text[-1:].lower()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in units or amount < 0:
        raise EwError(f"age {text!r} is not a number followed by s, m, h, d or w (e.g. 7d)")
    return timedelta(**{units[unit]: amount})


__all__ = ["CompactResult", "RemoveResult", "TableCompaction", "VacuumResult", "compact", "parse_age",
           "remove_corpus", "vacuum"]
