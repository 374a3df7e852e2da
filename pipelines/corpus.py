"""Reading a JSONL corpus (plain or gzip), one validated record at a time.

Every line becomes a :class:`Record` or a :class:`Rejected` that says why, with its line
number; the reader never stops on bad input, the caller decides (``--on-error``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from warehouse.errors import EwError
from warehouse.tables import RESERVED_DOCUMENT_COLUMNS

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Record:
    line: int
    id: str
    text: str
    fields: dict  # every other field of the record, values fitted to their column's type


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str
    raw: str

    def to_dict(self, path: Path) -> dict:
        return {"file": str(path), "line": self.line, "reason": self.reason, "raw": self.raw}


def corpus_name(path: Path) -> str:
    """The default corpus name: the file name without .gz and .jsonl/.json."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or path.name


def open_lines(path: Path) -> Iterator[bytes]:
    """Raw lines of a file, gunzipped when it starts with the gzip magic bytes."""
    if not path.is_file():
        raise EwError(f"corpus file {path} does not exist or is not a file")
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            yield from handle
    except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
        raise EwError(f"{path}: cannot read the file ({error}); is it a complete JSONL or .jsonl.gz file?") from None


def count_lines(path: Path) -> int:
    return sum(1 for _ in open_lines(path))


# The column type a JSON value takes in `documents` when its field first appears.
def _kind_of(value: object) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()  # strings, and lists / objects stored as JSON text


class FieldTypes:
    """The column type of each extra field, fixed by the table or by its first non-null value."""

    def __init__(self, schema: pa.Schema | None = None):
        self.types: dict[str, pa.DataType] = {}
        if schema is not None:
            for field in schema:
                if field.name not in RESERVED_DOCUMENT_COLUMNS:
                    self.types[field.name] = field.type

    def fit(self, name: str, value: object) -> object:
        """``value`` as its column stores it; raises ValueError when it cannot fit."""
        if name not in self.types:
            # Delta column names are case-insensitive: `Section` would collide with `section`.
            clash = next((known for known in self.types if known.lower() == name.lower()), None)
            if clash is None:
                clash = next((known for known in RESERVED_DOCUMENT_COLUMNS if known == name.lower()), None)
            if clash is not None:
                raise ValueError(f"field {name!r} differs from the column {clash!r} only in case; rename one of them")
        if value is None:
            return None
        kind = self.types.setdefault(name, _kind_of(value))
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        if pa.types.is_boolean(kind) and isinstance(value, bool):
            return value
        if pa.types.is_integer(kind) and isinstance(value, int) and not isinstance(value, bool):
            return value
        if pa.types.is_floating(kind) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(
            f"field {name!r} holds {type(value).__name__} {json.dumps(value)[:40]} but its column is {kind} "
            "(set by earlier records); make the field's type consistent"
        )

    def schema(self) -> list[pa.Field]:
        return [pa.field(name, kind) for name, kind in self.types.items()]


def read_corpus(
    path: Path,
    *,
    text_field: str = "text",
    id_field: str = "id",
    field_types: FieldTypes | None = None,
) -> Iterator[Record | Rejected]:
    """Yield a Record or a Rejected for every non-blank line of ``path``."""
    field_types = field_types or FieldTypes()
    for number, raw in enumerate(open_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield Rejected(number, f"not valid UTF-8 (byte {error.start})", raw.decode("utf-8", "replace").rstrip("\n"))
            continue
        yield _parse(number, line.rstrip("\r\n"), text_field=text_field, id_field=id_field, field_types=field_types)


def _parse(number: int, line: str, *, text_field: str, id_field: str, field_types: FieldTypes) -> Record | Rejected:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        return Rejected(number, f"not valid JSON ({error.msg} at column {error.colno})", line)
    if not isinstance(obj, dict):
        return Rejected(number, f"a JSON {type(obj).__name__}, not an object", line)
    if text_field not in obj:
        return Rejected(number, f"no {text_field!r} field (choose another with --text-field)", line)
    text = obj.pop(text_field)
    if not isinstance(text, str):
        return Rejected(number, f"field {text_field!r} is {type(text).__name__}, not a string", line)
    if not text.strip():
        return Rejected(number, f"field {text_field!r} is empty", line)
    record_id = obj.pop(id_field, None)
    if record_id is None:
        # Stable across runs and positions: the same line always gets the same id.
        record_id = "line-" + hashlib.sha256(line.encode("utf-8")).hexdigest()[:16]
    elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return Rejected(number, f"field {id_field!r} is {type(record_id).__name__}; ids must be strings or integers", line)
    fields = {}
    for name, value in obj.items():
        if name in RESERVED_DOCUMENT_COLUMNS:
            return Rejected(
                number,
                f"field {name!r} is a column ew keeps itself ({', '.join(sorted(RESERVED_DOCUMENT_COLUMNS))}); rename it",
                line,
            )
        try:
            fields[name] = field_types.fit(name, value)
        except ValueError as error:
            return Rejected(number, str(error), line)
    return Record(line=number, id=str(record_id), text=text, fields=fields)
