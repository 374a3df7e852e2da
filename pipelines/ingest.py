"""`ew ingest`: embed every document that is not stored yet and commit in chunks.

    result = ingest("ew-warehouse", Path("corpus.jsonl"), model="minilm")
    result.embedded, result.reused

A document is keyed by ``doc_hash``; an embedding by (doc_hash, model key, layer, pooling).
Before encoding, every key already stored is skipped, and identical texts are encoded once.
Each chunk is committed as one warehouse version, so an interrupted ingest keeps what it
committed and a rerun continues from there.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from warehouse import Warehouse, Writer
from warehouse.errors import EwError
from warehouse.keys import doc_hash, record_hash
from warehouse.splits import DocumentFilter, missing_vectors
from warehouse.store import now_utc
from warehouse.tables import DOCUMENTS, EMBEDDINGS, TIMESTAMP, vector_column

from .corpus import FieldTypes, Record, check_corpus_name, corpus_name, count_lines, read_corpus
from .progress import Progress
from .registry import model_row, prepare_model
from .rejects import Rejects, check_on_error

if TYPE_CHECKING:
    from .encoder import Encoder

DEFAULT_CHUNK = 4096
# Texts go to the encoder in groups of this many, sorted by length, so padding stays small
# and progress moves often.
ENCODE_GROUP = 512
# Changed records are written this many at a time: each write rewrites the corpus's partition.
UPDATE_BATCH = 50_000


@dataclass(frozen=True)
class IngestResult:
    corpus: str
    model: str
    layers: tuple[int, ...]
    read: int               # non-blank lines read
    new_documents: int      # (corpus, id) rows added
    updated_documents: int  # rows whose record changed
    embedded: int           # distinct texts encoded by this run
    reused: int             # records whose embeddings were stored already
    duplicates: int         # records whose text another record of this run already had
    rejected: int
    truncated: int          # encoded texts longer than max_length tokens, cut to it
    duplicate_ids: int      # records whose id appeared earlier in the file (the last one wins)
    seconds: float
    version: int | None     # the warehouse version after the run
    exported: bool          # the model was exported to ONNX by this run
    rejects_file: str | None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """``None``/"all" -> every layer 0..N; "last" or -1 -> N; "0,3,6" -> those."""
    if spec is None or spec == "all":
        return list(range(num_layers + 1))
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    layers = []
    for item in items:
        text = str(item).strip()
        if text == "last":
            value = num_layers
        else:
            try:
                value = int(text)
            except ValueError:
                raise EwError(f"--layers: {text!r} is not a layer number (use 0..{num_layers}, 'last' or 'all')") from None
            if value < 0:
                value = num_layers + 1 + value
        if not 0 <= value <= num_layers:
            raise EwError(f"--layers: layer {text} does not exist; this model has layers 0..{num_layers}")
        if value not in layers:
            layers.append(value)
    return sorted(layers)


class StoredKeys:
    """Which (doc_hash, layer) pairs a model already has, read once from the newest table state."""

    def __init__(self, dataset: pads.Dataset, *, model: str, pooling: str, layers: Sequence[int]):
        self.layers = list(layers)
        self.by_layer: dict[int, set[str]] = {layer: set() for layer in layers}
        wanted = (pc.field("model") == model) & (pc.field("pooling") == pooling) & pc.field("layer").isin(self.layers)
        for batch in dataset.to_batches(columns=["doc_hash", "layer"], filter=wanted):
            for layer, hashes in _group_by_layer(batch):
                self.by_layer[layer].update(hashes)

    def missing(self, key: str) -> list[int]:
        return [layer for layer in self.layers if key not in self.by_layer[layer]]

    def add(self, key: str, layers: Iterable[int]) -> None:
        for layer in layers:
            self.by_layer[layer].add(key)


def _group_by_layer(batch: pa.RecordBatch) -> Iterator[tuple[int, list[str]]]:
    layer_column = batch.column("layer")
    for layer in pc.unique(layer_column).to_pylist():
        yield layer, batch.column("doc_hash").filter(pc.equal(layer_column, layer)).to_pylist()


def encode_texts(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (n, layers, dim) and truncation flags (n,) for ``texts``, in their order."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    vectors = np.empty((len(texts), encoder.num_layers + 1, encoder.dim), dtype=np.float32)
    truncated = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(order), ENCODE_GROUP):
        group = order[start : start + ENCODE_GROUP]
        encoded = encoder.encode([texts[i] for i in group], batch_size=batch_size)
        vectors[group] = encoded.vectors
        truncated[group] = encoded.truncated
        if on_progress:
            on_progress(len(group))
    return vectors, truncated


def embedding_rows(
    keys: Sequence[str], vectors: np.ndarray, layers_wanted: Sequence[Sequence[int]], *, model: str, pooling: str
) -> pa.Table:
    """Rows for each key's wanted layers; ``vectors`` is (n, all layers, dim)."""
    tables = []
    for layer in sorted({layer for layers in layers_wanted for layer in layers}):
        picked = [i for i, layers in enumerate(layers_wanted) if layer in layers]
        tables.append(
            pa.table(
                {
                    "doc_hash": pa.array([keys[i] for i in picked], pa.string()),
                    "model": pa.array([model] * len(picked), pa.string()),
                    "layer": pa.array([layer] * len(picked), pa.int32()),
                    "pooling": pa.array([pooling] * len(picked), pa.string()),
                    "embedding": vector_column(vectors[picked, layer, :]),
                }
            )
        )
    return pa.concat_tables(tables) if tables else pa.table({})


def documents_rows(
    corpus: str, records: Sequence[Record], keys: Sequence[str], fingerprints: Sequence[str], field_types: FieldTypes
) -> pa.Table:
    ingested_at = now_utc()
    columns: dict[str, pa.Array] = {
        "corpus": pa.array([corpus] * len(records), pa.string()),
        "id": pa.array([r.id for r in records], pa.string()),
        "doc_hash": pa.array(keys, pa.string()),
        "text": pa.array([r.text for r in records], pa.string()),
        "record_hash": pa.array(fingerprints, pa.string()),
        "ingested_at": pa.array([ingested_at] * len(records), TIMESTAMP),
    }
    for field in field_types.schema():
        columns[field.name] = pa.array([r.fields.get(field.name) for r in records], field.type)
    return pa.table(columns)


def _record_hash(record: Record) -> str:
    return record_hash({"id": record.id, "text": record.text, "fields": record.fields})


def _existing_records(documents: pads.Dataset, corpus: str) -> dict[str, str]:
    """id -> record_hash of the corpus's stored documents."""
    table = documents.to_table(columns=["id", "record_hash"], filter=pc.field("corpus") == corpus)
    return dict(zip(table.column("id").to_pylist(), table.column("record_hash").to_pylist()))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ingest(
    warehouse: Warehouse | str | Path,
    path: Path,
    *,
    model: str = "minilm",
    corpus: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
    layers: str | Sequence[int] | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    chunk_size: int = DEFAULT_CHUNK,
    on_error: str = "fail",
    rejects_file: Path | None = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> IngestResult:
    """Ingest the JSONL corpus at ``path`` with ``model``; see the module docstring."""
    started = time.perf_counter()
    check_on_error(on_error)
    if batch_size < 1 or chunk_size < 1:
        raise EwError("--batch-size and the chunk size must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise EwError(f"corpus file {path} does not exist or is not a file")
    corpus = check_corpus_name(corpus) if corpus is not None else corpus_name(path)
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse, create=True)
    rejects = Rejects(path, rejects_file or _default_rejects_file(warehouse, corpus), on_error=on_error)

    with warehouse.writer() as writer:
        prepared = prepare_model(writer, model, pooling=pooling, max_length=max_length)
        card = json.loads((prepared.artifact / "model.json").read_text())
        wanted_layers = parse_layers(layers, card["num_layers"])
        run = _Run(
            writer=writer,
            model_key=prepared.key,
            artifact=prepared.artifact,
            pooling=card["pooling"],
            corpus=corpus,
            layers=wanted_layers,
            batch_size=batch_size,
            threads=threads,
        )
        show = Progress(f"ingest {corpus}", enabled=progress)
        if show.enabled:
            show.total = count_lines(path)
        field_types = FieldTypes(run.documents.schema)
        records = read_corpus(path, text_field=text_field, id_field=id_field, field_types=field_types)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ew-commit") as committer:
                pending: Future | None = None
                for chunk in _chunks(rejects.filter(records, show.advance), chunk_size):
                    work = run.prepare_chunk(chunk, field_types, show)
                    if pending is not None:
                        pending.result()
                    pending = committer.submit(run.commit_chunk, work) if work is not None else None
                if pending is not None:
                    pending.result()
                if run.updates:
                    work = run.work(pa.table({}), run.take_updates(), field_types, lines=[], embedded=0)
                    run.commit_chunk(work)
        finally:
            show.close()
            rejects.close()

    return IngestResult(
        corpus=corpus,
        model=prepared.key,
        layers=tuple(wanted_layers),
        read=run.read + rejects.count,
        new_documents=run.new_documents,
        updated_documents=run.updated_documents,
        embedded=run.embedded,
        reused=run.reused,
        duplicates=run.duplicates,
        rejected=rejects.count,
        truncated=run.truncated,
        duplicate_ids=run.duplicate_ids,
        seconds=round(time.perf_counter() - started, 3),
        version=warehouse.latest_version(),
        exported=prepared.exported,
        rejects_file=str(rejects.path) if rejects.count else None,
    )


def _default_rejects_file(warehouse: Warehouse, corpus: str) -> Path:
    stamp = now_utc().strftime("%Y%m%dT%H%M%SZ")
    return warehouse.root / "rejects" / f"{corpus}-{stamp}.jsonl"


@dataclass(frozen=True)
class _ChunkWork:
    embeddings: pa.Table
    documents: pa.Table
    detail: dict


class _Run:
    """State of one ingest: what is stored, what this run encoded, and the counters."""

    def __init__(self, *, writer: Writer, model_key: str, artifact: Path, pooling: str, corpus: str,
                 layers: list[int], batch_size: int, threads: int | None, load_documents: bool = True):
        self.writer = writer
        self.model_key = model_key
        self.artifact = artifact
        self.pooling = pooling
        self.corpus = corpus
        self.layers = layers
        self.batch_size = batch_size
        self.threads = threads
        self._encoder: Encoder | None = None
        warehouse = writer.warehouse
        self.stored = StoredKeys(warehouse.current_dataset(EMBEDDINGS), model=model_key, pooling=pooling, layers=layers)
        self.documents = warehouse.current_dataset(DOCUMENTS) if load_documents else None
        self.existing = _existing_records(self.documents, corpus) if load_documents else {}
        self.updates: dict[str, tuple[Record, str, str]] = {}  # id -> changed record, written in batches
        self.seen_texts: set[str] = set()
        self.seen_ids: set[str] = set()
        self.read = self.new_documents = self.updated_documents = 0
        self.embedded = self.reused = self.duplicates = self.truncated = self.duplicate_ids = 0

    @property
    def encoder(self) -> Encoder:
        # Loaded on first need: a rerun that finds everything stored never starts onnxruntime.
        if self._encoder is None:
            from .encoder import Encoder

            self._encoder = Encoder.load(self.artifact, threads=self.threads)
        return self._encoder

    def prepare_chunk(self, chunk: list[Record], field_types: FieldTypes, show: Progress) -> _ChunkWork | None:
        self.read += len(chunk)
        latest: dict[str, Record] = {}
        for record in chunk:
            if record.id in self.seen_ids:
                self.duplicate_ids += 1
            self.seen_ids.add(record.id)
            latest[record.id] = record
        records = list(latest.values())
        keys = [doc_hash(record.text) for record in records]
        # Records dropped as repeated ids still count as read; account them as duplicates.
        self.duplicates += len(chunk) - len(records)

        to_encode: dict[str, tuple[str, list[int]]] = {}
        for record, key in zip(records, keys):
            if key in self.seen_texts:
                self.duplicates += 1
                continue
            self.seen_texts.add(key)
            missing = self.stored.missing(key)
            if missing:
                to_encode[key] = (record.text, missing)
            else:
                self.reused += 1
        show.advance(len(chunk) - len(to_encode))

        embeddings = pa.table({})
        if to_encode:
            encode_keys = list(to_encode)
            vectors, truncated = encode_texts(
                self.encoder, [to_encode[k][0] for k in encode_keys], batch_size=self.batch_size, on_progress=show.advance
            )
            embeddings = embedding_rows(
                encode_keys, vectors, [to_encode[k][1] for k in encode_keys], model=self.model_key, pooling=self.pooling
            )
            for key in encode_keys:
                self.stored.add(key, to_encode[key][1])
            self.embedded += len(encode_keys)
            self.truncated += int(truncated.sum())

        fingerprints = [_record_hash(r) for r in records]
        new_rows: list[tuple[Record, str, str]] = []
        for record, key, fingerprint in zip(records, keys, fingerprints):
            stored = self.existing.get(record.id)
            if stored == fingerprint:
                continue
            if stored is None:
                self.new_documents += 1
                new_rows.append((record, key, fingerprint))
            else:
                # Replacing a row rewrites its corpus's files: gather the updates, write them at once.
                self.updated_documents += 1
                self.updates[record.id] = (record, key, fingerprint)
            self.existing[record.id] = fingerprint
        if len(self.updates) >= UPDATE_BATCH:
            new_rows += self.take_updates()
        return self.work(embeddings, new_rows, field_types, lines=[chunk[0].line, chunk[-1].line], embedded=len(to_encode))

    def take_updates(self) -> list[tuple[Record, str, str]]:
        updates, self.updates = list(self.updates.values()), {}
        return updates

    def work(self, embeddings: pa.Table, rows: list, field_types: FieldTypes, *, lines: list[int], embedded: int) -> _ChunkWork | None:
        documents = documents_rows(self.corpus, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], field_types)
        if embeddings.num_rows == 0 and documents.num_rows == 0:
            return None
        detail = {"corpus": self.corpus, "model": self.model_key, "lines": lines, "embedded": embedded,
                  "documents": documents.num_rows}
        return _ChunkWork(embeddings=embeddings, documents=documents, detail=detail)

    def commit_chunk(self, work: _ChunkWork) -> int:
        # Embeddings first: a crash between the two leaves vectors a rerun reuses, never a
        # document row that points at vectors that are not there.
        self.writer.append_embeddings(work.embeddings)
        self.writer.upsert_documents(work.documents)
        return self.writer.commit("ingest", work.detail)


def embed_missing(
    writer: Writer,
    batches: Iterable[pa.RecordBatch],
    *,
    model_key: str,
    layers: Sequence[int],
    pooling: str,
    batch_size: int = 32,
    threads: int | None = None,
    operation: str = "embed",
) -> tuple[int, int]:
    """Encode and store the missing layers of (doc_hash, text) rows; one commit per batch.

    The same path as ingest: keys already stored (even by an interrupted run) are skipped.
    Returns (documents embedded, texts truncated).
    """
    warehouse = writer.warehouse
    run = _Run(
        writer=writer, model_key=model_key, artifact=warehouse.root / model_row(warehouse, model_key)["artifact"], pooling=pooling,
        corpus="", layers=list(layers), batch_size=batch_size, threads=threads, load_documents=False,
    )
    for batch in batches:
        wanted = {}
        for key, text in zip(batch.column("doc_hash").to_pylist(), batch.column("text").to_pylist()):
            missing = run.stored.missing(key)
            if missing and key not in wanted:
                wanted[key] = (text, missing)
        if not wanted:
            continue
        keys = list(wanted)
        vectors, truncated = encode_texts(run.encoder, [wanted[k][0] for k in keys], batch_size=batch_size)
        writer.append_embeddings(
            embedding_rows(keys, vectors, [wanted[k][1] for k in keys], model=model_key, pooling=pooling)
        )
        writer.commit(operation, {"model": model_key, "embedded": len(keys)})
        for key in keys:
            run.stored.add(key, wanted[key][1])
        run.embedded += len(keys)
        run.truncated += int(truncated.sum())
    return run.embedded, run.truncated



def ensure_vectors(
    warehouse: Warehouse,
    documents: DocumentFilter,
    *,
    model_key: str,
    layer: int,
    pooling: str,
    threads: int | None = None,
    operation: str = "embed",
) -> int:
    """Embed the stored documents matching ``documents`` that lack a vector of model/layer; returns how many."""
    probe = missing_vectors(warehouse, documents=documents, model=model_key, layer=layer, pooling=pooling, probe=True)
    try:
        if not any(batch.num_rows for batch in probe):
            return 0  # nothing to write: no lock taken, no version made
    finally:
        probe.close()
    with warehouse.writer() as writer:
        embedded, _ = embed_missing(
            writer,
            missing_vectors(warehouse, documents=documents, model=model_key, layer=layer, pooling=pooling),
            model_key=model_key, layers=[layer], pooling=pooling, threads=threads, operation=operation,
        )
    return embedded
