"""The tables ew writes match the JSON Schemas in schemas/."""
import json
from datetime import datetime
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest
from deltalake import DeltaTable

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def arrow_name(kind: pa.DataType) -> str:
    """The type as schemas/ spell it: list<float32>, timestamp[us, tz=UTC], int64, binary, ..."""
    if pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return "binary"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{arrow_name(kind.value_type)}>"
    if pa.types.is_timestamp(kind):
        return f"timestamp[{kind.unit}, tz={'UTC' if kind.tz in ('UTC', 'Etc/UTC', '+00:00') else kind.tz}]"
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "string"
    return {"float": "float32", "double": "float64"}.get(str(kind), str(kind))


def plain(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list) and value and all(isinstance(item, tuple) for item in value):
        return dict(value)  # an Arrow map reads as a list of (key, value) pairs
    if isinstance(value, bytes):
        return value.hex()  # JSON has no bytes: the schema describes binary columns as hex strings
    return value


@pytest.mark.parametrize("table, warehouse", [(t, "fitted") for t in ("documents", "embeddings", "models", "heads", "log")]
                         + [("token_states", "states_ingested")])
def test_written_tables_match_their_schema(request, table, warehouse):
    schema = json.loads((SCHEMAS / f"{table}.schema.json").read_text())
    delta = DeltaTable(str(request.getfixturevalue(warehouse).root / table)).to_pyarrow_table()
    assert delta.num_rows > 0
    for name, spec in schema["properties"].items():
        assert name in delta.column_names, name
        assert arrow_name(delta.schema.field(name).type) == spec["x-arrow-type"], name
    for row in delta.to_pylist()[:50]:
        jsonschema.validate({k: plain(v) for k, v in row.items() if v is not None or k in schema["required"]}, schema)


def test_corpus_lines_match_the_corpus_schema():
    schema = json.loads((SCHEMAS / "corpus_line.schema.json").read_text())
    example = Path(__file__).resolve().parent.parent / "examples" / "debian_sample.jsonl"
    for line in example.read_text().splitlines()[:100]:
        jsonschema.validate(json.loads(line), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": 1, "text": ""}, schema)
