"""`ew predict`: apply a stored head to a corpus file or to stored documents.

    predict("ew-warehouse", "section-20261122-101500", corpus_file=Path("new.jsonl"), output=Path("out.parquet"))

A corpus file is scored without touching `documents`: its texts that have no vector of the
head's model/layer yet are embedded and stored in `embeddings` (so the next run reuses them),
then every line gets a prediction. With ``where``, stored documents are scored. The head runs
in NumPy from its safetensors file: loading it executes no code.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from warehouse import Warehouse
from warehouse.errors import EwError, HeadError, InputError, QueryError, first_line
from warehouse.formats import atomic_output
from warehouse.keys import doc_hash
from warehouse.query import connect
from warehouse.splits import DocumentFilter
from warehouse.tables import EMBEDDINGS

from .corpus import Record, read_corpus
from .fitting import check_head_name, list_heads
from .heads import LoadedHead, load_head
from .ingest import embed_missing, ensure_vectors

CHUNK = 4096


@dataclass(frozen=True)
class PredictResult:
    head: str
    output: str
    rows: int
    embedded: int   # distinct texts embedded by this run
    reused: int     # distinct texts whose vectors were stored already
    rejected: int   # corpus lines skipped with --on-error skip
    seconds: float
    version: int    # the warehouse version the vectors were read from

    def to_dict(self) -> dict:
        return asdict(self)


def open_head(warehouse: Warehouse, name: str) -> LoadedHead:
    check_head_name(name)
    registered = {row["head"]: row for row in list_heads(warehouse)}
    if name not in registered:
        raise HeadError(
            f"no head named {name!r} (heads: {', '.join(registered) or 'none yet: run `ew fit-head`'}); see `ew heads`"
        )
    return load_head(warehouse.root / registered[name]["artifact"])


def predict(
    warehouse: Warehouse | str | Path,
    head: str,
    *,
    output: Path,
    corpus_file: Path | None = None,
    where: str | None = None,
    version: int | None = None,
    text_field: str = "text",
    id_field: str = "id",
    on_error: str = "fail",
    threads: int | None = None,
) -> PredictResult:
    """Write id, doc_hash, the predicted label, its probability and every class's probability to ``output``."""
    started = time.perf_counter()
    if (corpus_file is None) == (where is None):
        raise EwError("give either a corpus file or --where (a condition on stored documents), not both")
    if version is not None and corpus_file is not None:
        raise EwError("--version pins stored documents: use it with --where, not with a corpus file")
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise EwError(f"--output must end in .parquet or .csv, not {output.name!r}")
    if not output.parent.is_dir():
        raise EwError(f"cannot write {output}: the directory {output.parent} does not exist")
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse)
    loaded = open_head(warehouse, head)
    model, layer, pooling = loaded.card["model"], loaded.card["layer"], loaded.card["pooling"]

    if corpus_file is not None:
        lines = _Lines(corpus_file, text_field=text_field, id_field=id_field, on_error=on_error)
        with warehouse.writer() as writer:
            embedded, _ = embed_missing(writer, lines.texts(), model_key=model, layers=[layer], pooling=pooling,
                                        threads=threads, operation="embed-for-predict")
        snapshot = warehouse.snapshot()
        vectors = warehouse.dataset(EMBEDDINGS, snapshot)
        rows = _write_predictions(lines.scored(vectors, model=model, layer=layer, pooling=pooling), loaded, output)
        return PredictResult(head=head, output=str(output), rows=rows, embedded=embedded,
                             reused=len(lines.distinct) - embedded, rejected=lines.rejected,
                             seconds=round(time.perf_counter() - started, 3), version=snapshot.version)

    documents = DocumentFilter(where=where)
    embedded = 0
    if version is None:
        embedded = ensure_vectors(warehouse, documents, model_key=model, layer=layer, pooling=pooling,
                                  threads=threads, operation="embed-for-predict")
    snapshot = warehouse.snapshot(version)
    con = connect(warehouse.datasets(snapshot))
    try:
        condition, params = documents.condition()
        reader = con.sql(
            f"SELECT d.corpus, d.id, d.doc_hash, e.embedding "
            f"FROM (SELECT corpus, id, doc_hash FROM documents WHERE {condition}) d "
            "JOIN (SELECT doc_hash, embedding FROM embeddings WHERE model = ? AND layer = ? AND pooling = ?) e "
            "USING (doc_hash) ORDER BY d.corpus, d.id",
            params=params + [model, layer, pooling],
        ).to_arrow_reader(CHUNK)
        rows = _write_predictions(reader, loaded, output)
        distinct = con.execute(
            f"SELECT count(DISTINCT doc_hash) FROM documents WHERE {condition}", params
        ).fetchone()[0]
    except duckdb.Error as error:
        raise QueryError(f"reading the documents to predict failed: {first_line(error)}") from None
    finally:
        con.close()
    return PredictResult(head=head, output=str(output), rows=rows, embedded=embedded, reused=distinct - embedded,
                         rejected=0, seconds=round(time.perf_counter() - started, 3), version=snapshot.version)


class _Lines:
    """The records of a corpus file, read twice: once to embed what is missing, once to score."""

    def __init__(self, path: Path, *, text_field: str, id_field: str, on_error: str):
        self.path, self.text_field, self.id_field, self.on_error = path, text_field, id_field, on_error
        self.rejected = 0
        self.distinct: set[str] = set()

    def _chunks(self, *, count: bool) -> Iterator[tuple[list[Record], list[str]]]:
        chunk: list[Record] = []
        for item in read_corpus(self.path, text_field=self.text_field, id_field=self.id_field):
            if not isinstance(item, Record):
                if self.on_error == "fail":
                    raise InputError(self.path, item.line, item.reason)
                self.rejected += count
                continue
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk, [doc_hash(r.text) for r in chunk]
                chunk = []
        if chunk:
            yield chunk, [doc_hash(r.text) for r in chunk]

    def texts(self) -> Iterator[pa.RecordBatch]:
        """(doc_hash, text) batches for embedding."""
        for records, keys in self._chunks(count=True):
            self.distinct.update(keys)
            yield pa.record_batch({"doc_hash": keys, "text": [r.text for r in records]})

    def scored(self, vectors, *, model: str, layer: int, pooling: str) -> Iterator[pa.RecordBatch]:
        """(id, doc_hash, embedding) batches in file order, vectors read from ``vectors``."""
        partition = (pc.field("model") == model) & (pc.field("layer") == layer) & (pc.field("pooling") == pooling)
        for records, keys in self._chunks(count=False):
            found = vectors.to_table(columns=["doc_hash", "embedding"],
                                     filter=partition & pc.field("doc_hash").isin(sorted(set(keys))))
            index = {key: i for i, key in enumerate(found.column("doc_hash").to_pylist())}
            missing = [key for key in keys if key not in index]
            if missing:
                raise EwError(f"no stored vector for {len(missing)} texts of {self.path}; run the command again")
            take = pa.array([index[key] for key in keys], pa.int64())
            yield pa.record_batch({
                "id": pa.array([r.id for r in records], pa.string()),
                "doc_hash": pa.array(keys, pa.string()),
                "embedding": found.column("embedding").take(take).combine_chunks(),
            })


def _write_predictions(batches, head: LoadedHead, output: Path) -> int:
    """Stream (key columns..., embedding) batches to ``output`` with the head's predictions."""
    classes = head.classes
    label = head.card["label"]
    schema = None
    rows = 0
    with atomic_output(output, "wb") as handle:
        writer = None
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                keys = [name for name in batch.schema.names if name != "embedding"]
                x = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                probabilities = head.predict_proba(x.reshape(batch.num_rows, -1))  # (B, C)
                best = probabilities.argmax(axis=1)
                columns = {name: batch.column(name) for name in keys}
                columns[f"predicted_{label}"] = pa.array([classes[i] for i in best], pa.string())
                columns["probability"] = pa.array(probabilities[np.arange(len(best)), best], pa.float32())
                for c, name in enumerate(classes):
                    columns[f"p_{name}"] = pa.array(probabilities[:, c], pa.float32())
                table = pa.table(columns)
                if writer is None:
                    schema = table.schema
                    writer = (pq.ParquetWriter(handle, schema, compression="zstd") if output.suffix.lower() == ".parquet"
                              else pacsv.CSVWriter(handle, schema))
                writer.write_table(table.cast(schema))
                rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
    return rows
