"""Which documents take part in a job, and which of them lack a vector or token states.

A :class:`DocumentFilter` is the same SQL condition over ``documents`` for every job
(fit-head's labelled rows, predict's ``--where``, the texts to embed first); the condition
is checked by the query sandbox before it runs.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from .errors import QueryError, SelectionError
from .query import check_sql, connect, sql_error_message
from .tables import DOCUMENTS, RESERVED_DOCUMENT_COLUMNS

# DuckDB's limit for ew's own queries: it spills beyond it, and fit-head's peak RSS stays low.
INTERNAL_MEMORY_LIMIT = "128MB"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class DocumentFilter:
    """Which documents take part: those with a non-null ``label``, of ``corpus``, matching ``where``."""

    label: str | None = None
    corpus: str | None = None
    where: str | None = None

    def check(self, columns: list[str]) -> None:
        """Raise SelectionError (or the sandbox's QueryError) unless the filter can run on these columns."""
        if self.label is not None and (self.label not in columns or self.label in RESERVED_DOCUMENT_COLUMNS - {"text"}):
            usable = sorted(set(columns) - RESERVED_DOCUMENT_COLUMNS)
            raise SelectionError(
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
    datasets: Mapping[str, pads.Dataset],
    *,
    documents: DocumentFilter,
    model: str,
    layer: int,
    pooling: str,
    batch_rows: int = 4096,
    probe: bool = False,
) -> Iterator[pa.RecordBatch]:
    """(doc_hash, text) batches of the documents in ``datasets`` that lack a vector of model/layer/pooling.

    With ``probe``, at most one row and no text: a cheap "is anything missing?".
    """
    present = "SELECT doc_hash FROM embeddings WHERE model = ? AND layer = ? AND pooling = ?"
    return _missing(datasets, documents=documents, present=present, present_params=[model, layer, pooling],
                    batch_rows=batch_rows, probe=probe)


def missing_states(
    datasets: Mapping[str, pads.Dataset],
    *,
    documents: DocumentFilter,
    model: str,
    layer: int,
    precision: str,
    batch_rows: int = 4096,
    probe: bool = False,
) -> Iterator[pa.RecordBatch]:
    """(doc_hash, text) batches of the documents in ``datasets`` without a ``token_states`` row of model/layer/precision.

    A document whose states are cached in the other precision counts as missing. With
    ``probe``, at most one row and no text.
    """
    present = "SELECT doc_hash FROM token_states WHERE model = ? AND layer = ? AND precision = ?"
    return _missing(datasets, documents=documents, present=present, present_params=[model, layer, precision],
                    batch_rows=batch_rows, probe=probe)


def _missing(
    datasets: Mapping[str, pads.Dataset],
    *,
    documents: DocumentFilter,
    present: str,
    present_params: list,
    batch_rows: int,
    probe: bool,
) -> Iterator[pa.RecordBatch]:
    """(doc_hash, text) batches of the filter's documents whose doc_hash the subquery ``present`` does not return."""
    documents.check(datasets[DOCUMENTS].schema.names)
    condition, params = documents.condition()
    columns, tail = ("doc_hash", "LIMIT 1") if probe else ("doc_hash, any_value(text) AS text", "GROUP BY doc_hash")
    con = connect(datasets, memory_limit=INTERNAL_MEMORY_LIMIT)
    try:
        reader = con.sql(
            f"SELECT {columns} FROM documents WHERE {condition} AND doc_hash NOT IN ({present}) {tail}",
            params=params + present_params,
        ).to_arrow_reader(batch_rows)
        yield from reader
    except duckdb.Error as error:
        raise QueryError(f"selecting the documents failed: {sql_error_message(error)}") from None
    finally:
        con.close()


def create_labelled(
    con: duckdb.DuckDBPyConnection,
    documents: DocumentFilter,
    *,
    present: str,
    present_params: list,
    split_sql: str,
    columns: str = "",
) -> tuple[int, int]:
    """Create the table ``present`` of the labelled rows that have what ``present`` selects.

    Rows are distinct (doc_hash, label) pairs with a non-null label; ``present`` is a subquery
    aliased ``p`` with a ``doc_hash`` column (and the ``columns``, e.g. ", p.n_tokens", to keep);
    ``split_sql`` computes each row's split from ``l.doc_hash``. Returns (documents without the
    label, labelled texts left out because ``present`` lacks them).
    """
    label = quote(documents.label)
    condition, params = documents.condition(labelled=False)
    missing_label = con.execute(f"SELECT count(*) FROM documents WHERE {label} IS NULL AND {condition}", params).fetchone()[0]
    condition, params = documents.condition()
    con.execute(f"CREATE TABLE labelled AS SELECT DISTINCT doc_hash, CAST({label} AS VARCHAR) AS label "
                f"FROM documents WHERE {condition}", params)
    left_out = con.execute(f"SELECT count(*) FROM labelled ANTI JOIN {present} p USING (doc_hash)",
                           present_params).fetchone()[0]
    con.execute(f"CREATE TABLE present AS SELECT l.doc_hash, l.label{columns}, {split_sql} AS split "
                f"FROM labelled l JOIN {present} p USING (doc_hash)", present_params)
    con.execute("DROP TABLE labelled")
    return missing_label, left_out

