"""`ew ingest`: embed every document that is not stored yet and commit in chunks.

    result = ingest("ew-warehouse", Path("corpus.jsonl"), model="minilm")
    result.embedded, result.reused

A document is keyed by ``doc_hash``; an embedding by (doc_hash, model key, layer, pooling).
Before encoding, every key already stored is skipped, and identical texts are encoded once.
Each chunk is committed as one warehouse version, so an interrupted ingest keeps what it
committed and a rerun continues from there.

With ``token_states=K`` every document's layer-K token states are cached too, once, in the
``token_states`` table (keyed by doc_hash, model, layer, precision), committed in the same
version as the chunk's vectors.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from warehouse import Warehouse, Writer
from warehouse.errors import EwError
from warehouse.keys import doc_hash, record_hash
from warehouse.store import now_utc
from warehouse.tables import DOCUMENTS, TIMESTAMP

from .corpus import FieldTypes, Record, check_corpus_name, corpus_name, count_lines, read_corpus
from .embedding import Embedded, EmbeddingService, Needs, TokenStates
from .precision import PRECISION_GUARD
from .progress import Progress
from .ray_engine import check_engine, run_on_ray
from .registry import prepare_model, prepare_states
from .rejects import Rejects, check_on_error

DEFAULT_CHUNK = 4096
# Changed records are written this many at a time: each write rewrites the corpus's partition.
UPDATE_BATCH = 50_000
# With token states a chunk holds at most this many records: ~70 MB of fp16 states for MiniLM
# at ~100 tokens a document (worst case, 256 tokens: ~200 MB), and only one chunk's states are
# ever in memory (the next chunk is encoded after the previous one is committed).
STATES_CHUNK = 1024


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
    recovered: int          # rows of an interrupted earlier run made visible before this one started
    seconds: float
    version: int | None     # the warehouse version after the run
    exported: bool          # the model was exported to ONNX by this run
    rejects_file: str | None
    token_states: int | None = None   # the layer whose token states were cached, if asked
    state_precision: str | None = None
    states_cached: int = 0            # documents whose token states this run stored
    states_bytes: int = 0             # bytes of those states (n_tokens x dim x value size, summed)
    vector_precision: str = "fp32"    # how the model's vectors are stored (fp16: half the bytes)

    @property
    def states_bytes_per_document(self) -> float:
        """What the cache costs per document cached by this run (mean; 0 when none)."""
        return self.states_bytes / self.states_cached if self.states_cached else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["states_bytes_per_document"] = round(self.states_bytes_per_document, 1)
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
    precision: str | None = None,
    precision_guard: float = PRECISION_GUARD,
    batch_size: int = 32,
    chunk_size: int = DEFAULT_CHUNK,
    on_error: str = "fail",
    rejects_file: Path | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    token_states: int | None = None,
    state_precision: str = "fp16",
    vector_precision: str | None = None,
    vector_min_cosine: float | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> IngestResult:
    """Ingest the JSONL corpus at ``path`` with ``model``; see the module docstring.

    (Long only by its options and the summary it returns: the work is in _CorpusRun.)

    ``precision`` ("fp32", "bf16", "int8") and ``precision_guard``: see :func:`pipelines.registry.prepare_model`.
    ``token_states`` (a layer, 0 = embedding output) also caches that layer's token states,
    stored as ``state_precision`` ("fp16" or "fp32").

    ``vector_precision`` "fp16" stores a new model's pooled vectors as half floats (half the bytes;
    another model key than fp32's, default for a new model); refused when a sample's round trip
    falls below ``vector_min_cosine`` (default :data:`~pipelines.embedding.VECTOR_MIN_COSINE`).
    ``engine="ray"`` encodes on the Ray cluster at ``ray_address`` (None: one started on this
    machine) with ``threads`` per actor; see :mod:`pipelines.ray_engine`. Everything else,
    the result included, is the same.
    """
    started = time.perf_counter()
    check_on_error(on_error)
    check_engine(engine, ray_address=ray_address)
    if batch_size < 1 or chunk_size < 1:
        raise EwError("--batch-size and the chunk size must be at least 1")
    if token_states is not None:
        TokenStates(token_states, state_precision)  # a bad precision fails before any work
        chunk_size = min(chunk_size, STATES_CHUNK)
    path = Path(path)
    if not path.is_file():
        raise EwError(f"corpus file {path} does not exist or is not a file")
    corpus = check_corpus_name(corpus) if corpus is not None else corpus_name(path)
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse, create=True)
    rejects = Rejects(path, rejects_file or _default_rejects_file(warehouse, corpus, path), on_error=on_error)

    with warehouse.discarded_if_failed(), rejects, warehouse.writer() as writer:
        prepared = prepare_model(writer, model, pooling=pooling, max_length=max_length, progress=progress,
                                 precision=precision, precision_guard=precision_guard,
                                 vector_precision=vector_precision)
        wanted_layers = parse_layers(layers, prepared.card.num_layers)
        states = None
        if token_states is not None:
            prepared = prepare_states(writer, prepared, layer=token_states, name=model, progress=progress)
            states = TokenStates(token_states, state_precision)
        service = EmbeddingService(writer, prepared, layers=wanted_layers, batch_size=batch_size, threads=threads,
                                   states=states, min_cosine=vector_min_cosine)
        run = _CorpusRun(writer, service, corpus=corpus)
        show = Progress(f"ingest {corpus}", enabled=progress)
        if show.enabled:
            show.total = count_lines(path)
        field_types = FieldTypes(run.documents.schema)
        records = read_corpus(path, text_field=text_field, id_field=id_field, field_types=field_types)
        chunks = _chunks(rejects.filter(records, show.advance), chunk_size)
        try:
            if engine == "ray":
                run_on_ray(run, chunks, field_types, show, address=ray_address, threads=threads)
            else:
                run.all_chunks(chunks, field_types, show)
        finally:
            show.close()

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
        recovered=writer.recovered_rows,
        seconds=round(time.perf_counter() - started, 3),
        version=warehouse.latest_version(),
        exported=prepared.exported,
        rejects_file=str(rejects.path) if rejects.count else None,
        token_states=token_states,
        state_precision=state_precision if token_states is not None else None,
        states_cached=run.states_cached,
        states_bytes=run.states_bytes,
        vector_precision=prepared.card.vector_precision,
    )


def _default_rejects_file(warehouse: Warehouse, corpus: str, path: Path) -> Path:
    stamp = now_utc().strftime("%Y%m%dT%H%M%SZ")
    if warehouse.is_local:
        return warehouse.root / "rejects" / f"{corpus}-{stamp}.jsonl"
    # An object takes no appends, and the bad lines are for the user to fix: beside the corpus they came from.
    return path.parent / f"{corpus}-{stamp}.rejects.jsonl"


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk of the corpus, planned: the texts it needs encoded and its records to store."""

    needs: Needs
    rows: list[tuple[Record, str, str]]  # (record, doc_hash, record_hash) to append to documents
    size: int                            # records read (repeated ids and texts included)
    lines: list[int]                     # its first and last line


@dataclass(frozen=True)
class _ChunkWork:
    embeddings: pa.Table
    documents: pa.Table
    detail: dict
    states: pa.Table


class _CorpusRun:
    """State of one corpus ingest: the corpus's stored records, what this run saw, and the counters."""

    def __init__(self, writer: Writer, service: EmbeddingService, *, corpus: str):
        self.writer = writer
        self.service = service
        self.corpus = corpus
        self.documents = writer.warehouse.current_dataset(DOCUMENTS)
        self.existing = _existing_records(self.documents, corpus)
        self.updates: dict[str, tuple[Record, str, str]] = {}  # id -> changed record, written in batches
        self.seen_texts: set[str] = set()
        self.seen_ids: set[str] = set()
        self.read = self.new_documents = self.updated_documents = 0
        self.embedded = self.reused = self.duplicates = self.truncated = self.duplicate_ids = 0
        self.states_cached = self.states_bytes = 0

    def all_chunks(self, chunks: Iterable[list[Record]], field_types: FieldTypes, show: Progress) -> None:
        """Prepare each chunk while the previous one commits (one version per chunk)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ew-commit") as committer:
            pending: Future | None = None
            work: _ChunkWork | None = None
            for chunk in chunks:
                if pending is not None and self.service.states is not None:
                    pending.result()  # token states: one chunk's in memory at a time, not two
                    pending = work = None
                work = self.prepare_chunk(chunk, field_types, show)
                if pending is not None:
                    pending.result()
                pending = committer.submit(self.commit_chunk, work) if work is not None else None
            if pending is not None:
                pending.result()
        self.commit_updates(field_types)

    def commit_updates(self, field_types: FieldTypes) -> None:
        """Commit the changed records still gathered (after the last chunk)."""
        if self.updates:
            self.commit_chunk(self.work(pa.table({}), self.take_updates(), field_types, lines=[], embedded=0))

    def prepare_chunk(self, chunk: list[Record], field_types: FieldTypes, show: Progress) -> _ChunkWork | None:
        planned = self.plan_chunk(chunk)
        embedded = self.service.encode(planned.needs, on_progress=show.advance)
        show.advance(len(chunk) - embedded.encoded)
        return self.finish_chunk(planned, embedded, field_types)

    def plan_chunk(self, chunk: list[Record]) -> PlannedChunk:
        """What a chunk needs encoded and which of its records to store: everything but the encoding."""
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

        fresh: dict[str, str] = {}
        for record, key in zip(records, keys):
            if key in self.seen_texts or key in fresh:
                self.duplicates += 1
            else:
                fresh[key] = record.text
        self.seen_texts.update(fresh)
        needs = self.service.needs(list(fresh), list(fresh.values()))
        self.embedded += needs.embedded
        self.reused += len(needs.texts) - needs.embedded
        return PlannedChunk(needs=needs, rows=self._changed_records(records, keys), size=len(chunk),
                            lines=[chunk[0].line, chunk[-1].line])

    def finish_chunk(self, planned: PlannedChunk, embedded: Embedded, field_types: FieldTypes) -> _ChunkWork | None:
        """The chunk's rows to commit, once its texts were encoded (by any engine)."""
        self.truncated += embedded.truncated
        self.states_cached += embedded.states_cached
        self.states_bytes += embedded.states_bytes
        return self.work(embedded.rows, planned.rows, field_types, lines=planned.lines, embedded=embedded.embedded,
                         states=embedded.states, states_cached=embedded.states_cached)

    def _changed_records(self, records: list[Record], keys: list[str]) -> list[tuple[Record, str, str]]:
        """New records to append now; changed ones are gathered and written in batches."""
        new_rows: list[tuple[Record, str, str]] = []
        for record, key in zip(records, keys):
            fingerprint = _record_hash(record)
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
        return new_rows

    def take_updates(self) -> list[tuple[Record, str, str]]:
        updates, self.updates = list(self.updates.values()), {}
        return updates

    def work(self, embeddings: pa.Table, rows: list, field_types: FieldTypes, *, lines: list[int], embedded: int,
             states: pa.Table | None = None, states_cached: int = 0) -> _ChunkWork | None:
        documents = documents_rows(self.corpus, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], field_types)
        states = states if states is not None else pa.table({})
        if embeddings.num_rows == 0 and documents.num_rows == 0 and states.num_rows == 0:
            return None
        detail = {"corpus": self.corpus, "model": self.service.model.key, "lines": lines, "embedded": embedded,
                  "documents": documents.num_rows}
        if self.service.states is not None:
            detail.update(token_states=self.service.states.layer, states_cached=states_cached)
        return _ChunkWork(embeddings=embeddings, documents=documents, detail=detail, states=states)

    def commit_chunk(self, work: _ChunkWork) -> int:
        # Token states and embeddings first: a crash between them leaves rows a rerun reuses,
        # never a document row that points at vectors or states that are not there.
        self.service.write_states(work.states)
        self.service.write(work.embeddings)
        self.writer.upsert_documents(work.documents)
        return self.writer.commit("ingest", work.detail)
