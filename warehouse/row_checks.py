"""`ew verify --deep`: every row of the intact pinned tables, streamed through DuckDB.

    problems = check_rows(warehouse, snapshot, skip={"embeddings"})

Unique keys, ``doc_hash`` = :func:`warehouse.keys.doc_hash` of the text, vector widths and layers
that agree with the ``models`` table, token-state sizes that agree with their model's dim. A file
damaged past its footer is named file by file.
"""
from __future__ import annotations

from collections.abc import Collection

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from .errors import StorageError, first_line
from .keys import doc_hash
from .problems import RESTORE, Problem
from .query import connect
from .store import Warehouse
from .tables import DOCUMENTS, EMBEDDINGS, HEADS, MODELS, TABLES, TOKEN_STATES
from .versions import Snapshot

#: The columns that identify one row of each table.
KEYS: dict[str, tuple[str, ...]] = {
    DOCUMENTS: ("corpus", "id"),
    EMBEDDINGS: ("doc_hash", "model", "layer", "pooling"),
    MODELS: ("model",),
    HEADS: ("head",),
    TOKEN_STATES: ("doc_hash", "model", "layer", "precision"),
}
EXAMPLES = 3  # rows quoted per finding
# One row per registered model: its dim, layers and vector precision, to join the vectors and states against.
_MODELS = ("(select model, any_value(dim) as dim, any_value(num_layers) as num_layers, "
           "any_value(coalesce(vector_precision, 'fp32')) as vector_precision from models group by model)")


def check_rows(warehouse: Warehouse, snapshot: Snapshot, *, skip: Collection[str] = ()) -> list[Problem]:
    """The problems found in every row of the tables ``snapshot`` pins, but those in ``skip`` (known damaged)."""
    check = _RowCheck(warehouse, skip)
    check.every_row(snapshot)
    return check.problems


class _RowCheck:
    """Collects the problems of one run of :func:`check_rows`."""

    def __init__(self, warehouse: Warehouse, skip: Collection[str]):
        self.warehouse = warehouse
        self.storage = warehouse.storage
        self.problems: list[Problem] = []
        self.damaged: set[str] = set(skip)  # tables not to read (again)

    def add(self, kind: str, what: str, where: str, fix: str) -> None:
        self.problems.append(Problem(kind=kind, what=what, where=where, fix=fix))

    def every_row(self, snapshot: Snapshot) -> None:
        """Stream every row of the intact pinned tables through DuckDB."""
        datasets = {}
        for table in TABLES:
            if table in self.damaged:
                continue
            try:
                datasets[table] = self.warehouse.dataset(table, snapshot)
            except StorageError:  # reported by the file checks
                continue
        con = connect(datasets)
        try:
            for table in datasets:
                self.query(datasets, (table,), self.duplicate_keys, con, table)
            if DOCUMENTS in datasets:
                self.query(datasets, (DOCUMENTS,), self.document_hashes, con)
            if EMBEDDINGS in datasets and MODELS in datasets:
                self.query(datasets, (EMBEDDINGS, MODELS), self.vectors, con)
            if TOKEN_STATES in datasets and MODELS in datasets:
                self.query(datasets, (TOKEN_STATES, MODELS), self.token_states, con)
        finally:
            con.close()

    def query(self, datasets: dict[str, pads.Dataset], tables: tuple[str, ...], run, *args) -> None:
        """Run one deep check over ``tables``; when reading them fails, name the damaged files."""
        if any(table in self.damaged for table in tables):
            return
        try:
            run(*args)
        except (duckdb.InvalidInputException, duckdb.IOException) as error:  # a file damaged past its footer
            named = [self.damaged_fragments(table, datasets[table]) for table in tables]
            if not any(named):
                self.add("unreadable-rows", f"reading every row of the {' and '.join(tables)} tables failed "
                         f"({first_line(error)})", self.storage.table_uri(tables[0]), RESTORE)
            self.damaged.update(tables)

    def damaged_fragments(self, table: str, dataset: pads.Dataset) -> bool:
        """Read ``table`` file by file, reporting each that fails; whether any did."""
        found = False
        for fragment in dataset.get_fragments():
            try:
                for _ in fragment.to_batches():
                    pass
            except (OSError, pa.ArrowException) as error:
                found = True
                self.add("damaged-file", f"a data file of the {table} table is damaged inside ({first_line(error)})",
                         fragment.path, f"{RESTORE}: without it the table cannot be read")
        return found

    def duplicate_keys(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        keys = ", ".join(KEYS[table])
        # Group 64-bit hashes of the keys first (8 bytes a row, not the ~100 of the keys themselves:
        # 140 MB less at 900k embeddings), then only the rows whose hash repeats by their keys.
        rows = con.sql(
            f"with candidates as (select hash({keys}) as h from {table} group by h having count(*) > 1) "
            f"select {keys}, n, count(*) over () as repeated from (select {keys}, count(*) as n from {table} "
            f"where hash({keys}) in (select h from candidates) group by all having n > 1) "
            f"order by n desc, {keys} limit {EXAMPLES}"
        ).fetchall()
        if rows:
            examples = "; ".join(
                ", ".join(f"{name}={value!r}" for name, value in zip(KEYS[table], row)) + f" ({row[-2]} rows)"
                for row in rows
            )
            self.add("duplicate-key", f"{rows[0][-1]:,} keys ({keys}) occur more than once, e.g. {examples}",
                     self.storage.table_uri(table),
                     f"queries count these rows more than once; {RESTORE}, or rewrite the table without the repeats")

    def document_hashes(self, con: duckdb.DuckDBPyConnection) -> None:
        # DuckDB finds the candidates in one streamed pass; warehouse.keys.doc_hash, the definition,
        # decides (DuckDB's Unicode tables may be of another version than Python's).
        reader = con.sql(
            "select corpus, id, doc_hash, text from documents "
            "where text is null or doc_hash is distinct from sha256(nfc_normalize(text))"
        ).fetch_record_batch()
        wrong, examples = 0, []
        for batch in reader:
            for row in batch.to_pylist():
                if row["text"] is not None and row["doc_hash"] == doc_hash(row["text"]):
                    continue
                wrong += 1
                if len(examples) < EXAMPLES:
                    examples.append(f"corpus={row['corpus']!r}, id={row['id']!r}")
        if wrong:
            self.add("doc-hash", f"{wrong:,} documents have a doc_hash that is not the hash of their text, e.g. "
                     + "; ".join(examples), self.storage.table_uri(DOCUMENTS),
                     "their vectors cannot be found by text; ingest those records again to rewrite them")

    def vectors(self, con: duckdb.DuckDBPyConnection) -> None:
        # The stored form is checked (an fp16 blob's bytes, never decoded): half floats of the model's dim,
        # in the column of the model's vector precision.
        groups = con.sql(
            "select model, layer, width, dim, num_layers, stored, vector_precision, count(*) as n from ("
            "  select e.model, e.layer, m.dim, m.num_layers, m.vector_precision, m.model as registered,"
            "    case when e.embedding_fp16 is null then len(e.embedding) else octet_length(e.embedding_fp16) / 2 end"
            "      as width,"
            "    case when e.embedding_fp16 is null then 'fp32' else 'fp16' end as stored"
            f"  from embeddings e left join {_MODELS} m on e.model = m.model) "
            "where registered is null or width is distinct from dim or layer not between 0 and num_layers "
            "or stored <> vector_precision "
            "group by all order by all"
        ).fetchall()
        where = self.storage.table_uri(EMBEDDINGS)
        for model, layer, width, dim, num_layers, stored, vector_precision, n in groups:
            at = f"{where} (model={model}, layer={layer})"
            if dim is None:
                self.add("unknown-model", f"{n:,} vectors of model {model}, which the models table does not list", at,
                         f"{RESTORE}, or ingest with that model again to register it")
            elif layer is None or not 0 <= layer <= num_layers:
                self.add("layer-range", f"{n:,} vectors of layer {layer}, outside its model's layers 0..{num_layers}", at,
                         f"they were written outside ew: {RESTORE}")
            elif width != dim:
                self.add("vector-width", f"{n:,} vectors {'are null' if width is None else f'have {width:g} values'}, "
                         f"the model's dim is {dim}", at, f"they were written outside ew: {RESTORE}")
            else:
                self.add("vector-precision", f"{n:,} vectors are stored as {stored}, but model {model} stores "
                         f"{vector_precision} vectors", at, f"they were written outside ew: {RESTORE}")

    def token_states(self, con: duckdb.DuckDBPyConnection) -> None:
        """Every states blob holds n_tokens x dim values of its precision, dim being its model's."""
        bad = con.sql(
            "select t.model, t.layer, count(*) as n from token_states t "
            f"left join {_MODELS} m on t.model = m.model "
            "where m.model is null or t.dim is distinct from m.dim or octet_length(t.states) is distinct from "
            "t.n_tokens * t.dim * (case t.precision when 'fp16' then 2 when 'fp32' then 4 end) "
            "group by all order by all"
        ).fetchall()
        for model, layer, n in bad:
            self.add("state-width", f"{n:,} token-state rows whose size disagrees with n_tokens, dim and precision, "
                     "or whose model is not registered", f"{self.storage.table_uri(TOKEN_STATES)} (model={model}, "
                     f"layer={layer})", f"they were written outside ew: {RESTORE}")
