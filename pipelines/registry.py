"""The models a warehouse knows: resolve a name, export it once, find the registered ones.

Exporting needs torch (``ew[train]``); every later use loads the stored ONNX graph with
onnxruntime, so the ingest path never imports torch or transformers.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from warehouse import Warehouse, Writer
from warehouse.errors import EwError, ModelNotFoundError, UnknownModelKeyError
from warehouse.keys import slug
from warehouse.store import now_utc
from warehouse.tables import MODELS

from .models import ALIASES, resolve_model


@dataclass(frozen=True)
class PreparedModel:
    key: str
    artifact: Path
    exported: bool            # exported by this call
    max_abs_diff: float | None


def registered_models(warehouse: Warehouse, *, version: int | None = None) -> list[dict]:
    """Rows of the ``models`` table at ``version`` (default latest), oldest first."""
    snapshot = warehouse.snapshot(version)
    rows = warehouse.dataset(MODELS, snapshot).to_table().to_pylist()
    return sorted(rows, key=lambda row: row["created_at"])


def _current_row(warehouse: Warehouse, key: str) -> dict | None:
    table = warehouse.current_dataset(MODELS).to_table()
    matches = table.filter(pc.equal(table.column("model"), key)).to_pylist()
    return matches[0] if matches else None


def _registered(warehouse: Warehouse, row: dict, pooling: str | None, max_length: int | None) -> PreparedModel:
    """A registered model used as it is; asking it for other settings is an error, not a silent change."""
    for option, wanted in (("pooling", pooling), ("max_length", max_length)):
        if wanted is not None and wanted != row[option]:
            raise EwError(
                f"model {row['model']} was exported with {option} {row[option]}, not {wanted}; "
                f"pass the model's name or directory (from `ew models`: {row['source']}) to export it with these settings"
            )
    return PreparedModel(key=row["model"], artifact=warehouse.root / row["artifact"], exported=False,
                         max_abs_diff=row["max_abs_diff"])


def prepare_model(
    writer: Writer,
    name: str,
    *,
    pooling: str | None = None,
    max_length: int | None = None,
) -> PreparedModel:
    """Make sure the model ``name`` is exported and registered in the warehouse (under the write lock).

    ``name`` is an alias, a Hugging Face id, a local directory, or the key of a registered model.
    ``pooling`` defaults to mean for a new model, and to the registered model's own.
    """
    warehouse = writer.warehouse
    row = _current_row(warehouse, name)
    if row is not None and (warehouse.root / row["artifact"]).is_dir():
        return _registered(warehouse, row, pooling, max_length)
    try:
        source = resolve_model(name, pooling=pooling or "mean", max_length=max_length)
    except ModelNotFoundError as not_found:
        # The weights are not installed here, but the warehouse may hold the model exported already.
        try:
            row = find_model(warehouse, name, pooling=pooling)
        except EwError:
            raise not_found from None
        if not (warehouse.root / row["artifact"]).is_dir():
            raise not_found from None
        return _registered(warehouse, row, None, max_length)
    artifact = warehouse.model_dir(source.key)
    row = _current_row(warehouse, source.key)
    if row is not None and artifact.is_dir():
        return PreparedModel(key=source.key, artifact=artifact, exported=False, max_abs_diff=row["max_abs_diff"])

    from .export import export_model  # torch and transformers: only when a model is new here

    if artifact.exists() and not (artifact / "model.json").is_file():
        shutil.rmtree(artifact)  # a leftover of an interrupted export
    artifact.parent.mkdir(parents=True, exist_ok=True)
    report = export_model(source, artifact)
    if row is None:
        writer.register_model(
            {
                "model": source.key,
                "name": source.name,
                "source": source.source,
                "fingerprint": source.fingerprint,
                "dim": source.dim,
                "num_layers": source.num_layers,
                "max_length": source.max_length,
                "pooling": source.pooling,
                "precision": source.precision,
                "max_abs_diff": report.max_abs_diff,
                "artifact": str(artifact.relative_to(warehouse.root)),
                "created_at": now_utc(),
            }
        )
        writer.commit("register-model", {"model": source.key, "source": source.source, "max_abs_diff": report.max_abs_diff})
    return PreparedModel(key=source.key, artifact=artifact, exported=True, max_abs_diff=report.max_abs_diff)


def model_row(warehouse: Warehouse, key: str, *, version: int | None = None) -> dict:
    """The ``models`` row of a registered model key, or UnknownModelKeyError listing the known ones."""
    rows = registered_models(warehouse, version=version)
    for row in rows:
        if row["model"] == key:
            return row
    raise UnknownModelKeyError(key, [row["model"] for row in rows])


def find_model(warehouse: Warehouse, name: str | None, *, pooling: str | None = None) -> dict:
    """The registered model ``name`` refers to: its key, a unique key prefix, or an alias; the only one when None.

    ``pooling`` narrows the choice to models exported with that pooling.
    """
    every = registered_models(warehouse)
    rows = [row for row in every if pooling is None or row["pooling"] == pooling]
    if not rows:
        if every and pooling is not None:
            registered = ", ".join(f"{row['model']} ({row['pooling']})" for row in every)
            raise EwError(
                f"no model with {pooling} pooling in this warehouse (registered: {registered}); "
                f"ingest with --pooling {pooling} first"
            )
        raise UnknownModelKeyError(name or "", [])
    if name is None:
        if len(rows) == 1:
            return rows[0]
        raise EwError(
            f"the warehouse holds {len(rows)} models ({', '.join(r['model'] for r in rows)}); choose one with --model"
        )
    prefixes = [name]
    if name in ALIASES:
        prefixes.append(slug(ALIASES[name].hf_id))
    for prefix in prefixes:
        exact = [row for row in rows if row["model"] == prefix]
        if exact:
            return exact[0]
        matches = [row for row in rows if row["model"].startswith(prefix + "-") or row["name"] == prefix]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise EwError(f"{name!r} matches several models ({', '.join(r['model'] for r in matches)}); pass a full key")
    raise UnknownModelKeyError(name, [row["model"] for row in rows])
