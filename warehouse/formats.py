"""Writing a streamed query result: an aligned table, CSV, a JSON array, JSON Lines or Parquet.

The formats and their flags follow sqlite-utils: ``json`` is one JSON array (``--json``), ``nl``
one object per line (``--nl``), ``csv`` (``--csv``). Every writer consumes record batches one at
a time, so a result of millions of rows never sits in memory; the table alone holds up to
``TABLE_ALIGN_ROWS`` rows back to align its columns over all of them. Files are written
through :func:`warehouse.output.atomic_output` (whole or not at all; a FIFO or a device in
place), and a column a format cannot hold is first rewritten by :func:`warehouse.conversion.for_format`.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import IO, TextIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .conversion import for_format
from .errors import EwError
from .output import atomic_output

FORMATS = ("table", "csv", "json", "nl", "parquet")
#: The file extensions of each format: an output named for one format is not written in another.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "table": (".txt",), "csv": (".csv",), "json": (".json",), "nl": (".jsonl", ".ndjson"), "parquet": (".parquet",),
}
MAX_CELL = 40
MAX_LIST_ITEMS = 4
# A table's columns are as wide as their widest cell over the first TABLE_ALIGN_ROWS rows, held
# back until then (cells are at most MAX_CELL characters: about 4 MB for 10 columns); a longer
# result streams on with those widths.
TABLE_ALIGN_ROWS = 10_000


def format_for(output: Path | None, requested: str | None) -> str:
    """The format to write: the one asked for, else from the output's extension, else a table.

    A format asked for that the output's extension contradicts (``--format csv -o x.parquet``)
    is an error, not a CSV file named .parquet.
    """
    named = _format_of_extension(output) if output is not None else None
    if requested:
        if requested not in FORMATS:
            raise EwError(f"unknown format {requested!r}; choose one of {', '.join(FORMATS)}")
        if named is not None and named != requested:
            expected = " or ".join(EXTENSIONS[requested])
            raise EwError(
                f"--format {requested} writes a {expected} file, but {output} names a {named} file; "
                f"name it {output.with_suffix(EXTENSIONS[requested][0])}, or leave out --format to write {named}"
            )
        return requested
    return named or "table"


def _format_of_extension(output: Path) -> str | None:
    suffix = output.suffix.lower()
    return next((fmt for fmt, suffixes in EXTENSIONS.items() if suffix in suffixes), None)


# -- writing ------------------------------------------------------------------------------------


def write_result(reader: pa.RecordBatchReader, *, fmt: str, output: Path | None, stdout: TextIO) -> int:
    """Stream ``reader`` to ``output`` (or ``stdout``) in ``fmt``; returns the number of rows.

    Control characters in a table, or in CSV shown on a terminal, are written escaped (``\\x1b``).
    """
    if fmt == "parquet" and output is None:
        raise EwError("--format parquet needs --output FILE")
    reader = for_format(reader, fmt=fmt)
    if output is None:
        escape = fmt == "csv" and _is_terminal(stdout)
        return _write_csv(reader, stdout, escape=escape) if fmt == "csv" else _WRITERS[fmt](reader, stdout)
    with atomic_output(output, "w" if fmt in ("table", "json", "nl") else "wb") as handle:
        return _WRITERS[fmt](reader, handle)


def _is_terminal(stream: IO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


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


def json_text(value: object) -> str:
    """One JSON value on one line, safe to print: C1 controls and bidi marks escaped too."""
    return json.dumps(value, default=str, ensure_ascii=False).translate(_JSON_ESCAPES)


def _records(reader: pa.RecordBatchReader) -> Iterator[dict]:
    names = unique_names(reader.schema.names)
    for batch in reader:
        columns = [column.to_pylist() for column in batch.columns]
        for values in zip(*columns):
            yield dict(zip(names, values))


def _write_nl(reader: pa.RecordBatchReader, handle: IO) -> int:
    return _write_json_records(_records(reader), handle, array=False)


def _write_json(reader: pa.RecordBatchReader, handle: IO) -> int:
    return _write_json_records(_records(reader), handle, array=True)


def _write_json_records(records: Iterable[dict], handle: IO, *, array: bool) -> int:
    """One object per line, or (``array``) the same lines as one JSON array, streamed."""
    rows = 0
    for record in records:
        if array:
            handle.write(",\n " if rows else "[")
        handle.write(json_text(record) + ("" if array else "\n"))
        rows += 1
    if array:
        handle.write("]\n" if rows else "[]\n")
    return rows


def write_records(records: list[dict], *, fmt: str, stdout: TextIO) -> int:
    """Rows a command builds itself (``ew log``, ``ew models``, ``ew heads``) as csv, json or nl.

    In CSV a nested value (a dict, a list) is one cell of JSON text.
    """
    if fmt in ("json", "nl"):
        return _write_json_records(records, stdout, array=fmt == "json")
    if fmt != "csv":
        raise EwError(f"cannot print these rows as {fmt}; choose csv, json or nl")
    flat = [{k: json_text(v) if isinstance(v, (dict, list)) else v for k, v in record.items()} for record in records]
    return write_result(pa.Table.from_pylist(flat).to_reader(), fmt="csv", output=None, stdout=stdout)


def _cell(value: object) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, list) and value and isinstance(value[0], tuple):  # a MAP's entries, shown as DuckDB does
        text = "{" + ", ".join(f"{_cell(key)}={_cell(item)}" for key, item in value) + "}"
    elif isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:MAX_LIST_ITEMS])
        text = f"[{shown}, ...] ({len(value)})" if len(value) > MAX_LIST_ITEMS else f"[{shown}]"
    else:
        text = str(value)
    text = escape_controls(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _write_table(reader: pa.RecordBatchReader, handle: IO, *, align_rows: int = TABLE_ALIGN_ROWS) -> int:
    """An aligned text table: columns as wide as their widest cell over the first ``align_rows``
    rows (held back until then), so a result of any length streams with bounded memory."""
    names = [escape_controls(name) for name in reader.schema.names]
    held: list[tuple[str, ...]] = []
    widths: list[int] | None = None
    rows = 0
    for batch in reader:
        cells = zip(*([_cell(v) for v in column.to_pylist()] for column in batch.columns))
        if widths is None:
            held.extend(cells)
            if len(held) > align_rows:
                widths = _widths(names, held)
                _write_rows(handle, names, held, widths, header=True)
                held = []
        else:
            _write_rows(handle, names, cells, widths, header=False)
        rows += batch.num_rows
    if widths is None:
        _write_rows(handle, names, held, _widths(names, held), header=True)
    handle.write(f"({rows} row{'s' if rows != 1 else ''})\n")
    return rows


def _widths(names: list[str], rows: list[tuple[str, ...]]) -> list[int]:
    return [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(names)]


def _write_rows(handle: IO, names: list[str], rows: Iterable[tuple[str, ...]], widths: list[int], *, header: bool) -> None:
    if header:
        handle.write("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip() + "\n")
        handle.write("  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        handle.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


_WRITERS = {"table": _write_table, "csv": _write_csv, "json": _write_json, "nl": _write_nl, "parquet": _write_parquet}
