"""A labelled training set in one step: (doc_hash, label, split, embedding) batches, streamed.

    reader = training_set(wh, label="section", model=key, layer=6, split="train")
    table = reader.read_all()
    x = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)  # (N, dim)

The vector column is ``FixedSizeList<float32>[dim]``, so NumPy, PyTorch, Polars and HF
``datasets`` see a 2-D array without converting row by row. A row's split follows the same
rule as fit-head (:class:`warehouse.splits.SplitSpec`: a function of doc_hash and seed), so
an exported ``test`` split is exactly the rows fit-head tests on.

Rows are distinct (doc_hash, label) pairs, as fit-head trains on them. DuckDB streams the
join (the narrow labelled keys are hashed, the vectors only pass through), so memory stays
flat whatever the number of vectors.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .catalog import ModelRow
from .errors import EwError, QueryError
from .formats import atomic_output
from .query import connect, sql_error_message
from .selection import INTERNAL_MEMORY_LIMIT, DocumentFilter, quote
from .similarity import VECTORS_SCHEMA
from .splits import SPLITS, SplitSpec, _vector_batches
from .tables import DOCUMENTS, EMBEDDINGS

if TYPE_CHECKING:
    from pathlib import Path

    from .store import Warehouse

SPLIT_CHOICES = SPLITS + ("all",)
BATCH_ROWS = 8192


def training_set_schema(label: str, dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("doc_hash", pa.string()),
        pa.field(label, pa.string()),
        pa.field("split", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ])


def training_set(
    warehouse: "Warehouse",
    *,
    label: str,
    model: str | None = None,
    layer: int | None = None,
    pooling: str | None = None,
    split: str = "all",
    spec: SplitSpec = SplitSpec(),
    corpus: str | None = None,
    where: str | None = None,
    version: int | None = None,
    batch_rows: int = BATCH_ROWS,
) -> pa.RecordBatchReader:
    """The labelled vectors of ``model`` / ``layer`` at ``version``, as a reader of
    (doc_hash, <label>, split, embedding FixedSizeList<float32>[dim]) batches.

    ``model`` is a registered key or unique key prefix (default: the only model stored; `ew export`
    also takes aliases); ``layer`` defaults to the model's last.

    ``split`` is train, val, test or all; ``spec`` gives the percentages and seed (fit-head's
    ``--split`` and ``--seed``). ``pooling`` defaults to the model's own.
    """
    if split not in SPLIT_CHOICES:
        raise EwError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    snapshot = warehouse.snapshot(version)
    row = _model_row(warehouse.models(version=snapshot.version), model, version=snapshot.version)
    layer = row.num_layers if layer is None else layer
    if not 0 <= layer <= row.num_layers:
        raise EwError(f"--layer {layer} does not exist; model {row.model} has layers 0..{row.num_layers}")
    datasets = warehouse.datasets(snapshot)
    documents = DocumentFilter(label=label, corpus=corpus, where=where)
    documents.check(datasets[DOCUMENTS].schema.names)
    condition, params = documents.condition()
    keep = "" if split == "all" else f"WHERE split = '{split}'"
    sql = (
        f"WITH labelled AS (SELECT DISTINCT doc_hash, CAST({quote(label)} AS VARCHAR) AS label, "
        f"{spec.sql('doc_hash')} AS split FROM documents WHERE {condition}) "
        f"SELECT l.doc_hash, l.label AS {quote(label)}, l.split, CAST(e.embedding AS FLOAT[{row.dim}]) AS embedding "
        f"FROM ew_vectors e JOIN (SELECT * FROM labelled {keep}) l USING (doc_hash)"
    )
    # The file describes itself: what a reader needs to reproduce or compare it.
    schema = training_set_schema(label, row.dim).with_metadata({
        "ew.warehouse_version": str(snapshot.version), "ew.model": row.model, "ew.layer": str(layer),
        "ew.pooling": pooling or row.pooling, "ew.label": label, "ew.split": split, "ew.split_sizes": spec.text,
        "ew.seed": str(spec.seed),
    })
    # The vectors stream through the join on the probe side: only the narrow keys are hashed.
    con = connect(datasets, memory_limit=INTERNAL_MEMORY_LIMIT, settings={"disabled_optimizers": "build_side_probe_side"})
    # One Parquet row group at a time, as fit-head reads them (a dataset scan reads ahead without bound).
    vectors = _vector_batches(datasets[EMBEDDINGS], model=row.model, layer=layer, pooling=pooling or row.pooling)
    con.register("ew_vectors", pa.RecordBatchReader.from_batches(VECTORS_SCHEMA, vectors))
    try:
        reader = con.sql(sql, params=params).to_arrow_reader(batch_rows)
    except duckdb.Error as error:
        con.close()
        raise QueryError(f"selecting the training set failed: {sql_error_message(error)}") from None

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                yield batch.cast(schema)
        except duckdb.Error as error:
            raise QueryError(f"reading the training set failed: {sql_error_message(error)}") from None
        finally:
            con.close()

    return pa.RecordBatchReader.from_batches(schema, batches())


def _model_row(rows: list[ModelRow], model: str | None, *, version: int) -> ModelRow:
    matches = [row for row in rows if model is None or row.model == model]
    if model is not None and not matches:
        matches = [row for row in rows if row.model.startswith(model)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(row.model for row in rows) or "none; ingest a corpus first"
    if matches:
        raise EwError(f"{'the warehouse holds several models' if model is None else repr(model) + ' matches several models'}"
                      f" ({', '.join(row.model for row in matches)}); choose one with --model")
    raise EwError(f"model {model!r} is not registered at warehouse version {version} (registered: {known})")


def write_training_set(reader: pa.RecordBatchReader, output: "Path") -> int:
    """Stream ``reader`` into the Parquet file ``output`` (written beside it, renamed into place); returns rows."""
    rows = 0
    with atomic_output(output, "wb") as handle, pq.ParquetWriter(handle, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows
