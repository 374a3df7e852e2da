"""Scoring with a head trained above layer K (``--tune top|lora``): from cached token states
where the warehouse has them, else through the encoder up to layer K, then the trained top.

The states computed here are rounded to the precision the head was trained on, so a document
gets the same answer whether its states were cached or not. They are not stored: caching
states is ingest's job (``ew ingest --token-states K``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from warehouse.tables import STATE_DTYPES, TOKEN_STATES, states_matrix

from .encoder import Encoder
from .recycling import TopHead, pad_states
from .registry import model_row

BATCH = 32
CHUNK = 1024  # documents read (and their states held) at a time


class TopScorer:
    """Probabilities (N, C) of a top/lora head for (doc_hash, text) chunks, in their order."""

    def __init__(self, head: TopHead, *, states: pads.Dataset, artifact: Path, threads: int | None = None):
        self.head = head
        card = head.card
        self.layer = card.layer
        self.precision = card.hyperparameters.get("state_precision", "fp16")
        self._filter = ((pc.field("model") == card.model) & (pc.field("layer") == card.layer)
                        & (pc.field("precision") == self.precision))
        self._states = states
        self._artifact, self._threads = artifact, threads
        self._encoder: Encoder | None = None
        self.cached = self.encoded = 0  # distinct documents scored from the cache / through the encoder

    def probabilities(self, keys: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        matrices = self._cached(keys)
        missing = [i for i, key in enumerate(keys) if key not in matrices]
        self.cached += len(set(keys) - {keys[i] for i in missing})
        if missing:
            self.encoded += len({keys[i] for i in missing})
            fresh = self._encode([texts[i] for i in missing])
            for i, matrix in zip(missing, fresh):
                matrices[keys[i]] = matrix
        documents = [matrices[key] for key in keys]
        order = np.argsort([len(doc) for doc in documents], kind="stable")  # similar lengths pad little
        out = np.empty((len(keys), len(self.head.classes)), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            states, mask = pad_states([documents[i] for i in rows])
            out[rows] = self.head.predict_proba(states, mask)
        return out

    def _cached(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found = self._states.to_table(columns=["doc_hash", "n_tokens", "dim", "precision", "states"],
                                      filter=self._filter & pc.field("doc_hash").isin(sorted(set(keys))))
        return {row["doc_hash"]: states_matrix(row).astype(np.float32) for row in found.to_pylist()}

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._encoder is None:
            self._encoder = Encoder.load(self._artifact, threads=self._threads)
        dtype = np.dtype(STATE_DTYPES[self.precision])
        encoded = self._encoder.encode_states(texts, layer=self.layer, dtype=dtype)
        return [np.asarray(states, dtype=np.float32) for states in encoded.states]


def scored_chunks(scorer: TopScorer, chunks: Iterator[tuple[dict[str, pa.Array], list[str], list[str]]]):
    """(key columns, probabilities) for (key columns, doc_hashes, texts) chunks."""
    for columns, keys, texts in chunks:
        yield columns, scorer.probabilities(keys, texts)


def predict_above_layer(warehouse, head: TopHead, *, corpus_file: Path | None, where: str | None, version: int | None,
                        output: Path, text_field: str, id_field: str, rejects_file: Path | None, on_error: str,
                        threads: int | None):
    """:func:`pipelines.prediction.predict` for a top/lora head: one pass, nothing written to the warehouse."""
    from .prediction import PredictResult, CorpusLines, write_predictions
    from .rejects import Rejects

    snapshot = warehouse.snapshot(version)
    artifact = warehouse.artifact_path(model_row(warehouse, head.card.model).artifact)
    scorer = TopScorer(head, states=warehouse.dataset(TOKEN_STATES, snapshot), artifact=artifact, threads=threads)
    rejects = None
    if corpus_file is not None:
        rejects = Rejects(corpus_file, rejects_file or output.with_name(output.name + ".rejects.jsonl"), on_error=on_error)
        lines = CorpusLines(corpus_file, text_field=text_field, id_field=id_field, rejects=rejects)
        chunks = (({"id": pa.array([r.id for r in records], pa.string()), "doc_hash": pa.array(keys, pa.string())},
                   keys, [r.text for r in records]) for records, keys in lines.chunks(first=True))
        with rejects:
            rows = write_predictions(scored_chunks(scorer, chunks), classes=head.classes, label=head.card.label,
                                      output=output)
    else:
        rows = write_predictions(scored_chunks(scorer, _stored_chunks(warehouse, snapshot, where)),
                                  classes=head.classes, label=head.card.label, output=output)
    return PredictResult(head=head.card.name, output=str(output), rows=rows, embedded=scorer.encoded,
                         reused=scorer.cached, rejected=rejects.count if rejects else 0,
                         rejects_file=str(rejects.path) if rejects is not None and rejects.count else None,
                         seconds=0.0, version=snapshot.version)


def _stored_chunks(warehouse, snapshot, where: str):
    """(corpus, id, doc_hash columns, doc_hashes, texts) of the stored documents matching ``where``, in chunks."""
    import duckdb

    from warehouse.errors import QueryError
    from warehouse.query import connect, sql_error_message
    from warehouse.selection import DocumentFilter

    condition, params = DocumentFilter(where=where).condition()
    con = connect(warehouse.datasets(snapshot))
    try:
        reader = con.sql(f"SELECT corpus, id, doc_hash, text FROM documents WHERE {condition} ORDER BY corpus, id",
                         params=params).to_arrow_reader(CHUNK)
        for batch in reader:
            keys = batch.column("doc_hash").to_pylist()
            yield ({name: batch.column(name) for name in ("corpus", "id", "doc_hash")}, keys,
                   batch.column("text").to_pylist())
    except duckdb.Error as error:
        raise QueryError(f"reading the documents to predict failed: {sql_error_message(error)}") from None
    finally:
        con.close()
