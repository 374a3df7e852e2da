"""Train / val / test splits assembled by DuckDB, streamed out as NumPy batches.

A document's split is a pure function of its ``doc_hash`` and the split seed:

    bucket = int(sha256(f"{seed}:{doc_hash}")[:8], 16) % 10000
    train if bucket < 100 * train_percent, val if below 100 * (train + val), else test

so a document never changes split when the warehouse grows or rows arrive in another order,
and identical texts (one doc_hash) always share a split: test never leaks into train.

The labelled vectors are copied once into a DuckDB table (raw float32 bytes) in a seeded
random order, which DuckDB keeps within its memory limit and spills to disk beyond it; every
epoch streams them back a few thousand rows at a time, shuffled again within windows of
SHUFFLE_ROWS rows by a generator seeded with the epoch (a shuffle buffer).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import EwError, HeadError, QueryError, first_line
from .query import check_sql, connect
from .tables import DOCUMENTS, EMBEDDINGS, RESERVED_DOCUMENT_COLUMNS

if TYPE_CHECKING:
    from .store import Warehouse

SPLITS = ("train", "val", "test")
BUCKETS = 10_000
FETCH_ROWS = 8192
# DuckDB's limit for ew's own queries: it spills beyond it, and fit-head's peak RSS stays low.
INTERNAL_MEMORY_LIMIT = "256MB"
SHUFFLE_ROWS = 8192  # rows shuffled together within an epoch (~12 MB of 384-wide vectors)


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


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _blob_column(vectors: pa.ListArray | pa.ChunkedArray, dim: int) -> pa.Array:
    """list<float32> rows of width ``dim`` -> binary rows of their raw bytes, without a copy per row."""
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks()
    lengths = vectors.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != dim or lengths.max() != dim):
        raise HeadError(f"embeddings of width {lengths.min()}..{lengths.max()} found where {dim} was expected")
    values = vectors.flatten().cast(pa.float32())
    data = np.ascontiguousarray(values.to_numpy(zero_copy_only=False))
    offsets = np.arange(0, (len(vectors) + 1) * dim * 4, dim * 4, dtype=np.int64)
    return pa.Array.from_buffers(pa.large_binary(), len(vectors), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _windows(reader: pa.RecordBatchReader, rows: int) -> Iterator[pa.Table]:
    """Consecutive tables of about ``rows`` rows from a stream of record batches."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending)
            pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending)


def _matrix(blobs: pa.Array, dim: int) -> np.ndarray:
    """Binary rows of float32 bytes -> an (n, dim) float32 matrix over the same memory."""
    if isinstance(blobs, pa.ChunkedArray):
        blobs = blobs.combine_chunks()
    offsets_type = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
    offsets = np.frombuffer(blobs.buffers()[1], dtype=offsets_type)[blobs.offset : blobs.offset + len(blobs) + 1]
    start = int(offsets[0])
    data = np.frombuffer(blobs.buffers()[2], dtype=np.uint8)[start : int(offsets[-1])]
    return data.view(np.float32).reshape(len(blobs), dim)


@dataclass(frozen=True)
class DocumentFilter:
    """Which documents take part: those with a non-null ``label``, of ``corpus``, matching ``where``."""

    label: str | None = None
    corpus: str | None = None
    where: str | None = None

    def check(self, columns: list[str]) -> None:
        if self.label is not None and (self.label not in columns or self.label in RESERVED_DOCUMENT_COLUMNS - {"text"}):
            usable = sorted(set(columns) - RESERVED_DOCUMENT_COLUMNS)
            raise HeadError(
                f"documents has no label column {self.label!r}; fields you can use: "
                f"{', '.join(usable) or 'none yet (ingest a corpus first)'}"
            )
        if self.where:
            check_sql(f"SELECT 1 FROM documents WHERE {self.where}")

    def condition(self, *, labelled: bool = True) -> tuple[str, list]:
        """A SQL condition over ``documents`` and its parameters."""
        clauses, params = [], []
        if labelled and self.label is not None:
            clauses.append(f"{quote(self.label)} IS NOT NULL")
        if self.corpus is not None:
            clauses.append("corpus = ?")
            params.append(self.corpus)
        if self.where:
            clauses.append(f"({self.where})")
        return (" AND ".join(clauses) or "TRUE"), params


def missing_vectors(
    warehouse: "Warehouse",
    *,
    documents: DocumentFilter,
    model: str,
    layer: int,
    pooling: str,
    batch_rows: int = 4096,
    probe: bool = False,
) -> Iterator[pa.RecordBatch]:
    """(doc_hash, text) batches of the latest version's documents that lack a vector of model/layer/pooling.

    With ``probe``, at most one row and no text: a cheap "is anything missing?".
    """
    snapshot = warehouse.snapshot()
    documents.check(warehouse.dataset(DOCUMENTS, snapshot).schema.names)
    condition, params = documents.condition()
    columns, tail = ("doc_hash", "LIMIT 1") if probe else ("doc_hash, any_value(text) AS text", "GROUP BY doc_hash")
    con = connect(warehouse, snapshot, memory_limit=INTERNAL_MEMORY_LIMIT)
    try:
        reader = con.sql(
            f"SELECT {columns} FROM documents WHERE {condition} AND doc_hash NOT IN "
            f"(SELECT doc_hash FROM embeddings WHERE model = ? AND layer = ? AND pooling = ?) {tail}",
            params=params + [model, layer, pooling],
        ).to_arrow_reader(batch_rows)
        yield from reader
    except duckdb.Error as error:
        raise QueryError(f"finding documents without vectors failed: {first_line(error)}") from None
    finally:
        con.close()


@dataclass
class LabelledVectors:
    """The labelled vectors of one model / layer / pooling at one warehouse version, split by doc_hash.

    Rows are distinct (doc_hash, label) pairs: a text stored twice with the same label counts once.
    """

    warehouse: "Warehouse"
    model: str
    layer: int
    pooling: str
    label: str
    spec: SplitSpec = field(default_factory=SplitSpec)
    corpus: str | None = None
    where: str | None = None
    version: int | None = None
    memory_limit: str = INTERNAL_MEMORY_LIMIT
    threads: int | None = None

    def __post_init__(self) -> None:
        snapshot = self._snapshot = self.warehouse.snapshot(self.version)
        self.version = snapshot.version
        self._documents = DocumentFilter(label=self.label, corpus=self.corpus, where=self.where)
        self._documents.check(self.warehouse.dataset(DOCUMENTS, snapshot).schema.names)
        # DuckDB keeps its tables within memory_limit and pages the rest to its temp directory.
        self._con = connect(self.warehouse, snapshot, memory_limit=self.memory_limit, threads=self.threads)
        try:
            self._materialize()
        except duckdb.Error as error:
            self.close()
            raise QueryError(f"assembling the training data failed: {first_line(error)}") from None

    # -- building ------------------------------------------------------------------
    def _materialize(self) -> None:
        con = self._con
        label = quote(self.label)
        condition, params = self._documents.condition(labelled=False)
        self.missing_label = con.execute(
            f"SELECT count(*) FROM documents WHERE {label} IS NULL AND {condition}", params
        ).fetchone()[0]
        condition, params = self._documents.condition()
        con.execute(
            f"CREATE TABLE labelled AS SELECT DISTINCT doc_hash, CAST({label} AS VARCHAR) AS label "
            f"FROM documents WHERE {condition}",
            params,
        )
        vector_filter = "model = ? AND layer = ? AND pooling = ?"
        vector_params = [self.model, self.layer, self.pooling]
        #: Labelled texts without a vector of this model/layer at this version (left out).
        self.no_embedding = con.execute(
            f"SELECT count(*) FROM labelled ANTI JOIN (SELECT doc_hash FROM embeddings WHERE {vector_filter}) USING (doc_hash)",
            vector_params,
        ).fetchone()[0]
        self.dim = 0
        con.execute(
            f"CREATE TABLE labelled_split AS SELECT doc_hash, label, {self.spec.sql()} AS split FROM labelled"
        )
        con.execute("CREATE TABLE staged (doc_hash VARCHAR, label VARCHAR, split VARCHAR, x BLOB)")
        # Vectors come straight from the Parquet files of the pinned version (Arrow lists), which
        # is far faster than DuckDB's list conversion; DuckDB joins each batch with the labels.
        vectors = self.warehouse.dataset(EMBEDDINGS, self._snapshot)
        wanted = (pc.field("model") == self.model) & (pc.field("layer") == self.layer) & (pc.field("pooling") == self.pooling)
        # Little read-ahead: the copy into DuckDB is the bottleneck, and buffered batches are RSS.
        for batch in vectors.to_batches(columns=["doc_hash", "embedding"], filter=wanted, batch_size=FETCH_ROWS,
                                        batch_readahead=1, fragment_readahead=1):
            if batch.num_rows == 0:
                continue
            if not self.dim:
                self.dim = len(batch.column("embedding")[0])
            con.register("ew_chunk", pa.table({"doc_hash": batch.column("doc_hash"), "x": _blob_column(batch.column("embedding"), self.dim)}))
            con.execute(
                "INSERT INTO staged SELECT l.doc_hash, l.label, l.split, c.x FROM ew_chunk c JOIN labelled_split l USING (doc_hash)"
            )
            con.unregister("ew_chunk")
        #: Distinct texts (doc_hash) among the rows.
        self.documents = con.execute("SELECT count(DISTINCT doc_hash) FROM staged").fetchone()[0]
        counts = con.execute("SELECT label, split, count(*) FROM staged GROUP BY ALL").fetchall()
        per_class: dict[str, dict[str, int]] = {}
        for name, split, count in counts:
            per_class.setdefault(name, {s: 0 for s in SPLITS})[split] = count
        self.classes = sorted(per_class)
        self.counts = {s: sum(c[s] for c in per_class.values()) for s in SPLITS}
        #: Classes too small to appear in every split.
        self.rare_classes = [name for name in self.classes if min(per_class[name].values()) == 0]
        con.register("ew_classes", pa.table({"label": self.classes, "y": np.arange(len(self.classes), dtype=np.int64)}))
        con.execute("CREATE TABLE classes AS SELECT * FROM ew_classes")
        con.unregister("ew_classes")
        # One seeded shuffle, stored: every later read is a plain scan in this order (no sort
        # per epoch, nothing materialized but DuckDB's pages), and epochs re-shuffle locally.
        con.execute(
            "CREATE TABLE examples AS SELECT s.split, s.doc_hash, s.x, c.y FROM staged s JOIN classes c USING (label) "
            "ORDER BY hash(s.doc_hash, s.label, $seed), s.doc_hash, s.label",
            {"seed": self.spec.seed},
        )
        con.execute("DROP TABLE staged")
        # Hand the Arrow buffers of the copy back to the OS before training starts.
        pa.default_memory_pool().release_unused()

    # -- reading -------------------------------------------------------------------
    def batches(self, split: str, *, batch_size: int, epoch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x (B, dim) float32, y (B,) int64) batches of ``split``.

        With ``epoch``, rows are shuffled within windows of SHUFFLE_ROWS by a generator seeded
        with (split seed, epoch): the same epoch always gives the same batches.
        """
        for x, y, _ in self._stream(split, batch_size=batch_size, epoch=epoch, keys=False):
            yield x, y

    def keyed_batches(self, split: str, *, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Like :meth:`batches` in stored order, with the doc_hash of every row."""
        yield from self._stream(split, batch_size=batch_size, epoch=None, keys=True)

    def _stream(self, split: str, *, batch_size: int, epoch: int | None, keys: bool):
        if split not in SPLITS:
            raise EwError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        # A cursor of its own, so a stream can run in a prefetch thread beside another.
        cursor = self._con.cursor()
        reader = cursor.sql(
            "SELECT x, y, doc_hash FROM examples WHERE split = $split", params={"split": split}
        ).to_arrow_reader(FETCH_ROWS)
        rng = None if epoch is None else np.random.default_rng([self.spec.seed, epoch])
        try:
            for window in _windows(reader, SHUFFLE_ROWS if rng is not None else FETCH_ROWS):
                x = _matrix(window.column("x"), self.dim)
                y = window.column("y").to_numpy()
                hashes = window.column("doc_hash").to_pylist() if keys else None
                order = rng.permutation(len(y)) if rng is not None else None
                for start in range(0, len(y), batch_size):
                    if order is None:
                        rows = slice(start, start + batch_size)
                        yield x[rows], y[rows], (hashes[rows] if keys else None)
                    else:
                        rows = order[start : start + batch_size]
                        yield x[rows], y[rows], ([hashes[i] for i in rows] if keys else None)
        finally:
            cursor.close()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "LabelledVectors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
