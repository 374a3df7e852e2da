"""The embedding service: plan -> encode -> write, the one path every stored vector takes.

- *plan* (:class:`Plan`): which (doc_hash, layer) keys a model lacks, against the table the
  writer holds (after a crashed writer's commits were settled), plus what this run wrote;
- *encode* (:func:`encode_texts`): the pure encoder over texts, no warehouse and no globals,
  so another engine can run it on another machine;
- *write* (:func:`embedding_rows`, :meth:`EmbeddingService.write`): vectors become rows of
  ``embeddings``, appended through the :class:`~warehouse.store.Writer`.

``ingest`` embeds a corpus chunk by chunk through :meth:`EmbeddingService.embed`;
fit-head and predict call :func:`ensure_vectors` / :func:`embed_missing` for the texts they
need. A key already stored, even by an interrupted run, is never encoded again.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from warehouse import Warehouse, Writer
from warehouse.selection import DocumentFilter, missing_vectors
from warehouse.tables import EMBEDDINGS, vector_column

from .registry import PreparedModel, open_model

if TYPE_CHECKING:
    from .encoder import Encoder

# Texts go to the encoder in groups of this many, sorted by length, so padding stays small
# and progress moves often.
ENCODE_GROUP = 512


class Plan:
    """Which (doc_hash, layer) pairs a model already has, read once from the newest table state.

    Kept as one set of doc_hash per layer: fast to probe chunk after chunk. (Planning per chunk
    against the table, to keep memory flat for warehouses of tens of millions of documents,
    replaces this class behind the same two methods.)
    """

    def __init__(self, dataset: pads.Dataset, *, model: str, pooling: str, layers: Sequence[int]):
        self.layers = list(layers)
        self._stored: dict[int, set[str]] = {layer: set() for layer in self.layers}
        wanted = (pc.field("model") == model) & (pc.field("pooling") == pooling) & pc.field("layer").isin(self.layers)
        for batch in dataset.to_batches(columns=["doc_hash", "layer"], filter=wanted):
            layer_column = batch.column("layer")
            for layer in pc.unique(layer_column).to_pylist():
                self._stored[layer].update(batch.column("doc_hash").filter(pc.equal(layer_column, layer)).to_pylist())

    def missing(self, keys: Sequence[str]) -> list[list[int]]:
        """For each key, the wanted layers not stored yet ([] when it has them all)."""
        return [[layer for layer in self.layers if key not in self._stored[layer]] for key in keys]

    def add(self, keys: Sequence[str], layers: Sequence[Sequence[int]]) -> None:
        """Record that ``keys`` now have ``layers`` (written by this run)."""
        for key, key_layers in zip(keys, layers):
            for layer in key_layers:
                self._stored[layer].add(key)


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


@dataclass(frozen=True)
class Embedded:
    """What one :meth:`EmbeddingService.embed` call produced."""

    rows: pa.Table   # embeddings rows, not written yet
    embedded: int    # distinct texts encoded
    reused: int      # distinct texts that had every wanted layer already
    truncated: int   # encoded texts cut to max_length tokens


class EmbeddingService:
    """Plans, encodes and writes the vectors of one model's wanted layers, under a writer's lock."""

    def __init__(self, writer: Writer, model: PreparedModel, *, layers: Sequence[int], batch_size: int = 32,
                 threads: int | None = None):
        self.writer = writer
        self.model = model
        self.layers = list(layers)
        self.batch_size = batch_size
        self.threads = threads
        self.plan = Plan(writer.warehouse.current_dataset(EMBEDDINGS), model=model.key, pooling=model.card.pooling,
                         layers=self.layers)
        self._encoder: Encoder | None = None

    @property
    def encoder(self) -> Encoder:
        # Loaded on first need: a rerun that finds everything stored never starts onnxruntime.
        if self._encoder is None:
            from .encoder import Encoder

            self._encoder = Encoder.load(self.model.artifact, threads=self.threads)
        return self._encoder

    def embed(self, keys: Sequence[str], texts: Sequence[str], *,
              on_progress: Callable[[int], None] | None = None) -> Embedded:
        """Encode the distinct ``keys`` (with their ``texts``) that lack a wanted layer; rows not written yet.

        The plan counts them as stored from here on, so a later call never encodes them again.
        """
        wanted: dict[str, tuple[str, list[int]]] = {}
        distinct = dict(zip(keys, texts))
        for key, layers in zip(distinct, self.plan.missing(list(distinct))):
            if layers:
                wanted[key] = (distinct[key], layers)
        if not wanted:
            return Embedded(rows=pa.table({}), embedded=0, reused=len(distinct), truncated=0)
        todo = list(wanted)
        vectors, truncated = encode_texts(self.encoder, [wanted[k][0] for k in todo], batch_size=self.batch_size,
                                          on_progress=on_progress)
        layers = [wanted[k][1] for k in todo]
        rows = embedding_rows(todo, vectors, layers, model=self.model.key, pooling=self.model.card.pooling)
        self.plan.add(todo, layers)
        return Embedded(rows=rows, embedded=len(todo), reused=len(distinct) - len(todo), truncated=int(truncated.sum()))

    def write(self, rows: pa.Table) -> int:
        """Append embedding rows through the writer (visible at its next commit)."""
        return self.writer.append_embeddings(rows)


@dataclass(frozen=True)
class EmbedSummary:
    embedded: int    # distinct texts encoded and stored
    reused: int      # distinct texts whose vectors were stored already
    truncated: int


def embed_missing(
    writer: Writer,
    batches: Iterable[pa.RecordBatch],
    *,
    model: PreparedModel,
    layers: Sequence[int],
    threads: int | None = None,
    operation: str = "embed",
) -> EmbedSummary:
    """Encode and store the missing layers of (doc_hash, text) batches; one warehouse version per batch that adds any."""
    service = EmbeddingService(writer, model, layers=layers, threads=threads)
    embedded = reused = truncated = 0
    for batch in batches:
        result = service.embed(batch.column("doc_hash").to_pylist(), batch.column("text").to_pylist())
        embedded, reused, truncated = embedded + result.embedded, reused + result.reused, truncated + result.truncated
        if result.embedded:
            service.write(result.rows)
            writer.commit(operation, {"model": model.key, "embedded": result.embedded})
    return EmbedSummary(embedded=embedded, reused=reused, truncated=truncated)


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
    if not _anything_missing(warehouse, documents, model=model_key, layer=layer, pooling=pooling):
        return 0  # nothing to write: no lock taken, no version made
    with warehouse.writer() as writer:
        datasets = warehouse.datasets(warehouse.snapshot())
        batches = missing_vectors(datasets, documents=documents, model=model_key, layer=layer, pooling=pooling)
        summary = embed_missing(writer, batches, model=open_model(warehouse, model_key), layers=[layer],
                                threads=threads, operation=operation)
    return summary.embedded


def _anything_missing(warehouse: Warehouse, documents: DocumentFilter, **key) -> bool:
    probe: Iterator[pa.RecordBatch] = missing_vectors(warehouse.datasets(warehouse.snapshot()), documents=documents,
                                                      probe=True, **key)
    try:
        return any(batch.num_rows for batch in probe)
    finally:
        probe.close()
