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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from warehouse import Warehouse
from warehouse.errors import EwError, QueryError
from warehouse.output import atomic_output
from warehouse.keys import doc_hash
from warehouse.query import connect, sql_error_message
from warehouse.selection import DocumentFilter
from warehouse.tables import EMBEDDINGS, VECTOR_PRECISIONS, float32_vectors

from .corpus import Record, read_corpus
from .embedding import embed_missing, ensure_vectors
from .head_catalog import open_head
from .heads import LoadedHead
from .registry import open_model
from .rejects import Rejects, check_on_error

CHUNK = 4096


@dataclass(frozen=True)
class PredictResult:
    head: str
    output: str
    rows: int
    embedded: int   # distinct texts embedded by this run
    reused: int     # distinct texts whose vectors were stored already
    rejected: int   # corpus lines skipped with --on-error skip
    rejects_file: str | None  # where they were written
    seconds: float
    version: int    # the warehouse version the vectors were read from

    def to_dict(self) -> dict:
        return asdict(self)


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
    rejects_file: Path | None = None,
    threads: int | None = None,
) -> PredictResult:
    """Write id, doc_hash, the predicted label, its probability and every class's probability to ``output``.

    With ``on_error="skip"`` bad lines of the corpus file go to ``rejects_file`` (default:
    OUTPUT.rejects.jsonl beside the output) and the rest are scored.
    """
    started = time.perf_counter()
    check_on_error(on_error)
    if (corpus_file is None) == (where is None):
        raise EwError("give either a corpus file or --where (a condition on stored documents), not both")
    if version is not None and corpus_file is not None:
        raise EwError("--version pins stored documents: use it with --where, not with a corpus file")
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise EwError(f"--output must end in .parquet or .csv, not {output.name!r}")
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse)
    loaded = open_head(warehouse, head)
    if loaded.card.tune != "head":
        from .top_prediction import predict_above_layer

        return replace(predict_above_layer(warehouse, loaded, corpus_file=corpus_file, where=where, version=version,
                                           output=output, text_field=text_field, id_field=id_field,
                                           rejects_file=rejects_file, on_error=on_error, threads=threads),
                       head=head, seconds=round(time.perf_counter() - started, 3))
    if corpus_file is not None:
        rejects = Rejects(corpus_file, rejects_file or output.with_name(output.name + ".rejects.jsonl"), on_error=on_error)
        lines = CorpusLines(corpus_file, text_field=text_field, id_field=id_field, rejects=rejects)
        result = _predict_file(warehouse, loaded, lines, output=output, threads=threads)
    else:
        result = _predict_stored(warehouse, loaded, DocumentFilter(where=where), output=output, version=version,
                                 threads=threads)
    return replace(result, head=head, seconds=round(time.perf_counter() - started, 3))


def _predict_file(warehouse: Warehouse, head: LoadedHead, lines: "CorpusLines", *, output: Path,
                  threads: int | None) -> PredictResult:
    """Score every line of a corpus file; texts without a vector are embedded and stored first."""
    model, layer, pooling = head.card.model, head.card.layer, head.card.pooling
    with lines.rejects, warehouse.writer() as writer:
        summary = embed_missing(writer, lines.texts(), model=open_model(warehouse, model), layers=[layer],
                                threads=threads, operation="embed-for-predict")
    snapshot = warehouse.snapshot()
    vectors = warehouse.dataset(EMBEDDINGS, snapshot)
    rows = write_predictions(_vector_scores(lines.scored(vectors, model=model, layer=layer, pooling=pooling), head),
                              classes=head.classes, label=head.card.label, output=output)
    rejects = lines.rejects
    return PredictResult(head="", output=str(output), rows=rows, embedded=summary.embedded,
                         reused=len(lines.distinct) - summary.embedded, rejected=rejects.count,
                         rejects_file=str(rejects.path) if rejects.count else None, seconds=0.0,
                         version=snapshot.version)


def _predict_stored(warehouse: Warehouse, head: LoadedHead, documents: DocumentFilter, *, output: Path,
                    version: int | None, threads: int | None) -> PredictResult:
    """Score the stored documents matching ``documents`` (at ``version``: embedding nothing)."""
    model, layer, pooling = head.card.model, head.card.layer, head.card.pooling
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
        rows = write_predictions(_vector_scores(reader, head), classes=head.classes, label=head.card.label,
                                  output=output)
        distinct = con.execute(
            f"SELECT count(DISTINCT doc_hash) FROM documents WHERE {condition}", params
        ).fetchone()[0]
    except duckdb.Error as error:
        raise QueryError(f"reading the documents to predict failed: {sql_error_message(error)}") from None
    finally:
        con.close()
    return PredictResult(head="", output=str(output), rows=rows, embedded=embedded, reused=distinct - embedded,
                         rejected=0, rejects_file=None, seconds=0.0, version=snapshot.version)


class CorpusLines:
    """The records of a corpus file, read twice: once to embed what is missing, once to score."""

    def __init__(self, path: Path, *, text_field: str, id_field: str, rejects: Rejects):
        self.path, self.text_field, self.id_field, self.rejects = path, text_field, id_field, rejects
        self.distinct: set[str] = set()

    def chunks(self, *, first: bool) -> Iterator[tuple[list[Record], list[str]]]:
        chunk: list[Record] = []
        items = read_corpus(self.path, text_field=self.text_field, id_field=self.id_field)
        # Bad lines are reported (or written to the rejects file) on the first pass only.
        records = self.rejects.filter(items) if first else (item for item in items if isinstance(item, Record))
        for item in records:
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk, [doc_hash(r.text) for r in chunk]
                chunk = []
        if chunk:
            yield chunk, [doc_hash(r.text) for r in chunk]

    def texts(self) -> Iterator[pa.RecordBatch]:
        """(doc_hash, text) batches for embedding."""
        for records, keys in self.chunks(first=True):
            self.distinct.update(keys)
            yield pa.record_batch({"doc_hash": keys, "text": [r.text for r in records]})

    def scored(self, vectors, *, model: str, layer: int, pooling: str) -> Iterator[pa.RecordBatch]:
        """(id, doc_hash, embedding) batches in file order, vectors read from ``vectors``."""
        partition = (pc.field("model") == model) & (pc.field("layer") == layer) & (pc.field("pooling") == pooling)
        for records, keys in self.chunks(first=False):
            found = float32_vectors(vectors.to_table(columns=["doc_hash", *VECTOR_PRECISIONS.values()],
                                                     filter=partition & pc.field("doc_hash").isin(sorted(set(keys)))))
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


def _vector_scores(batches: Iterator[pa.RecordBatch], head: LoadedHead):
    """(key columns, probabilities) for (key columns..., embedding) batches of a plain head."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        x = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        keys = {name: batch.column(name) for name in batch.schema.names if name != "embedding"}
        yield keys, head.predict_proba(x.reshape(batch.num_rows, -1))  # (B, C)


def write_predictions(scored, *, classes: list[str], label: str, output: Path) -> int:
    """Stream (key columns, probabilities (B, C)) to ``output`` with the predicted class and every class's probability."""
    schema = None
    rows = 0
    with atomic_output(output, "wb") as handle:
        writer = None
        try:
            for columns, probabilities in scored:
                best = probabilities.argmax(axis=1)
                columns = dict(columns)
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
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    return rows
