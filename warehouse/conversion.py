"""Rewriting the columns a format cannot hold, by DuckDB, mostly to DuckDB's own text for them.

An interval in Parquet, ``'infinity'::date`` for Python's datetime, bytes in CSV: each becomes a
value the format holds, nested values included, one record batch at a time.
"""
from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pyarrow as pa

from .errors import EwError, first_line


def for_format(reader: pa.RecordBatchReader, *, fmt: str) -> pa.RecordBatchReader:
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
