"""What a warehouse holds at one version: what a user checks before and after a big ingest.

    info = summarize(Warehouse.open("ew-warehouse"))
    info.corpora[0].documents, info.vectors[0].bytes, info.tables["embeddings"].files

Counts come from one narrow DuckDB pass per table (no vector or state is read); bytes and
files come from the Delta log of the pinned table versions, not from listing the disk, so
files of unpinned or removed versions are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from .query import connect
from .selection import INTERNAL_MEMORY_LIMIT, quote
from .tables import DOCUMENTS, EMBEDDINGS, RESERVED_DOCUMENT_COLUMNS, TABLES, TOKEN_STATES

if TYPE_CHECKING:
    from .store import Warehouse


@dataclass(frozen=True)
class CorpusInfo:
    corpus: str
    documents: int                  # rows of documents (one per id)
    texts: int                      # distinct texts (doc_hash)
    labelled: dict[str, int]        # field -> documents where it is not null (fields with any value)


@dataclass(frozen=True)
class VectorInfo:
    model: str
    layer: int
    pooling: str
    vectors: int                    # one per distinct text
    bytes: int                      # on disk, this model/layer's files


@dataclass(frozen=True)
class StatesInfo:
    model: str
    layer: int
    precision: str
    documents: int
    bytes: int                      # on disk, this model/layer's files (both precisions)


@dataclass(frozen=True)
class TableInfo:
    delta_version: int              # -1: not created yet
    files: int
    bytes: int


@dataclass(frozen=True)
class WarehouseInfo:
    root: str
    version: int                    # the version described (-1: nothing committed yet)
    latest_version: int
    versions: int                   # how many versions the log holds
    committed_at: datetime | None   # of ``version``
    corpora: tuple[CorpusInfo, ...]
    vectors: tuple[VectorInfo, ...]
    token_states: tuple[StatesInfo, ...]
    tables: dict[str, TableInfo]

    @property
    def bytes(self) -> int:
        return sum(table.bytes for table in self.tables.values())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["committed_at"] = None if self.committed_at is None else self.committed_at.isoformat()
        data["bytes"] = self.bytes
        return data


def summarize(warehouse: "Warehouse", *, version: int | None = None) -> WarehouseInfo:
    """Counts per corpus, per model/layer and per table at ``version`` (default: the latest)."""
    snapshot = warehouse.snapshot(version)
    log = warehouse.log()
    files = {table: _files(warehouse, table, snapshot) for table in TABLES}
    tables = {
        table: TableInfo(delta_version=snapshot.table_versions.get(table, -1), files=files[table].num_rows,
                         bytes=_total(files[table]))
        for table in TABLES
    }
    datasets = warehouse.datasets(snapshot)
    con = connect(datasets, memory_limit=INTERNAL_MEMORY_LIMIT)
    try:
        fields = [name for name in datasets[DOCUMENTS].schema.names if name not in RESERVED_DOCUMENT_COLUMNS]
        counts = "".join(f", count({quote(name)})" for name in fields)
        corpora = tuple(
            CorpusInfo(corpus=row[0], documents=row[1], texts=row[2],
                       labelled={name: n for name, n in zip(fields, row[3:]) if n})
            for row in con.sql(
                f"SELECT corpus, count(*), count(DISTINCT doc_hash){counts} FROM documents GROUP BY corpus ORDER BY corpus"
            ).fetchall()
        )
        vector_bytes = _bytes_by_partition(files[EMBEDDINGS])
        vectors = tuple(
            VectorInfo(model=model, layer=layer, pooling=pooling, vectors=n, bytes=vector_bytes.get((model, layer), 0))
            for model, layer, pooling, n in con.sql(
                "SELECT model, layer, pooling, count(*) FROM embeddings GROUP BY ALL ORDER BY ALL"
            ).fetchall()
        )
        state_bytes = _bytes_by_partition(files[TOKEN_STATES])
        token_states = tuple(
            StatesInfo(model=model, layer=layer, precision=precision, documents=n,
                       bytes=state_bytes.get((model, layer), 0))
            for model, layer, precision, n in con.sql(
                "SELECT model, layer, precision, count(*) FROM token_states GROUP BY ALL ORDER BY ALL"
            ).fetchall()
        )
    finally:
        con.close()
    return WarehouseInfo(
        root=warehouse.uri, version=snapshot.version,
        latest_version=log[-1].version if log else -1, versions=len(log), committed_at=snapshot.committed_at,
        corpora=corpora, vectors=vectors, token_states=token_states, tables=tables,
    )


def _files(warehouse: "Warehouse", table: str, snapshot) -> pa.Table:
    """The live files (path, size_bytes, partition.*) of ``table`` as ``snapshot`` pins it."""
    delta = warehouse.delta_table(table, snapshot)
    if delta is None:
        return pa.table({"size_bytes": pa.array([], pa.int64())})
    return pa.table(delta.get_add_actions(flatten=True))


def _total(files: pa.Table) -> int:
    return int(sum(files.column("size_bytes").to_pylist()))


def _bytes_by_partition(files: pa.Table) -> dict[tuple[str, int], int]:
    if "partition.model" not in files.column_names:
        return {}
    sizes: dict[tuple[str, int], int] = {}
    for model, layer, size in zip(*(files.column(c).to_pylist() for c in ("partition.model", "partition.layer", "size_bytes"))):
        sizes[(model, int(layer))] = sizes.get((model, int(layer)), 0) + size
    return sizes
