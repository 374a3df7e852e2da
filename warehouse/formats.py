"""Writing a streamed query result: an aligned table, CSV, JSON Lines or Parquet.

Every writer consumes record batches one at a time, so a result of millions of rows never
sits in memory. Files are written under a temporary name and renamed into place at the end:
a failed query leaves no partial file behind.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TextIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import EwError

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


@contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write ``path`` under a temporary name; rename into place only if the block succeeds."""
    temporary = path.with_name(f".{path.name}.ew-tmp-{os.getpid()}")
    try:
        with open(temporary, mode) as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_result(reader: pa.RecordBatchReader, *, fmt: str, output: Path | None, stdout: TextIO) -> int:
    """Stream ``reader`` to ``output`` (or ``stdout``) in ``fmt``; returns the number of rows."""
    if output is not None and not output.parent.is_dir():
        raise EwError(f"cannot write {output}: the directory {output.parent} does not exist")
    if fmt == "parquet":
        if output is None:
            raise EwError("--format parquet needs --output FILE")
        with atomic_output(output, "wb") as handle:
            return _write_parquet(reader, handle)
    if output is None:
        return _WRITERS[fmt](reader, stdout)
    with atomic_output(output, "wb" if fmt == "csv" else "w") as handle:
        return _WRITERS[fmt](reader, handle)


def _write_parquet(reader: pa.RecordBatchReader, handle: IO) -> int:
    rows = 0
    with pq.ParquetWriter(handle, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _write_csv(reader: pa.RecordBatchReader, handle: IO) -> int:
    # CSV has no list type: lists and structs are written as JSON text.
    if isinstance(handle, io.TextIOBase) or hasattr(handle, "encoding"):
        handle.flush()
        handle = handle.buffer
    rows = 0
    with pacsv.CSVWriter(handle, _flat_schema(reader.schema)) as writer:
        for batch in reader:
            writer.write_batch(_flatten_nested(batch))
            rows += batch.num_rows
    handle.flush()
    return rows


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
            handle.write(json.dumps(dict(zip(names, values)), default=str, ensure_ascii=False) + "\n")
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
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _write_table(reader: pa.RecordBatchReader, handle: IO) -> int:
    """An aligned text table. Column widths come from the header and the first batch, so it streams."""
    names = reader.schema.names
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


_WRITERS = {"table": _write_table, "csv": _write_csv, "json": _write_json}
