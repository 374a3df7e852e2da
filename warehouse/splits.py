"""Train / val / test splits assembled by DuckDB, streamed out as NumPy batches.

A document's split is a pure function of its ``doc_hash`` and the split seed:

    bucket = int(sha256(f"{seed}:{doc_hash}")[:8], 16) % 10000
    train if bucket < 100 * train_percent, val if below 100 * (train + val), else test

so a document never changes split when the warehouse grows or rows arrive in another order,
and identical texts (one doc_hash) always share a split: test never leaks into train.

The labelled vectors are copied once into DuckDB (raw float32 bytes), scattered into piles
of about PILE_ROWS rows by a seeded hash, so every pile is a random sample of its split;
DuckDB keeps them within its memory limit and spills to disk beyond it. Every epoch reads
the piles in a seeded random order and shuffles each one in memory: one pile at a time.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import EwError, QueryError, StorageError
from .query import connect, sql_error_message
from .selection import INTERNAL_MEMORY_LIMIT, DocumentFilter, create_labelled
from .tables import DOCUMENTS, EMBEDDINGS, VECTOR_PRECISIONS, float32_vectors
from .versions import Snapshot

if TYPE_CHECKING:
    from .store import Warehouse

SPLITS = ("train", "val", "test")
BUCKETS = 10_000
FETCH_ROWS = 8192
PILE_ROWS = 8192  # rows shuffled together within an epoch (~12 MB of 384-wide vectors)
SCATTER_BYTES = 32 << 20  # vectors held back, all piles together, while they are copied in
BLOBS = pa.schema([("doc_hash", pa.string()), ("x", pa.large_binary())])


@dataclass(frozen=True)
class SplitSpec:
    train: int = 80
    val: int = 10
    test: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts) or sum(parts) != 100 or self.train == 0:
            raise EwError(f"--split must be three whole percentages that add up to 100 with train > 0, got {self.text}")

    @classmethod
    def parse(cls, text: str, *, seed: int = 0) -> "SplitSpec":
        try:
            train, val, test = (int(part) for part in text.split(","))
        except ValueError:
            raise EwError(f"--split must look like 80,10,10 (train,val,test percentages), got {text!r}") from None
        return cls(train=train, val=val, test=test, seed=seed)

    @property
    def text(self) -> str:
        return f"{self.train},{self.val},{self.test}"

    def to_card(self) -> dict:
        """The split as a head card records it: percentages, seed and the rule."""
        return {"train": self.train, "val": self.val, "test": self.test, "seed": self.seed,
                "rule": "int(sha256(f'{seed}:{doc_hash}')[:8], 16) % 10000"}

    def split_of(self, doc_hash: str) -> str:
        """The split of one document; the SQL in :meth:`sql` computes the same."""
        bucket = int(hashlib.sha256(f"{self.seed}:{doc_hash}".encode()).hexdigest()[:8], 16) % BUCKETS
        if bucket < self.train * 100:
            return "train"
        return "val" if bucket < (self.train + self.val) * 100 else "test"

    def sql(self, column: str = "doc_hash") -> str:
        bucket = f"(('0x' || substr(sha256('{int(self.seed)}:' || {column}), 1, 8))::BIGINT % {BUCKETS})"
        return (
            f"CASE WHEN {bucket} < {self.train * 100} THEN 'train' "
            f"WHEN {bucket} < {(self.train + self.val) * 100} THEN 'val' ELSE 'test' END"
        )


def _blob_column(vectors: pa.ListArray | pa.ChunkedArray, dim: int) -> pa.Array:
    """list<float32> rows of width ``dim`` -> binary rows of their raw bytes, without a copy per row."""
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks()
    lengths = vectors.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != dim or lengths.max() != dim):
        raise StorageError(
            f"embeddings of width {lengths.min()}..{lengths.max()} found where {dim} was expected; "
            "the embeddings table is inconsistent: run `ew verify --deep`"
        )
    values = vectors.flatten().cast(pa.float32())
    data = np.ascontiguousarray(values.to_numpy(zero_copy_only=False))
    offsets = np.arange(0, (len(vectors) + 1) * dim * 4, dim * 4, dtype=np.int64)
    return pa.Array.from_buffers(pa.large_binary(), len(vectors), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _matrix(blobs: pa.Array, dim: int) -> np.ndarray:
    """Binary rows of float32 bytes -> an (n, dim) float32 matrix over the same memory."""
    if isinstance(blobs, pa.ChunkedArray):
        blobs = blobs.combine_chunks()
    offsets_type = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
    offsets = np.frombuffer(blobs.buffers()[1], dtype=offsets_type)[blobs.offset : blobs.offset + len(blobs) + 1]
    start = int(offsets[0])
    data = np.frombuffer(blobs.buffers()[2], dtype=np.uint8)[start : int(offsets[-1])]
    return data.view(np.float32).reshape(len(blobs), dim)


def _vector_batches(vectors: pads.Dataset, *, model: str, layer: int, pooling: str) -> Iterator[pa.RecordBatch]:
    """(doc_hash, embedding list<float32>) batches of one model/layer/pooling, read one Parquet row
    group at a time; fp16 vectors come decoded to float32.

    pyarrow's dataset scanner reads ahead of a slow consumer without bound (600 MB for 490k
    vectors copied into DuckDB), whatever its read-ahead settings; this holds one row group.
    """
    for fragment in vectors.get_fragments(filter=(pc.field("model") == model) & (pc.field("layer") == layer)):
        with pq.ParquetFile(fragment.filesystem.open_input_file(fragment.path)) as file:
            # Files written before embedding_fp16 existed lack the column.
            stored = [name for name in VECTOR_PRECISIONS.values() if name in file.schema_arrow.names]
            for group in range(file.num_row_groups):
                rows = file.read_row_group(group, columns=["doc_hash", *stored, "pooling"])
                rows = float32_vectors(rows.filter(pc.equal(rows.column("pooling"), pooling)))
                yield from rows.select(["doc_hash", "embedding"]).to_batches(max_chunksize=FETCH_ROWS)


@dataclass(frozen=True)
class SplitStats:
    """What :meth:`LabelledVectors.assemble` found and copied."""

    version: int                    # the warehouse version read
    documents: int                  # distinct texts (doc_hash) among the rows
    classes: tuple[str, ...]        # label values, sorted; a row's y indexes this
    counts: dict[str, int]          # rows per split
    rare_classes: tuple[str, ...]   # classes too small to appear in every split
    missing_label: int              # documents of the filter whose label is null (left out)
    no_vector: int                  # labelled texts without a vector of this model/layer (left out)
    dim: int                        # vector width (0 when no row has a vector)
    piles: dict[str, int]           # piles per split, each about pile_rows rows


class LabelledVectors:
    """The labelled vectors of one model / layer / pooling at one warehouse version, split by doc_hash.

    Rows are distinct (doc_hash, label) pairs: a text stored twice with the same label counts once.

    The rows of each split are scattered into piles of about ``pile_rows`` rows by a seeded hash
    of (doc_hash, label): every pile is a uniform random sample of its split, whatever order
    the corpus was ingested in. An epoch reads the piles in an order drawn from (seed, epoch)
    and shuffles each pile's rows with the same generator, so at most one pile is in memory.
    DuckDB keeps the piles within its memory limit and spills the rest to its temp directory;
    nothing is ever sorted as a whole (DuckDB cannot sort wide rows far beyond its limit).

        with LabelledVectors(wh, model=key, layer=6, pooling="mean", documents=DocumentFilter(label="section")) as data:
            stats = data.assemble()
            for x, y in data.batches("train", batch_size=64, epoch=1): ...
    """

    def __init__(
        self,
        warehouse: "Warehouse",
        *,
        model: str,
        layer: int,
        pooling: str,
        documents: DocumentFilter,
        spec: SplitSpec = SplitSpec(),
        version: int | None = None,
        memory_limit: str = INTERNAL_MEMORY_LIMIT,
        threads: int | None = None,
        pile_rows: int = PILE_ROWS,
    ):
        if documents.label is None:
            raise EwError("labelled vectors need a label: DocumentFilter(label=...)")
        self.warehouse, self.model, self.layer, self.pooling = warehouse, model, layer, pooling
        self.documents, self.spec, self.pile_rows = documents, spec, pile_rows
        self.snapshot: Snapshot = warehouse.snapshot(version)
        self.stats: SplitStats | None = None
        datasets = warehouse.datasets(self.snapshot)
        documents.check(datasets[DOCUMENTS].schema.names)
        # The vectors stream through joins on the probe side: only narrow keys are ever hashed.
        self._con = connect(datasets, memory_limit=memory_limit, threads=threads,
                            settings={"disabled_optimizers": "build_side_probe_side"})

    def assemble(self) -> SplitStats:
        """Count the labelled rows and copy their vectors into the piles; call once, before reading."""
        try:
            counted = self._count()
            dim = self._scatter(counted["piles"])
        except duckdb.Error as error:
            self.close()
            raise QueryError(f"assembling the training data failed: {sql_error_message(error)}") from None
        except BaseException:  # a bad vector, Ctrl-C: nothing stays open
            self.close()
            raise
        finally:
            # Hand the Arrow buffers of the copy back to the OS before training starts.
            pa.default_memory_pool().release_unused()
        self.stats = SplitStats(version=self.snapshot.version, dim=dim, **counted)
        return self.stats

    # -- building ------------------------------------------------------------------
    def _count(self) -> dict:
        """Narrow queries first (no vectors): labels, splits, classes, and each row's pile."""
        con = self._con
        missing_label, no_vector = create_labelled(
            con, self.documents, present="(SELECT doc_hash FROM embeddings WHERE model = ? AND layer = ? AND pooling = ?)",
            present_params=[self.model, self.layer, self.pooling], split_sql=self.spec.sql("l.doc_hash"),
        )
        documents = con.execute("SELECT count(DISTINCT doc_hash) FROM present").fetchone()[0]
        per_class: dict[str, dict[str, int]] = {}
        for name, split, count in con.execute("SELECT label, split, count(*) FROM present GROUP BY ALL").fetchall():
            per_class.setdefault(name, {s: 0 for s in SPLITS})[split] = count
        classes = sorted(per_class)
        counts = {s: sum(c[s] for c in per_class.values()) for s in SPLITS}
        piles = {s: max(1, math.ceil(counts[s] / self.pile_rows)) for s in SPLITS}
        con.register("ew_classes", pa.table({"label": classes, "y": np.arange(len(classes), dtype=np.int64)}))
        pile = " ".join(f"WHEN '{s}' THEN {n}" for s, n in piles.items())
        con.execute(
            f"CREATE TABLE keys AS SELECT p.doc_hash, p.split, c.y, "
            f"hash(p.doc_hash, p.label, $seed) % (CASE p.split {pile} END) AS pile "
            "FROM present p JOIN ew_classes c USING (label)",
            {"seed": self.spec.seed},
        )
        con.unregister("ew_classes")
        con.execute("DROP TABLE present")
        return dict(
            documents=documents, classes=tuple(classes), counts=counts, piles=piles, missing_label=missing_label,
            no_vector=no_vector, rare_classes=tuple(name for name in classes if min(per_class[name].values()) == 0),
        )

    def _scatter(self, piles: dict[str, int]) -> int:
        """Copy every vector once, from the pinned Parquet files into its pile.

        One streaming join: DuckDB builds its hash table on the narrow ``keys`` once and probes
        it with the vectors as they are read, so the copy is linear in the number of vectors.
        Rows reach the piles in no fixed order; readers sort each pile (see :meth:`_stream`).
        Returns the vectors' width.
        """
        # One function on purpose: the copy is one streaming pass whose buffers, flush size and
        # cursors share a lifetime; split up, they would be passed around as loose state.
        names = [_pile_table(split, pile) for split in SPLITS for pile in range(piles[split])]
        first_pile = np.cumsum([0] + [piles[s] for s in SPLITS[:-1]])  # of each split, in ``names``
        for name in names:
            self._con.execute(f"CREATE TABLE {name} (doc_hash VARCHAR, y BIGINT, x BLOB)")
        width = 0

        def blobs() -> Iterator[pa.RecordBatch]:
            nonlocal width
            vectors = self.warehouse.dataset(EMBEDDINGS, self.snapshot)
            for batch in _vector_batches(vectors, model=self.model, layer=self.layer, pooling=self.pooling):
                if batch.num_rows:
                    width = width or len(batch.column("embedding")[0])
                    blob = _blob_column(batch.column("embedding"), width)
                    yield pa.record_batch([batch.column("doc_hash").cast(pa.string()), blob], schema=BLOBS)

        buffers: dict[int, list[pa.Table]] = {}
        buffered: dict[int, int] = {}
        inserter = self._con.cursor()  # the join's result stays open on the main connection

        def flush(pile: int) -> None:
            inserter.register("ew_rows", pa.concat_tables(buffers.pop(pile)))
            inserter.execute(f"INSERT INTO {names[pile]} SELECT doc_hash, y, x FROM ew_rows")
            inserter.unregister("ew_rows")
            buffered.pop(pile)

        self._con.register("ew_vectors", pa.RecordBatchReader.from_batches(BLOBS, blobs()))
        joined = None
        try:
            joined = self._con.sql(
                "SELECT k.split, k.pile, v.doc_hash, k.y, v.x FROM ew_vectors v JOIN keys k USING (doc_hash)"
            ).to_arrow_reader(FETCH_ROWS)
            flush_rows = 0
            for rows in joined:
                # Rows held back per pile between inserts: all piles together within SCATTER_BYTES.
                flush_rows = flush_rows or max(64, SCATTER_BYTES // ((width * 4 + 100) * len(names)))
                splits = pc.index_in(rows.column("split"), value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
                piles = first_pile[splits] + rows.column("pile").to_numpy(zero_copy_only=False).astype(np.int64)
                order = np.argsort(piles, kind="stable")
                edges = np.flatnonzero(np.diff(piles[order])) + 1
                for group in np.split(order, edges):
                    if not len(group):
                        continue
                    pile = int(piles[group[0]])
                    # A copy of the rows (take), not a slice that would keep the whole batch alive.
                    buffers.setdefault(pile, []).append(pa.Table.from_batches([rows.take(group)]))
                    buffered[pile] = buffered.get(pile, 0) + len(group)
                    if buffered[pile] >= flush_rows:
                        flush(pile)
            for pile in sorted(buffers):
                flush(pile)
        finally:
            if joined is not None:
                joined.close()
            self._con.unregister("ew_vectors")
            inserter.close()
        self._con.execute("DROP TABLE keys")
        return width

    # -- reading -------------------------------------------------------------------
    def batches(self, split: str, *, batch_size: int, epoch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x (B, dim) float32, y (B,) int64) batches of ``split``.

        With ``epoch``, the piles come in an order drawn by a generator seeded with (split seed,
        epoch), each shuffled by the same generator: the same epoch always gives the same batches.
        """
        for x, y, _ in self._stream(split, batch_size=batch_size, epoch=epoch, keys=False):
            yield x, y

    def keyed_batches(self, split: str, *, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Like :meth:`batches` without shuffling (pile by pile, by doc_hash), with the doc_hash of every row."""
        yield from self._stream(split, batch_size=batch_size, epoch=None, keys=True)

    def _stream(self, split: str, *, batch_size: int, epoch: int | None, keys: bool):
        if split not in SPLITS:
            raise EwError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        if self.stats is None:
            raise EwError("LabelledVectors.assemble() must run before its batches are read")
        count = self.stats.piles[split]
        rng = None if epoch is None else np.random.default_rng([self.spec.seed, epoch])
        piles = range(count) if rng is None else rng.permutation(count)
        # A cursor of its own, so a stream can run in a prefetch thread beside another.
        cursor = self._con.cursor()
        try:
            for pile in piles:
                rows = cursor.sql(f"SELECT x, y, doc_hash FROM {_pile_table(split, int(pile))}").to_arrow_table()
                if rows.num_rows == 0:
                    continue
                # Rows were stored in no fixed order: sorted by key first, every epoch is reproducible.
                order = pc.sort_indices(rows, sort_keys=[("doc_hash", "ascending"), ("y", "ascending")]).to_numpy()
                if rng is not None:
                    order = order[rng.permutation(len(order))]
                # One reordered copy per pile, batches are views of it: few, same-sized
                # allocations keep the allocator's heap from fragmenting across epochs.
                x = _matrix(rows.column("x"), self.stats.dim)[order]
                y = rows.column("y").to_numpy()[order]
                hashes = rows.column("doc_hash").take(order).to_pylist() if keys else None
                for start in range(0, len(y), batch_size):
                    window = slice(start, start + batch_size)
                    yield x[window], y[window], (hashes[window] if keys else None)
        finally:
            cursor.close()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "LabelledVectors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pile_table(split: str, pile: int) -> str:
    return f"pile_{split}_{pile}"
