"""Typed rows of the catalog tables ``models`` and ``heads``.

The tables are what other readers (DuckDB, Polars, Spark) see; these rows are what ew's own
code passes around, so a column is named in one place and a typo is an AttributeError, not a
KeyError in the middle of a command.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime

import pyarrow as pa

from .tables import HEADS_SCHEMA, MODELS_SCHEMA


@dataclass(frozen=True)
class ModelRow:
    """One registered model: an exported encoder whose vectors the warehouse holds."""

    model: str                 # the model key, ``<slug>-<fingerprint[:12]>``
    name: str
    source: str
    fingerprint: str
    dim: int
    num_layers: int
    max_length: int
    pooling: str
    precision: str
    max_abs_diff: float | None
    artifact: str              # the artifact directory, relative to the warehouse root
    created_at: datetime
    vector_precision: str = "fp32"  # how its vectors are stored (``embedding`` or ``embedding_fp16``)

    @classmethod
    def from_dict(cls, row: dict) -> "ModelRow":
        values = {f.name: row.get(f.name) for f in fields(cls)}
        values["vector_precision"] = values["vector_precision"] or "fp32"  # rows older than the column
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([self.to_dict()], schema=MODELS_SCHEMA)


@dataclass(frozen=True)
class HeadRow:
    """One registered head; ``card`` is its whole card as JSON text (readable without ew)."""

    head: str
    model: str
    layer: int
    pooling: str
    label: str
    kind: str
    classes: tuple[str, ...]
    accuracy: float
    macro_f1: float
    train_rows: int
    val_rows: int
    test_rows: int
    trained_on_version: int
    artifact: str              # the head directory, relative to the warehouse root
    card: str
    created_at: datetime

    @classmethod
    def from_dict(cls, row: dict) -> "HeadRow":
        values = {f.name: row.get(f.name) for f in fields(cls)}
        values["classes"] = tuple(values["classes"] or ())
        return cls(**values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data

    def summary(self) -> dict:
        """The row without its card, JSON-ready (for `ew heads --json`)."""
        data = self.to_dict()
        del data["card"]
        data["created_at"] = self.created_at.isoformat()
        return data

    def card_dict(self) -> dict:
        return json.loads(self.card)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([self.to_dict()], schema=HEADS_SCHEMA)
