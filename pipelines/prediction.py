"""`ew predict`: apply a stored head to a corpus file or to stored documents.

    predict("ew-warehouse", "section-20261122-101500", corpus_file=Path("new.jsonl"), output=Path("out.parquet"))

Documents not embedded yet go through ingest first (so their vectors are stored and reused
next time); the head runs in NumPy from its safetensors file, no code is loaded.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from warehouse import Warehouse
from warehouse.errors import EwError, HeadError, QueryError
from warehouse.formats import atomic_output
from warehouse.query import connect
from warehouse.splits import DocumentFilter

from .corpus import Record, read_corpus
from .heads import LoadedHead, load_head
from .ingest import ensure_vectors, ingest
from .fitting import check_head_name, list_heads

FETCH_ROWS = 4096


@dataclass(frozen=True)
class PredictResult:
    head: str
    output: str
    rows: int
    embedded: int
    reused: int
    seconds: float
    version: int

    def to_dict(self) -> dict:
        return asdict(self)


def open_head(warehouse: Warehouse, name: str) -> LoadedHead:
    check_head_name(name)
    directory = warehouse.head_dir(name)
    if not directory.is_dir():
        known = [row["head"] for row in list_heads(warehouse)]
        raise HeadError(f"no head named {name!r} (heads: {', '.join(known) or 'none yet: run `ew fit-head`'}); see `ew heads`")
    return load_head(directory)


def predict(
    warehouse: Warehouse | str | Path,
    head: str,
    *,
    output: Path,
    corpus_file: Path | None = None,
    where: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
    on_error: str = "fail",
    threads: int | None = None,
) -> PredictResult:
    """Write id, doc_hash, the predicted label, its probability and every class's probability to ``output``."""
    started = time.perf_counter()
    if (corpus_file is None) == (where is None):
        raise EwError("give either a corpus file or --where (a condition on stored documents), not both")
    suffix = output.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise EwError(f"--output must end in .parquet or .csv, not {output.name!r}")
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse, create=corpus_file is not None)
    loaded = open_head(warehouse, head)
    card = loaded.card
    model, layer, pooling = card["model"], card["layer"], card["pooling"]

    if corpus_file is not None:
        result = ingest(warehouse, corpus_file, model=model, layers=[layer], pooling=pooling, text_field=text_field,
                        id_field=id_field, on_error=on_error, threads=threads, progress=False)
        embedded, reused = result.embedded, result.reused + result.duplicates
        ids = [item.id for item in read_corpus(corpus_file, text_field=text_field, id_field=id_field) if isinstance(item, Record)]
        selection = pa.table({"id": pa.array(list(dict.fromkeys(ids)), pa.string())})
        condition, params = "d.corpus = ? AND d.id IN (SELECT id FROM ew_selection)", [result.corpus]
    else:
        embedded = ensure_vectors(warehouse, DocumentFilter(where=where), model_key=model, layer=layer,
                                  pooling=pooling, threads=threads, operation="embed-for-predict")
        selection = None
        condition, params = f"({where})", []

    snapshot = warehouse.snapshot()
    con = connect(warehouse, snapshot)
    if selection is not None:
        con.register("ew_selection", selection)
    try:
        reader = con.sql(
            "SELECT d.id, d.doc_hash, e.embedding FROM documents d JOIN embeddings e USING (doc_hash) "
            f"WHERE e.model = ? AND e.layer = ? AND e.pooling = ? AND {condition} ORDER BY d.corpus, d.id",
            params=[model, layer, pooling] + params,
        ).to_arrow_reader(FETCH_ROWS)
        rows = _write_predictions(reader, loaded, output)
    except duckdb.Error as error:
        raise QueryError(f"reading the documents to predict failed: {str(error).splitlines()[0]}") from None
    finally:
        con.close()
    if corpus_file is None:
        reused = rows - embedded
    return PredictResult(head=head, output=str(output), rows=rows, embedded=embedded, reused=reused,
                         seconds=round(time.perf_counter() - started, 3), version=snapshot.version)


def _write_predictions(reader: pa.RecordBatchReader, head: LoadedHead, output: Path) -> int:
    classes = head.classes
    label = head.card["label"]
    schema = pa.schema(
        [pa.field("id", pa.string()), pa.field("doc_hash", pa.string()), pa.field(f"predicted_{label}", pa.string()),
         pa.field("probability", pa.float32())]
        + [pa.field(f"p_{name}", pa.float32()) for name in classes]
    )
    rows = 0
    with atomic_output(output, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema, compression="zstd") if output.suffix.lower() == ".parquet" else pacsv.CSVWriter(handle, schema)
        try:
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                vectors = batch.column("embedding")
                x = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(batch.num_rows, -1)
                probabilities = head.predict_proba(x)  # (B, C)
                best = probabilities.argmax(axis=1)
                columns = [batch.column("id"), batch.column("doc_hash"), pa.array([classes[i] for i in best], pa.string()),
                           pa.array(probabilities[np.arange(len(best)), best], pa.float32())]
                columns += [pa.array(probabilities[:, c], pa.float32()) for c in range(len(classes))]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                rows += batch.num_rows
        finally:
            writer.close()
    return rows
