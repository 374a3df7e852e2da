"""Writing a streamed query result: an aligned table, CSV, JSON Lines or Parquet.

Every writer consumes record batches one at a time, so a result of millions of rows never
sits in memory. A regular file is written under a fresh temporary name beside it and renamed
into place at the end: a failed query leaves no partial file behind. A FIFO or a device
(``-o /dev/null``) is written in place, never replaced.

A column a format cannot hold (an interval in Parquet, ``'infinity'::date`` for Python's
datetime, bytes in CSV) is written as DuckDB's own text for it, nested values included.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TextIO

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import EwError, first_line

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL = 40
MAX_LIST_ITEMS = 4


class OutputError(EwError):
    """An output file could not be written; says which file, why, and what to do."""

    def __init__(self, path: Path | str, reason: str, hint: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot write {self.path}: {reason}; {hint}")


def format_for(output: Path | None, requested: str | None) -> str:
    """The format to write: the one asked for, else from the output's extension, else a table."""
    if requested:
        if requested not in FORMATS:
            raise EwError(f"unknown format {requested!r}; choose one of {', '.join(FORMATS)}")
        return requested
    if output is not None:
        suffix = output.suffix.lower().lstrip(".")
        if suffix in ("csv", "parquet", "json"):
            return suffix
        if suffix in ("jsonl", "ndjson"):
            return "json"
    return "table"


# -- output files --------------------------------------------------------------------------------

# Errors of writing to an open file. Others raised inside the block (a Delta file that cannot be
# read, say) are not about the output and pass through unchanged.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EPIPE})


def written_in_place(path: Path) -> bool:
    """True where ``path`` exists and is neither a regular file nor a directory (a FIFO, a device):
    :func:`atomic_output` writes into such a file instead of replacing it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open ``path`` for writing; a regular file appears, complete, only if the block succeeds.

    The temporary file is created exclusively (``mkstemp``) beside ``path``, so a name planted
    in a shared directory cannot redirect the write; on failure only that file is removed. A FIFO
    or a device is written in place; a directory is refused. OS errors while writing (a full
    disk, a read-only directory) raise :class:`OutputError`.

        with atomic_output(Path("out.csv"), "wb") as handle:
            handle.write(b"a,b\\n")
    """
    path = Path(path)
    handle = _open_in_place(path, mode)
    if handle is not None:
        with _write_errors(path, in_place=True), handle:
            yield handle
        return
    descriptor, temporary = _create_beside(path)
    try:
        with _write_errors(path, in_place=False), os.fdopen(descriptor, mode, **_text_encoding(mode)) as handle:
            yield handle
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise _output_error(path, error, in_place=False) from None
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _text_encoding(mode: str) -> dict:
    return {} if "b" in mode else {"encoding": "utf-8"}


def _open_in_place(path: Path, mode: str) -> IO | None:
    """An open handle on ``path`` where it exists and is not a regular file; None to write beside it."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _output_error(path, error, in_place=False) from None
    if stat.S_ISDIR(status.st_mode):
        raise OutputError(path, "it is a directory", f"give a file name, e.g. {path / 'result'}")
    if stat.S_ISREG(status.st_mode):
        return None
    try:
        # Neither created nor truncated here: if a regular file was swapped in since the check,
        # it is left alone and written beside, like any regular file.
        descriptor = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise _output_error(path, error, in_place=True) from None
    if stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None
    return os.fdopen(descriptor, mode, **_text_encoding(mode))


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, empty temporary file in ``path``'s directory, with the permissions ``path`` will have."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".ew-tmp")
    except OSError as error:
        raise _output_error(path, error, in_place=False) from None
    try:
        os.fchmod(descriptor, _permissions_for(path))  # mkstemp makes 0600; open() would honour the umask
    except OSError as error:
        os.close(descriptor)
        os.unlink(temporary)
        raise _output_error(path, error, in_place=False) from None
    return descriptor, temporary


def _permissions_for(path: Path) -> int:
    """What a plain ``open(path, "w")`` would leave: an existing file's permissions, else 0666 less the umask."""
    try:
        status = os.stat(path)
        if stat.S_ISREG(status.st_mode):
            return stat.S_IMODE(status.st_mode) & 0o777
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it (setting it, even briefly, races with other threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextmanager
def _write_errors(path: Path, *, in_place: bool) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        raise _output_error(path, error, in_place=in_place) from None


def _output_error(path: Path, error: OSError, *, in_place: bool) -> OutputError:
    directory = path.parent
    left = "anything already written to it stays there" if in_place else "nothing was written"
    denied = "permission denied" if in_place else f"permission denied in {directory}"
    reasons = {
        errno.ENOENT: (f"the directory {directory} does not exist", "create it, or write somewhere else"),
        errno.ENOTDIR: (f"{directory} is not a directory", "give a path inside a directory"),
        errno.EACCES: (denied, "write somewhere you can write to"),
        errno.EPERM: (denied, "write somewhere you can write to"),
        errno.EROFS: (f"{directory} is on a read-only file system", "write somewhere else"),
        errno.ENOSPC: ("no space left on the device", f"free some space or write somewhere else ({left})"),
        errno.EDQUOT: ("the disk quota is exceeded", f"free some space or write somewhere else ({left})"),
        errno.EFBIG: ("the file grew too large for the file system", f"write somewhere else ({left})"),
        errno.EPIPE: ("its reader went away before the end", "keep the reader open until ew finishes"),
        errno.EISDIR: ("it is a directory", f"give a file name, e.g. {path / 'result'}"),
    }
    reason, hint = reasons.get(error.errno, (error.strerror or first_line(error), f"check the path ({left})"))
    return OutputError(path, reason, hint)


# -- writing ------------------------------------------------------------------------------------


def write_result(reader: pa.RecordBatchReader, *, fmt: str, output: Path | None, stdout: TextIO) -> int:
    """Stream ``reader`` to ``output`` (or ``stdout``) in ``fmt``; returns the number of rows.

    Control characters in a table, or in CSV shown on a terminal, are written escaped (``\\x1b``).
    """
    if fmt == "parquet" and output is None:
        raise EwError("--format parquet needs --output FILE")
    reader = _for_format(reader, fmt=fmt)
    if output is None:
        escape = fmt == "csv" and _is_terminal(stdout)
        return _write_csv(reader, stdout, escape=escape) if fmt == "csv" else _WRITERS[fmt](reader, stdout)
    with atomic_output(output, "w" if fmt in ("table", "json") else "wb") as handle:
        return _WRITERS[fmt](reader, handle)


def _is_terminal(stream: IO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# -- types a format cannot hold ----------------------------------------------------------------


def _for_format(reader: pa.RecordBatchReader, *, fmt: str) -> pa.RecordBatchReader:
    """``reader`` with every value ``fmt`` cannot hold rewritten by DuckDB, mostly to its text.

    ``interval 3 day`` -> "3 days", ``'infinity'::date`` -> "infinity", a BLOB -> "\\x05\\xFD", a
    VARINT -> its digits; inside lists, structs and maps only the offending values change. Columns
    that need nothing pass through untouched (an embedding list costs no conversion).
    """
    rewrites = {i: sql for i, field in enumerate(reader.schema) if (sql := _rewrite(f"c{i}", field.type, fmt))}
    if not rewrites:
        return reader
    con = duckdb.connect(config={"enable_external_access": False, "threads": 1})
    select = ", ".join(f"{sql} AS c{i}" for i, sql in rewrites.items())

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
        part = pa.RecordBatch.from_arrays([batch.column(i) for i in rewrites], names=[f"c{i}" for i in rewrites])
        try:
            converted = con.from_arrow(part).select(select).to_arrow_table()
        except duckdb.Error as error:
            names = ", ".join(repr(batch.schema.names[i]) for i in rewrites)
            raise EwError(
                f"cannot write the column(s) {names} as {fmt}: {first_line(error)}; "
                "cast them to VARCHAR in the query (e.g. select x::varchar ...)"
            ) from None
        columns = list(batch.columns)
        for j, i in enumerate(rewrites):
            columns[i] = converted.column(j).combine_chunks()
        return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                yield convert(batch)
        finally:
            con.close()

    empty = pa.RecordBatch.from_arrays([pa.nulls(0, field.type) for field in reader.schema], schema=reader.schema)
    schema = convert(empty).schema
    return pa.RecordBatchReader.from_batches(schema, batches())


def _target(kind: pa.DataType, fmt: str) -> str | None:
    """The DuckDB type a value of arrow type ``kind`` becomes in ``fmt``, or None to keep it."""
    if isinstance(kind, pa.BaseExtensionType) or pa.types.is_interval(kind):
        return "VARCHAR"  # DuckDB's own types (VARINT, BIT, ...) and intervals: nothing but DuckDB reads them
    if fmt == "parquet":
        if pa.types.is_union(kind):
            return "VARCHAR"
        if pa.types.is_timestamp(kind) and kind.unit == "s":
            # Parquet has no seconds: pyarrow's cast to milliseconds overflows on 'infinity', DuckDB's keeps it.
            return "TIMESTAMPTZ" if kind.tz else "TIMESTAMP"
        return None
    # Python's datetime stops at year 9999 and knows no infinity; CSV, JSON and a table have no bytes.
    if pa.types.is_temporal(kind) or _is_binary(kind):
        return "VARCHAR"
    return None


def _is_binary(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_binary_view(kind)
    )


def _is_list(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        or pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind)
    )


def _rewrite(expr: str, kind: pa.DataType, fmt: str, depth: int = 0) -> str | None:
    """A DuckDB expression for ``expr`` (of arrow type ``kind``) that ``fmt`` can hold, or None if it already can."""
    target = _target(kind, fmt)
    if target:
        return f"CAST({expr} AS {target})"
    item = f"x{depth}"  # a lambda parameter, distinct at each depth
    if pa.types.is_map(kind):
        key = _rewrite(f"{item}.key", kind.key_type, fmt, depth + 1)
        value = _rewrite(f"{item}.value", kind.item_type, fmt, depth + 1)
        if key is None and value is None:
            return None
        entry = f"{{'key': {key or f'{item}.key'}, 'value': {value or f'{item}.value'}}}"
        return f"map_from_entries(list_transform(map_entries({expr}), lambda {item}: {entry}))"
    if _is_list(kind):
        inner = _rewrite(item, kind.value_type, fmt, depth + 1)
        return None if inner is None else f"list_transform({expr}, lambda {item}: {inner})"
    if pa.types.is_struct(kind):
        fields = [kind.field(i) for i in range(kind.num_fields)]
        members = [f"struct_extract_at({expr}, {i + 1})" for i in range(len(fields))]
        parts = [_rewrite(member, field.type, fmt, depth) for member, field in zip(members, fields)]
        if all(part is None for part in parts):
            return None
        packed = ", ".join(
            f"{_identifier(field.name)} := {part or member}" for field, part, member in zip(fields, parts, members)
        )
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE struct_pack({packed}) END"
    if pa.types.is_union(kind):
        if any(_rewrite(item, kind.field(i).type, fmt, depth) for i in range(kind.num_fields)):
            return f"CAST({expr} AS VARCHAR)"
    return None


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- control characters ------------------------------------------------------------------------

# C0, DEL, C1 and the bidirectional marks and overrides: printed raw, they move the cursor,
# recolour or clear a terminal, or reorder what it shows.
_CONTROL_CODES = (
    *range(0x00, 0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)
)
_CONTROLS = re.compile("[" + "".join(re.escape(chr(code)) for code in _CONTROL_CODES) + "]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# json.dumps escapes C0 only; a \\u escape is the same JSON value, and safe to print.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _CONTROL_CODES if code >= 0x20}


def escape_controls(text: str) -> str:
    """``text`` with control characters shown as escapes: ``"\\x1b[31mred"`` -> ``"\\\\x1b[31mred"``."""
    return _CONTROLS.sub(lambda match: _escape(match.group()), text)


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# -- the writers ---------------------------------------------------------------------------------


def _write_parquet(reader: pa.RecordBatchReader, handle: IO) -> int:
    rows = 0
    with pq.ParquetWriter(handle, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _write_csv(reader: pa.RecordBatchReader, handle: IO, *, escape: bool = False) -> int:
    """CSV; ``escape`` shows control characters escaped (for a terminal), else the text is written as it is."""
    # CSV has no list type: lists and structs are written as JSON text.
    if isinstance(handle, io.TextIOBase) or hasattr(handle, "encoding"):
        handle.flush()
        handle = handle.buffer
    schema = _flat_schema(reader.schema)
    if escape:
        schema = pa.schema([field.with_name(escape_controls(field.name)) for field in schema])
    rows = 0
    with pacsv.CSVWriter(handle, schema) as writer:
        for batch in reader:
            flat = _flatten_nested(batch)
            if escape:
                flat = pa.RecordBatch.from_arrays([_escaped(column) for column in flat.columns], schema=schema)
            writer.write_batch(flat)
            rows += batch.num_rows
    handle.flush()
    return rows


def _escaped(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return column
    texts = [None if text is None else escape_controls(text) for text in column.to_pylist()]
    return pa.array(texts, kind).cast(column.type)  # a dictionary (an ENUM) is encoded again


def _flat_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string()) if _nested(f.type) else f for f in schema])


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind)


def _flatten_nested(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = []
    for column, field in zip(batch.columns, batch.schema):
        if _nested(field.type):
            column = pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=_flat_schema(batch.schema))


def unique_names(names: list[str]) -> list[str]:
    """Column names made unique (``doc_hash``, ``doc_hash_2``): a join can return a name twice."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def _write_json(reader: pa.RecordBatchReader, handle: IO) -> int:
    rows = 0
    names = unique_names(reader.schema.names)
    for batch in reader:
        columns = [column.to_pylist() for column in batch.columns]
        for values in zip(*columns):
            line = json.dumps(dict(zip(names, values)), default=str, ensure_ascii=False)
            handle.write(line.translate(_JSON_ESCAPES) + "\n")
        rows += batch.num_rows
    return rows


def _cell(value: object) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:MAX_LIST_ITEMS])
        text = f"[{shown}, ...] ({len(value)})" if len(value) > MAX_LIST_ITEMS else f"[{shown}]"
    else:
        text = str(value)
    text = escape_controls(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _write_table(reader: pa.RecordBatchReader, handle: IO) -> int:
    """An aligned text table. Column widths come from the header and the first batch, so it streams."""
    names = [escape_controls(name) for name in reader.schema.names]
    widths: list[int] | None = None
    rows = 0
    for batch in reader:
        cells = list(zip(*([_cell(v) for v in column.to_pylist()] for column in batch.columns)))
        if widths is None:
            widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(names)]
            _table_header(handle, names, widths)
        for row in cells:
            handle.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        rows += batch.num_rows
    if widths is None:
        _table_header(handle, names, [len(n) for n in names])
    handle.write(f"({rows} row{'s' if rows != 1 else ''})\n")
    return rows


def _table_header(handle: IO, names: list[str], widths: list[int]) -> None:
    handle.write("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip() + "\n")
    handle.write("  ".join("-" * w for w in widths) + "\n")


_WRITERS = {"table": _write_table, "csv": _write_csv, "json": _write_json, "parquet": _write_parquet}
