"""Writing a streamed query result: an aligned table, CSV, JSON Lines or Parquet.

Every writer consumes record batches one at a time, so a result of millions of rows never
sits in memory. Files are written through :func:`warehouse.output.atomic_output` (whole or not
at all; a FIFO or a device in place), and a column a format cannot hold is first rewritten by
:func:`warehouse.conversion.for_format`.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import IO, TextIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .conversion import for_format
from .errors import EwError
from .output import atomic_output

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL = 40
MAX_LIST_ITEMS = 4


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
    with atomic_output(output, "w" if fmt in ("table", "json") else "wb") as handle:
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
