"""Reading a JSONL corpus (plain or gzip), one validated record at a time.

Every line becomes a :class:`Record` or a :class:`Rejected` that says why, with its line
number; the reader never stops on bad input, the caller decides (``--on-error``, see
:mod:`pipelines.rejects`). Hostile input is a rejected line too: a line over
``MAX_LINE_BYTES`` (never held whole), JSON nested past ``MAX_NESTING``, integers beyond
64 bits, NaN inside nested values, lone UTF-16 surrogate escapes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from warehouse.errors import EwError
from warehouse.tables import RESERVED_DOCUMENT_COLUMNS

GZIP_MAGIC = b"\x1f\x8b"
# A 5 MB line made ingest grow by 730 MB (the tokenizer splits all of it before truncating), and
# only a text's first max_length tokens are embedded anyway: longer lines are rejected unread.
MAX_LINE_BYTES = 8 * 1024 * 1024
REJECTED_PREFIX_BYTES = 4096  # what the rejects file keeps of a line over the limit
_SKIP_BLOCK = 1024 * 1024     # the rest of such a line is read past in blocks of this size
# Lists/objects inside a field; deeper values are rejected before json.dumps could hit Python's
# recursion limit (the parser itself gives up near 1,000 levels).
MAX_NESTING = 100
INT64 = (-(2**63), 2**63 - 1)
MAX_CORPUS_NAME = 100
# A corpus name is a Hive partition value of `documents` and part of the rejects file's name.
_CORPUS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    line: int
    id: str
    text: str
    fields: dict  # every other field of the record, values fitted to their column's type


@dataclass(frozen=True)
class Rejected:
    """A line that cannot be a record; ``raw`` is the line, or the first bytes of one over the limit."""

    line: int
    reason: str
    raw: str

    def to_dict(self, path: Path) -> dict:
        return {"file": str(path), "line": self.line, "reason": self.reason, "raw": self.raw}


def check_corpus_name(name: str) -> str:
    """``name`` if it can name a corpus (a partition value and a file name), else EwError.

        check_corpus_name("news-2026")  # -> "news-2026"
    """
    if len(name) <= MAX_CORPUS_NAME and _CORPUS_NAME.fullmatch(name):
        return name
    raise EwError(
        f"corpus name {_shown(name)} is not allowed: use 1 to {MAX_CORPUS_NAME} letters (a-z, A-Z), digits, "
        "'.', '_' or '-', not starting with '.' or '-'; e.g. --corpus news-2026"
    )


def corpus_name(path: Path) -> str:
    """The default corpus name: the file name without .gz and .jsonl/.json, made a valid name.

        corpus_name(Path("Les Misérables.jsonl.gz"))  # -> "Les-Mis-rables"
    """
    name = path.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name or path.name).strip(".-")[:MAX_CORPUS_NAME]
    return check_corpus_name(name or "corpus")


def _shown(name: str, width: int = 60) -> str:
    """``name`` quoted for a message, cut when long: a hostile name must not flood the error line."""
    if len(name) <= width:
        return repr(name)
    return f"{name[:width]!r}... ({len(name):,} characters)"


def open_lines(path: Path, *, max_line_bytes: int | None = None) -> Iterator[tuple[bytes, int]]:
    """(raw line, its size in bytes) for each line of a file, gunzipped when it starts with the gzip magic.

    A line over ``max_line_bytes`` is never held whole: it comes as its first bytes (at most
    ``REJECTED_PREFIX_BYTES``) with its full size, the rest is read past in blocks.
    """
    limit = max_line_bytes or MAX_LINE_BYTES
    if not path.is_file():
        raise EwError(f"corpus file {path} does not exist or is not a file")
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            while line := handle.readline(limit + 1):
                if line.endswith(b"\n") or len(line) <= limit:
                    yield line, len(line) - line.endswith(b"\n")
                    continue
                size, prefix = len(line), line[: min(limit, REJECTED_PREFIX_BYTES)]
                del line
                while (rest := handle.readline(_SKIP_BLOCK)) and not rest.endswith(b"\n"):
                    size += len(rest)
                yield prefix, size + max(len(rest) - 1, 0)  # the size without the newline
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


def _nodes(value: object) -> Iterator[tuple[object, int]]:
    """Every value inside ``value`` (object keys included) with its depth of lists/objects; no recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_value(name: str, value: object) -> None:
    """Raise ValueError when ``value`` is nested too deep or holds an integer beyond int64."""
    if not isinstance(value, (int, list, dict)) or isinstance(value, bool):
        return
    for item, depth in _nodes(value):
        if isinstance(item, (list, dict)) and depth >= MAX_NESTING:  # inside MAX_NESTING others already
            raise ValueError(
                f"field {_shown(name)} is nested more than {MAX_NESTING} levels deep; flatten it, or store it as a string"
            )
        if isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            digits = str(item)
            shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits)} digits)"
            raise ValueError(f"field {_shown(name)} holds the integer {shown}, which exceeds 64 bits; quote it as a string")


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
        _check_value(name, value)
        if name not in self.types:
            # Delta column names are case-insensitive: `Section` would collide with `section`.
            clash = next((known for known in self.types if known.lower() == name.lower()), None)
            if clash is None:
                clash = next((known for known in RESERVED_DOCUMENT_COLUMNS if known == name.lower()), None)
            if clash is not None:
                raise ValueError(f"field {_shown(name)} differs from the column {clash!r} only in case; rename one of them")
        if value is None:
            return None
        kind = self.types.setdefault(name, _kind_of(value))
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if isinstance(value, str):
                return value
            try:
                return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
            except ValueError:  # the stored text must stay valid JSON, which has no NaN/Infinity
                raise ValueError(
                    f"field {_shown(name)} holds NaN or Infinity, which its column of JSON text cannot store; "
                    "use null, or a string"
                ) from None
        if pa.types.is_boolean(kind) and isinstance(value, bool):
            return value
        if pa.types.is_integer(kind) and isinstance(value, int) and not isinstance(value, bool):
            return value
        if pa.types.is_floating(kind) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(
            f"field {_shown(name)} holds {type(value).__name__} {json.dumps(value)[:40]} but its column is {kind} "
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
    max_line_bytes: int | None = None,
) -> Iterator[Record | Rejected]:
    """Yield a Record or a Rejected for every non-blank line of ``path``.

    ``max_line_bytes`` (default ``MAX_LINE_BYTES``, 8 MiB) caps a line's UTF-8 size.
    """
    field_types = field_types or FieldTypes()
    limit = max_line_bytes or MAX_LINE_BYTES
    for number, (raw, size) in enumerate(open_lines(path, max_line_bytes=limit), start=1):
        if size > limit:
            reason = (
                f"the line is {size:,} bytes, over the limit of {limit:,} bytes per line; shorten its text "
                "(only its first max_length tokens are embedded anyway) or split it into several records"
            )
            yield Rejected(number, reason, raw.decode("utf-8", "replace"))
            continue
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
    except ValueError:  # Python refuses to convert integers of more than 4,300 digits
        return Rejected(number, "an integer of over 4,300 digits, too long to read; quote it as a string", line)
    except RecursionError:
        return Rejected(number, f"lists or objects nested more than {MAX_NESTING} levels deep; flatten them", line)
    # An escape like \ud800 decodes to half a UTF-16 pair, which no UTF-8 column can store.
    if "\\u" in line and any(isinstance(item, str) and _SURROGATE.search(item) for item, _ in _nodes(obj)):
        return Rejected(number, "a \\u escape of a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character", line)
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
                f"field {_shown(name)} is a column ew keeps itself ({', '.join(sorted(RESERVED_DOCUMENT_COLUMNS))}); rename it",
                line,
            )
        try:
            fields[name] = field_types.fit(name, value)
        except ValueError as error:
            return Rejected(number, str(error), line)
    return Record(line=number, id=str(record_id), text=text, fields=fields)
