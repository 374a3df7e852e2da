"""The embedding service: plan -> encode -> write, the one path every stored vector (and token state) takes.

- *plan* (:class:`Plan`): which (doc_hash, layer) keys a model lacks, and with
  :class:`TokenStates` which doc_hash lack layer K's token states at that precision, against the
  tables the writer holds (after a crashed writer's commits were settled), plus what this run wrote;
- *encode* (:func:`encode_texts`, :func:`encode_state_texts`): the pure encoder over texts, no
  warehouse and no globals, so another engine can run it on another machine;
- *write* (:func:`embedding_rows`, :func:`token_state_rows`, :meth:`EmbeddingService.write`):
  vectors become rows of ``embeddings``, states rows of ``token_states``, appended through the
  :class:`~warehouse.store.Writer`.

A document that needs its states runs through the states graph, whose pooled vectors are the
plain graph's (checked at export), so its missing vectors come from the same call; one that
has its vectors already gets only its states computed.

``ingest`` embeds a corpus chunk by chunk through :meth:`EmbeddingService.embed`;
fit-head and predict call :func:`ensure_vectors` / :func:`embed_missing` for the texts they
need. A key already stored, even by an interrupted run, is never encoded again.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from warehouse import Warehouse, Writer
from warehouse.errors import EwError
from warehouse.selection import DocumentFilter, missing_states, missing_vectors
from warehouse.store import damaged_table
from warehouse.tables import EMBEDDINGS, STATE_DTYPES, TOKEN_STATES, states_column, vector_columns

from .memory import bound_heap
from .registry import PreparedModel, open_model

if TYPE_CHECKING:
    from .encoder import Encoder

# token_states rows are built this many at a time, so no binary array nears 2 GiB.
ENCODE_GROUP = 512
# The least cosine between a vector and its stored round trip, as for the encoder's precisions.
# fp16 keeps 11 significant bits: MiniLM's vectors come back at cosine > 0.99999; what fails is a
# model whose values overflow fp16 (|x| > 65504 becomes inf) or vanish below its range.
VECTOR_MIN_COSINE = 0.995
GUARD_SAMPLE = 256  # documents (all their layers) whose round trip the guard measures


@dataclass(frozen=True)
class TokenStates:
    """The token states to cache: layer ``layer``'s, stored as ``precision`` ("fp16" or "fp32")."""

    layer: int
    precision: str = "fp16"

    def __post_init__(self):
        if self.precision not in STATE_DTYPES:
            raise EwError(f"--state-precision: {self.precision!r} is not supported; use {' or '.join(STATE_DTYPES)}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STATE_DTYPES[self.precision])


class Plan:
    """Which (doc_hash, layer) pairs a model already has, and which doc_hash have their token
    states, asked chunk by chunk of the table states the plan was opened on.

    Each :meth:`missing` / :meth:`lacks_states` call reads only the ``doc_hash`` (and ``layer``)
    column of the model's partitions, keeping the rows whose doc_hash is in the chunk, so the
    plan's memory does not grow with the warehouse: the stored keys are never all in memory.
    Only the keys this run writes (:meth:`add`, :meth:`add_states`) are kept, as sets.
    (Measured on 200,000 documents x 7 layers stored, on 2 shared cores: a chunk of 4,096 keys
    is planned in ~0.5 s holding 0.5 MB of Python objects, where reading every key into sets
    held 217 MB and took 5-7 s up front. The scan is linear in the stored keys.)
    """

    def __init__(self, dataset: pads.Dataset, *, model: str, pooling: str, layers: Sequence[int],
                 states: TokenStates | None = None, states_dataset: pads.Dataset | None = None):
        self.layers = list(layers)
        self.states = states
        self._dataset = dataset
        # model and layer are partition columns: the filter skips every other model's and layer's files.
        # pooling is checked on the few rows found (in the filter it doubled the scan's time).
        self._stored_where = (pc.field("model") == model) & pc.field("layer").isin(self.layers)
        self._pooling = pooling
        self._states_dataset = states_dataset if states is not None else None
        if states is not None:
            self._cached_where = ((pc.field("model") == model) & (pc.field("layer") == states.layer)
                                  & (pc.field("precision") == states.precision))
        self._added: dict[int, set[str]] = {layer: set() for layer in self.layers}
        self._added_states: set[str] = set()

    def missing(self, keys: Sequence[str]) -> list[list[int]]:
        """For each key, the wanted layers not stored yet ([] when it has them all)."""
        stored: dict[str, set[int]] = {}
        if self.layers and keys:
            for batch in _read_keys(self._dataset, ["doc_hash", "layer", "pooling"],
                                    self._stored_where & _among(keys), EMBEDDINGS):
                for key, layer, pooling in zip(*(column.to_pylist() for column in batch.columns)):
                    if pooling == self._pooling:
                        stored.setdefault(key, set()).add(layer)
        nothing: set[int] = set()
        return [[layer for layer in self.layers if layer not in stored.get(key, nothing) and key not in self._added[layer]]
                for key in keys]

    def lacks_states(self, keys: Sequence[str]) -> list[bool]:
        """For each key, whether its wanted token states are not stored yet (always False without states)."""
        if self.states is None:
            return [False] * len(keys)
        cached = set(self._added_states)
        if self._states_dataset is not None and keys:
            for batch in _read_keys(self._states_dataset, ["doc_hash"], self._cached_where & _among(keys),
                                    TOKEN_STATES):
                cached.update(batch.column("doc_hash").to_pylist())
        return [key not in cached for key in keys]

    def add(self, keys: Sequence[str], layers: Sequence[Sequence[int]]) -> None:
        """Record that ``keys`` now have ``layers`` (written by this run)."""
        for key, key_layers in zip(keys, layers):
            for layer in key_layers:
                self._added[layer].add(key)

    def add_states(self, keys: Sequence[str]) -> None:
        """Record that ``keys`` now have their token states (written by this run)."""
        self._added_states.update(keys)


def _among(keys: Sequence[str]) -> pc.Expression:
    return pc.field("doc_hash").isin(pa.array(list(keys), pa.string()))


def _read_keys(dataset: pads.Dataset, columns: list[str], where, table: str) -> Iterator[pa.RecordBatch]:
    """The key columns of a table, or the one error naming `ew verify` when a file is damaged."""
    try:
        yield from dataset.to_batches(columns=columns, filter=where)
    except (OSError, pa.ArrowException) as error:
        raise damaged_table(table, error) from None


def encode_texts(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (n, layers, dim) and truncation flags (n,) for ``texts``, in their order.

    All of ``texts`` are batched together by token count (a chunk's worth: the fewer, the more padding).
    """
    encoded = encoder.encode(texts, batch_size=batch_size, on_progress=on_progress)
    return encoded.vectors, encoded.truncated


def encode_state_texts(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    layer: int,
    dtype: np.dtype,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Vectors (n, layers, dim), truncation flags (n,) and each text's (n_tokens, dim) layer states as ``dtype``."""
    encoded = encoder.encode_states(texts, layer=layer, batch_size=batch_size, dtype=dtype, on_progress=on_progress)
    return encoded.vectors, encoded.truncated, encoded.states


def token_state_rows(keys: Sequence[str], states: Sequence[np.ndarray], *, model: str, layer: int,
                     precision: str) -> pa.Table:
    """Rows of ``token_states``, one per key; built ENCODE_GROUP rows at a time so no binary array nears 2 GiB."""
    tables = []
    for start in range(0, len(keys), ENCODE_GROUP):
        part = states[start : start + ENCODE_GROUP]
        n = len(part)
        tables.append(pa.table({
            "doc_hash": pa.array(keys[start : start + ENCODE_GROUP], pa.string()),
            "model": pa.array([model] * n, pa.string()),
            "layer": pa.array([layer] * n, pa.int32()),
            "precision": pa.array([precision] * n, pa.string()),
            "n_tokens": pa.array([s.shape[0] for s in part], pa.int32()),
            "dim": pa.array([s.shape[1] for s in part], pa.int32()),
            "states": states_column(part, precision),
        }))
    return pa.concat_tables(tables) if tables else pa.table({})


def embedding_rows(
    keys: Sequence[str], vectors: np.ndarray, layers_wanted: Sequence[Sequence[int]], *, model: str, pooling: str,
    precision: str = "fp32",
) -> pa.Table:
    """Rows for each key's wanted layers, stored as ``precision``; ``vectors`` is (n, all layers, dim)."""
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
                    **vector_columns(vectors[picked, layer, :], precision),
                }
            )
        )
    return pa.concat_tables(tables) if tables else pa.table({})


def round_trip_cosine(vectors: np.ndarray, precision: str) -> float:
    """The least cosine between a vector of ``vectors`` (..., dim) and the same vector stored as
    ``precision`` and read back (1.0 for fp32; -1.0 when one overflows to inf)."""
    if precision == "fp32":
        return 1.0
    exact = vectors.reshape(-1, vectors.shape[-1]).astype(np.float64)  # (N, dim)
    with np.errstate(all="ignore"):  # a value beyond the precision's range becomes inf: measured, not warned
        stored = exact.astype(STATE_DTYPES[precision]).astype(np.float64)
        norms = np.linalg.norm(exact, axis=1) * np.linalg.norm(stored, axis=1)
        cosine = np.where(norms == 0, 1.0, (exact * stored).sum(axis=1) / norms)  # a zero vector stays zero
    return float(np.nan_to_num(cosine, nan=-1.0).min()) if len(cosine) else 1.0


def check_round_trip(vectors: np.ndarray, *, precision: str, model: str, min_cosine: float) -> float:
    """Refuse (EwError) to store ``model``'s vectors as ``precision`` when a sample's round trip falls
    below ``min_cosine``; returns the least cosine measured."""
    measured = round_trip_cosine(vectors, precision)
    if not measured >= min_cosine:
        raise EwError(
            f"storing the vectors of {model} as {precision} changes them too much: the least cosine to fp32 over "
            f"{len(vectors)} sample documents is {measured:.10g}, below the guard {min_cosine} (its values may exceed "
            f"{precision}'s range); ingest with --vector-precision fp32"
        )
    return measured


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    tables = [table for table in tables if table.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


@dataclass(frozen=True)
class Needs:
    """What a group of distinct texts needs, planned and not encoded yet (see :meth:`EmbeddingService.needs`)."""

    texts: dict[str, str]                          # distinct doc_hash -> text
    vectors_only: list[tuple[str, list[int]]]      # (doc_hash, missing layers) of texts needing only vectors
    with_states: list[tuple[str, list[int]]]       # (doc_hash, missing layers) of texts needing token states
    embedded: int                                  # distinct texts missing a wanted layer

    @property
    def vector_texts(self) -> list[str]:
        return [self.texts[key] for key, _ in self.vectors_only]

    @property
    def state_texts(self) -> list[str]:
        return [self.texts[key] for key, _ in self.with_states]

    @property
    def encoded(self) -> int:
        """Distinct texts to run through the encoder (for vectors, states or both)."""
        return len(self.vectors_only) + len(self.with_states)


@dataclass(frozen=True)
class Embedded:
    """What one :meth:`EmbeddingService.embed` call produced."""

    rows: pa.Table   # embeddings rows, not written yet
    embedded: int    # distinct texts whose missing vectors were encoded
    reused: int      # distinct texts that had every wanted layer already
    truncated: int   # encoded texts cut to max_length tokens
    states: pa.Table = field(default_factory=lambda: pa.table({}))  # token_states rows, not written yet
    states_cached: int = 0  # distinct texts whose token states were computed
    states_bytes: int = 0   # bytes of those states (n_tokens x dim x bytes per value, summed)
    encoded: int = 0        # distinct texts run through the encoder (for vectors, states or both)


class EmbeddingService:
    """Plans, encodes and writes the vectors of one model's wanted layers, under a writer's lock."""

    def __init__(self, writer: Writer, model: PreparedModel, *, layers: Sequence[int], batch_size: int = 32,
                 threads: int | None = None, states: TokenStates | None = None, min_cosine: float | None = None):
        self.writer = writer
        self.model = model
        self.precision = model.card.vector_precision
        # The stored precision's guard (see VECTOR_MIN_COSINE), measured on the first vectors encoded.
        self.min_cosine = VECTOR_MIN_COSINE if min_cosine is None else min_cosine
        self.guarded = self.precision == "fp32"
        self.layers = list(layers)
        self.batch_size = batch_size
        self.threads = threads
        self.states = states
        warehouse = writer.warehouse
        self.plan = Plan(warehouse.current_dataset(EMBEDDINGS), model=model.key, pooling=model.card.pooling,
                         layers=self.layers, states=states,
                         states_dataset=warehouse.current_dataset(TOKEN_STATES) if states else None)
        self._encoder: Encoder | None = None

    @property
    def encoder(self) -> Encoder:
        # Loaded on first need: a rerun that finds everything stored never starts onnxruntime.
        if self._encoder is None:
            from .encoder import Encoder

            # Tokenizing a chunk, its vectors and rows, and the commit thread's Delta writes free buffers
            # of ever new sizes: with glibc's sliding mmap threshold they stay in the heap. Measured on
            # 6,000 Debian documents, chunks of 4,096, every layer, 1 thread: RSS after the ingest 526 ->
            # 453 MB, peak 785 -> 762 MB; encoder CPU time unchanged (onnxruntime's arena maps its
            # regions once, so no page faults per batch).
            bound_heap()
            self._encoder = Encoder.load(self.model.artifact, threads=self.threads)
        return self._encoder

    def needs(self, keys: Sequence[str], texts: Sequence[str]) -> Needs:
        """Plan the distinct ``keys`` (with their ``texts``): which lack a wanted layer or their token states.

        The plan counts them as stored from here on, so a later call never plans them again.
        """
        distinct = dict(zip(keys, texts))
        planned = list(zip(distinct, self.plan.missing(list(distinct)), self.plan.lacks_states(list(distinct))))
        needs = Needs(
            texts=distinct,
            vectors_only=[(key, layers) for key, layers, lacks in planned if layers and not lacks],
            with_states=[(key, layers) for key, layers, lacks in planned if lacks],
            embedded=sum(1 for _, layers, _ in planned if layers),
        )
        self.plan.add_states([key for key, _ in needs.with_states])
        self.plan.add([key for key, _, _ in planned], [layers for _, layers, _ in planned])
        return needs

    def embed(self, keys: Sequence[str], texts: Sequence[str], *,
              on_progress: Callable[[int], None] | None = None) -> Embedded:
        """Encode the distinct ``keys`` (with their ``texts``) that lack a wanted layer or their token states;
        rows not written yet. The plan counts them as stored from here on."""
        return self.encode(self.needs(keys, texts), on_progress=on_progress)

    def encode(self, needs: Needs, *, on_progress: Callable[[int], None] | None = None) -> Embedded:
        """Run the encoder (in this process) over what ``needs`` lists; rows not written yet."""
        vectors, truncated = encode_texts(self.encoder, needs.vector_texts, batch_size=self.batch_size,
                                          on_progress=on_progress) if needs.vectors_only else (None, None)
        embedded = self.embedded(needs, vectors, truncated)
        if not needs.with_states:
            return embedded
        vectors, cut, text_states = encode_state_texts(
            self.encoder, needs.state_texts, layer=self.states.layer, dtype=self.states.dtype,
            batch_size=self.batch_size, on_progress=on_progress)
        return self.with_states(embedded, needs, vectors, cut, text_states)

    def with_states(self, embedded: Embedded, needs: Needs, vectors: np.ndarray, truncated: np.ndarray,
                    text_states: Sequence[np.ndarray]) -> Embedded:
        """``embedded`` plus what the texts of ``needs.with_states`` produced (by any engine): ``vectors``
        (n, layers, dim), ``truncated`` (n,) and each text's (n_tokens, dim) states, in that order."""
        todo, layers = [k for k, _ in needs.with_states], [l for _, l in needs.with_states]
        rows = self.rows(todo, vectors, layers)
        states = token_state_rows(todo, text_states, model=self.model.key, layer=self.states.layer,
                                  precision=self.states.precision)
        return replace(
            embedded, rows=_concat([embedded.rows, rows]),
            truncated=embedded.truncated + int(truncated.sum()), states=states, states_cached=len(todo),
            states_bytes=sum(s.nbytes for s in text_states),
        )

    def embedded(self, needs: Needs, vectors: np.ndarray | None, truncated: np.ndarray | None) -> Embedded:
        """What ``needs`` produced once its vectors-only texts were encoded (by any engine): ``vectors``
        (n, layers, dim) and ``truncated`` (n,) in the order of ``needs.vectors_only``; no token states."""
        rows = pa.table({})
        if needs.vectors_only:
            keys, layers = [k for k, _ in needs.vectors_only], [l for _, l in needs.vectors_only]
            rows = self.rows(keys, vectors, layers)
        return Embedded(rows=rows, embedded=needs.embedded, reused=len(needs.texts) - needs.embedded,
                        truncated=int(truncated.sum()) if truncated is not None else 0, encoded=needs.encoded)

    def rows(self, keys: Sequence[str], vectors: np.ndarray, layers: Sequence[Sequence[int]]) -> pa.Table:
        """The embeddings rows of freshly encoded ``vectors``, at the model's precision (guarded once)."""
        if not self.guarded:
            check_round_trip(vectors[:GUARD_SAMPLE], precision=self.precision, model=self.model.key,
                             min_cosine=self.min_cosine)
            self.guarded = True
        return embedding_rows(keys, vectors, layers, model=self.model.key, pooling=self.model.card.pooling,
                              precision=self.precision)

    def write(self, rows: pa.Table) -> int:
        """Append embedding rows through the writer (visible at its next commit)."""
        return self.writer.append_embeddings(rows)

    def write_states(self, rows: pa.Table) -> int:
        """Append token_states rows through the writer (visible at its next commit)."""
        return self.writer.append_token_states(rows)


@dataclass(frozen=True)
class EmbedSummary:
    embedded: int    # distinct texts encoded and stored
    reused: int      # distinct texts whose vectors were stored already
    truncated: int
    states_cached: int = 0  # distinct texts whose token states were stored (with ``states``)


def embed_missing(
    writer: Writer,
    batches: Iterable[pa.RecordBatch],
    *,
    model: PreparedModel,
    layers: Sequence[int],
    threads: int | None = None,
    operation: str = "embed",
    states: TokenStates | None = None,
) -> EmbedSummary:
    """Encode and store the missing layers (and with ``states`` the missing token states) of
    (doc_hash, text) batches; one warehouse version per batch that adds any."""
    service = EmbeddingService(writer, model, layers=layers, threads=threads, states=states)
    embedded = reused = truncated = cached = 0
    for batch in batches:
        result = service.embed(batch.column("doc_hash").to_pylist(), batch.column("text").to_pylist())
        embedded, reused, truncated = embedded + result.embedded, reused + result.reused, truncated + result.truncated
        cached += result.states_cached
        if result.encoded:
            service.write_states(result.states)  # states and vectors before anything that refers to them
            service.write(result.rows)
            detail = {"model": model.key, "embedded": result.embedded}
            if states is not None:
                detail.update(token_states=states.layer, states_cached=result.states_cached)
            writer.commit(operation, detail)
    return EmbedSummary(embedded=embedded, reused=reused, truncated=truncated, states_cached=cached)


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


def ensure_states(
    warehouse: Warehouse,
    documents: DocumentFilter,
    *,
    model_key: str,
    layer: int,
    precision: str = "fp16",
    threads: int | None = None,
    operation: str = "embed",
) -> int:
    """Cache the layer-``layer`` token states of the stored documents matching ``documents`` that lack them; returns how many."""
    if not _anything_missing(warehouse, documents, missing_states, model=model_key, layer=layer, precision=precision):
        return 0
    with warehouse.writer() as writer:
        datasets = warehouse.datasets(warehouse.snapshot())
        batches = missing_states(datasets, documents=documents, model=model_key, layer=layer, precision=precision)
        summary = embed_missing(writer, batches, model=open_model(warehouse, model_key), layers=[], threads=threads,
                                operation=operation, states=TokenStates(layer=layer, precision=precision))
    return summary.states_cached


def _anything_missing(warehouse: Warehouse, documents: DocumentFilter, select=missing_vectors, **key) -> bool:
    probe: Iterator[pa.RecordBatch] = select(warehouse.datasets(warehouse.snapshot()), documents=documents,
                                             probe=True, **key)
    try:
        return any(batch.num_rows for batch in probe)
    finally:
        probe.close()
