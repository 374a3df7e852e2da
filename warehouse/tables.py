"""The warehouse's tables: names, Arrow schemas and partitioning.

Table names are part of the user contract: they are folder names on disk, view names in
`ew query`, and what Polars, DuckDB or Spark open without ew.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable

if TYPE_CHECKING:
    from .storage import LocalStorage

DOCUMENTS = "documents"
EMBEDDINGS = "embeddings"
MODELS = "models"
HEADS = "heads"
TOKEN_STATES = "token_states"
LOG = "log"

#: Tables a snapshot pins; ``log`` records their versions.
TABLES: tuple[str, ...] = (DOCUMENTS, EMBEDDINGS, MODELS, HEADS, TOKEN_STATES)

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: Columns of ``documents`` that ew owns; every other field of an input record becomes a column too.
DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("corpus", pa.string()),
        pa.field("id", pa.string()),
        pa.field("doc_hash", pa.string()),
        pa.field("text", pa.string()),
        # Fingerprint of the whole input record: an unchanged record is never rewritten.
        pa.field("record_hash", pa.string()),
        pa.field("ingested_at", TIMESTAMP),
    ]
)
RESERVED_DOCUMENT_COLUMNS = frozenset(DOCUMENTS_SCHEMA.names)

EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("doc_hash", pa.string()),
        pa.field("model", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("pooling", pa.string()),
        # A variable-size list so that models of different widths share the table.
        pa.field("embedding", pa.list_(pa.float32())),
    ]
)

#: Layer-K hidden states of every real token (no padding), one row per (doc_hash, model, layer,
#: precision). ``states`` holds the row-major (n_tokens, dim) matrix as little-endian values of
#: ``precision`` ("fp16": 2 bytes, "fp32": 4 bytes each): a plain binary column, because every
#: reader decodes it without copying (a nested list of float16 is not a type Polars or DuckDB
#: read). To get the matrix back:
#:
#:   NumPy/pyarrow: np.frombuffer(row["states"], "<f2").reshape(row["n_tokens"], row["dim"])
#:   Polars:        for row in pl.read_delta("WH/token_states").iter_rows(named=True): the same frombuffer
#:   DuckDB:        filter and aggregate in SQL (octet_length(states) = n_tokens * dim * 2),
#:                  decode the BLOBs of the Arrow result with the same frombuffer
#:
#: (:func:`states_matrix` does it.)
TOKEN_STATES_SCHEMA = pa.schema(
    [
        pa.field("doc_hash", pa.string()),
        pa.field("model", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("precision", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("dim", pa.int32()),
        pa.field("states", pa.binary()),
    ]
)
#: Precision name -> the NumPy dtype of the values in ``token_states.states``.
STATE_DTYPES: dict[str, str] = {"fp16": "<f2", "fp32": "<f4"}

MODELS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("name", pa.string()),
        pa.field("source", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("dim", pa.int32()),
        pa.field("num_layers", pa.int32()),
        pa.field("max_length", pa.int32()),
        pa.field("pooling", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("max_abs_diff", pa.float64()),
        pa.field("artifact", pa.string()),
        pa.field("created_at", TIMESTAMP),
    ]
)

HEADS_SCHEMA = pa.schema(
    [
        pa.field("head", pa.string()),
        pa.field("model", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("pooling", pa.string()),
        pa.field("label", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("classes", pa.list_(pa.string())),
        pa.field("accuracy", pa.float64()),
        pa.field("macro_f1", pa.float64()),
        pa.field("train_rows", pa.int64()),
        pa.field("val_rows", pa.int64()),
        pa.field("test_rows", pa.int64()),
        pa.field("trained_on_version", pa.int64()),
        pa.field("artifact", pa.string()),
        pa.field("card", pa.string()),
        pa.field("created_at", TIMESTAMP),
    ]
)

LOG_SCHEMA = pa.schema(
    [
        pa.field("version", pa.int64()),
        pa.field("committed_at", TIMESTAMP),
        pa.field("operation", pa.string()),
        pa.field("rows_added", pa.int64()),
        pa.field("detail", pa.string()),
        # The Delta version of each table in TABLES that this warehouse version pins; -1: not
        # created yet. A map, so that a new table is one more key, not one more column.
        pa.field("pins", pa.map_(pa.string(), pa.int64())),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    DOCUMENTS: DOCUMENTS_SCHEMA,
    EMBEDDINGS: EMBEDDINGS_SCHEMA,
    MODELS: MODELS_SCHEMA,
    HEADS: HEADS_SCHEMA,
    TOKEN_STATES: TOKEN_STATES_SCHEMA,
    LOG: LOG_SCHEMA,
}

PARTITIONS: dict[str, list[str]] = {
    DOCUMENTS: ["corpus"],
    EMBEDDINGS: ["model", "layer"],
    MODELS: [],
    HEADS: [],
    TOKEN_STATES: ["model", "layer"],
    LOG: [],
}


def vector_column(matrix: np.ndarray) -> pa.ListArray:
    """(n, dim) float32 -> the ``embedding`` column type, without converting row by row."""
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)))


def states_column(states: Sequence[np.ndarray], precision: str) -> pa.BinaryArray:
    """(n_i, dim) matrices -> the ``states`` column: each one's values as little-endian ``precision``.

    One concatenation and one offsets array, so no per-row Python bytes objects are made.
    """
    dtype = np.dtype(STATE_DTYPES[precision])
    sizes = np.fromiter((matrix.size * dtype.itemsize for matrix in states), dtype=np.int64, count=len(states))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of states in one column: write fewer rows at a time")
    data = np.concatenate([np.ascontiguousarray(m, dtype=dtype).reshape(-1) for m in states]) if states else np.empty(0, dtype)
    return pa.Array.from_buffers(pa.binary(), len(states), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def states_matrix(row: dict) -> np.ndarray:
    """The (n_tokens, dim) matrix of one ``token_states`` row (a dict as pyarrow/Polars give it), read-only."""
    dtype = STATE_DTYPES[row["precision"]]
    return np.frombuffer(row["states"], dtype).reshape(row["n_tokens"], row["dim"])


def delta_dataset(table: DeltaTable, storage: "LocalStorage", name: str) -> pads.Dataset:
    """A pyarrow dataset over the live Parquet files of one Delta version of table ``name``.

    The files come from the Delta log; they are read with the storage's own pyarrow filesystem
    (deltalake's dataset wraps a Python filesystem whose scanner threads can outlive the
    interpreter and abort it at exit). Columns a file lacks (added by later writes) read as null.
    """
    schema = pa.schema(table.schema().to_arrow())
    files = [storage.fs_path(uri) for uri in table.file_uris()]
    if not files:
        return pads.dataset(schema.empty_table())
    partitions = table.metadata().partition_columns
    partitioning = (
        pads.partitioning(pa.schema([schema.field(name) for name in partitions]), flavor="hive") if partitions else None
    )
    return pads.dataset(files, schema=schema, format="parquet", partitioning=partitioning, filesystem=storage.fs,
                        partition_base_dir=storage.fs_path(storage.table_uri(name)))
