"""The warehouse's tables: names, Arrow schemas and partitioning.

Table names are part of the user contract: they are folder names on disk, view names in
`ew query`, and what Polars, DuckDB or Spark open without ew.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
        # The vectors of models ingested with --vector-precision fp16; see VECTOR_PRECISIONS.
        pa.field("embedding_fp16", pa.binary()),
    ]
)
#: Stored vector precision -> the column holding its vectors; every row fills exactly one of them,
#: and a model key (which includes the precision) never has rows in the other.
#:
#: fp16 vectors are the little-endian half floats of one vector in a plain binary column, as
#: ``token_states.states`` stores its matrices: Delta Lake has no float16 type (deltalake 1.6
#: refuses ``list<halffloat>`` and ``fixed_size_list<halffloat>``: "Invalid data type for Delta
#: Lake: Float16"), and the alternative it takes, ``list<int16>`` of the bit patterns, measured
#: 991 bytes a row against 710 for the blob and 1,421 for ``list<float32>`` (20,000 384-wide
#: vectors with their doc_hash, ZSTD): the blob is the one that halves the bytes. Readers:
#:
#:   NumPy/pyarrow: np.frombuffer(row["embedding_fp16"], "<f2").astype(np.float32)
#:   Polars:        pl.col("embedding_fp16").bin.reinterpret(dtype=pl.Array(pl.Float16, dim)).cast(pl.Array(pl.Float32, dim))
#:   DuckDB:        has no float16 type and no function that reads numbers out of a BLOB; `ew query`'s
#:                  ``embeddings`` view decodes ``embedding`` for these rows (:func:`warehouse.query.register_embeddings`)
#:
#: (:func:`float32_vectors` does it for ew's own readers.)
VECTOR_PRECISIONS: dict[str, str] = {"fp32": "embedding", "fp16": "embedding_fp16"}

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
        pa.field("vector_precision", pa.string()),
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


def vector_columns(matrix: np.ndarray, precision: str = "fp32") -> dict[str, pa.Array]:
    """(n, dim) float32 -> both vector columns of ``embeddings``: the one of ``precision`` filled, the other null."""
    rows, dim = matrix.shape
    columns = {"embedding": pa.nulls(rows, EMBEDDINGS_SCHEMA.field("embedding").type),
               "embedding_fp16": pa.nulls(rows, pa.binary())}
    if precision == "fp16":
        offsets = np.arange(rows + 1, dtype=np.int64) * (dim * 2)  # one blob of dim half floats a row
        if offsets[-1] >= 2**31:
            raise ValueError(f"{offsets[-1]} bytes of vectors in one column: write fewer rows at a time")
        values = np.ascontiguousarray(matrix, dtype=STATE_DTYPES["fp16"])
        columns["embedding_fp16"] = pa.Array.from_buffers(
            pa.binary(), rows, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values)])
    else:
        columns["embedding"] = vector_column(matrix)
    return columns


def fp16_vectors(blobs: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """``embedding_fp16`` blobs -> ``list<float32>`` vectors (null where a blob is null), without a copy per row."""
    if isinstance(blobs, pa.ChunkedArray):
        blobs = blobs.combine_chunks()
    blobs = blobs.cast(pa.binary())
    if len(blobs) == 0:
        return pa.array([], pa.list_(pa.float32()))
    _, offsets_buffer, data = blobs.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32)[blobs.offset : blobs.offset + len(blobs) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    values = (np.frombuffer(data, np.uint8)[start:end] if data is not None else np.empty(0, np.uint8)).view("<f2")
    return pa.ListArray.from_arrays(pa.array((offsets - start) // 2, pa.int32()), pa.array(values.astype(np.float32)),
                                    mask=blobs.is_null() if blobs.null_count else None)


def float32_vectors(rows: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """``rows`` of ``embeddings`` with every vector as float32 in ``embedding`` (fp16 ones decoded) and
    no ``embedding_fp16`` column: what ew's readers compute on."""
    if "embedding_fp16" not in rows.schema.names:
        return rows
    index = rows.schema.get_field_index("embedding_fp16")
    stored = rows.column(index)
    rows = rows.drop_columns(["embedding_fp16"])
    if stored.null_count == len(stored):
        return rows
    decoded = fp16_vectors(stored)
    if "embedding" in rows.schema.names:
        at = rows.schema.get_field_index("embedding")
        column = rows.column(at)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return rows.set_column(at, "embedding", pc.coalesce(column.cast(decoded.type), decoded))
    return rows.append_column("embedding", decoded)


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
    interpreter and abort it at exit). Columns a file lacks (added by later writes) read as null,
    and so do ew's columns that the table predates (``embedding_fp16`` of a warehouse written
    before it existed), so readers see one schema whatever version wrote the table.
    """
    schema = pa.schema(table.schema().to_arrow())
    schema = pa.schema(list(schema) + [field for field in SCHEMAS.get(name, ()) if field.name not in schema.names])
    files = [storage.fs_path(uri) for uri in table.file_uris()]
    if not files:
        return pads.dataset(schema.empty_table())
    partitions = table.metadata().partition_columns
    partitioning = (
        pads.partitioning(pa.schema([schema.field(name) for name in partitions]), flavor="hive") if partitions else None
    )
    return pads.dataset(files, schema=schema, format="parquet", partitioning=partitioning, filesystem=storage.fs,
                        partition_base_dir=storage.fs_path(storage.table_uri(name)))
