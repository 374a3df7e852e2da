"""The models a warehouse knows: resolve a name, export it once, find the registered ones.

Exporting needs torch (``ew[train]``); every later use loads the stored ONNX graph with
onnxruntime, so the ingest path never imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.compute as pc

from warehouse import Warehouse, Writer
from warehouse.catalog import ModelRow
from warehouse.errors import EwError
from warehouse.keys import slug
from warehouse.store import now_utc
from warehouse.tables import MODELS, VECTOR_PRECISIONS

from .artifacts import CARD_FILE, LayerAgreement, ModelCard, StatesCard, states_file
from .errors import ModelNotFoundError, UnknownModelKeyError
from .models import ALIASES, ModelSource, resolve_model
from .progress import announce
from .precision import PRECISION_GUARD, check_available, check_guard_value


@dataclass(frozen=True)
class PreparedModel:
    card: ModelCard
    artifact: Path            # the artifact directory (on an object store, its checked local copy)
    exported: bool            # exported by this call
    relative: str             # where the warehouse stores the artifact (a models row's ``artifact``)

    @property
    def key(self) -> str:
        return self.card.key


def _current_row(warehouse: Warehouse, key: str) -> ModelRow | None:
    table = warehouse.current_dataset(MODELS).to_table()
    matches = table.filter(pc.equal(table.column("model"), key)).to_pylist()
    return ModelRow.from_dict(matches[0]) if matches else None


def _registered(warehouse: Warehouse, row: ModelRow, pooling: str | None, max_length: int | None,
                precision: str | None = None, vector_precision: str | None = None) -> PreparedModel:
    """A registered model used as it is; asking it for other settings is an error, not a silent change."""
    for option, wanted in (("pooling", pooling), ("max_length", max_length), ("precision", precision),
                           ("vector_precision", vector_precision)):
        if wanted is not None and wanted != getattr(row, option):
            raise EwError(
                f"model {row.model} was exported with {option} {getattr(row, option)}, not {wanted}; "
                f"pass the model's name or directory (from `ew models`: {row.source}) to export it with these settings"
            )
    artifact = warehouse.artifact_path(row.artifact)
    return PreparedModel(card=ModelCard.load(artifact), artifact=artifact, exported=False, relative=row.artifact)


def prepare_model(
    writer: Writer,
    name: str,
    *,
    pooling: str | None = None,
    max_length: int | None = None,
    progress: bool | None = None,
    precision: str | None = None,
    precision_guard: float = PRECISION_GUARD,
    vector_precision: str | None = None,
) -> PreparedModel:
    """Make sure the model ``name`` is exported and registered in the warehouse (under the write lock).

    ``name`` is an alias, a Hugging Face id, a local directory, or the key of a registered model.
    ``pooling`` defaults to mean for a new model, and to the registered model's own; so does
    ``precision`` (fp32, bf16 or int8) and ``vector_precision`` (fp32; fp16 is another model key).
    ``precision_guard`` is the min cosine to fp32 a new int8/bf16 export must keep on every
    layer (see :mod:`pipelines.precision`). The one-time export says what it does on stderr
    unless ``progress`` is False.
    """
    warehouse = writer.warehouse
    check_guard_value(precision_guard)
    row = _current_row(warehouse, name)
    if row is not None and warehouse.artifact_path(row.artifact).is_dir():
        return _registered(warehouse, row, pooling, max_length, precision, vector_precision)
    try:
        source = resolve_model(name, pooling=pooling or "mean", max_length=max_length, precision=precision or "fp32",
                               vector_precision=vector_precision or "fp32")
    except ModelNotFoundError as not_found:
        # The weights are not installed here, but the warehouse may hold the model exported already.
        try:
            row = find_model(warehouse, name, pooling=pooling)
        except EwError:
            raise not_found from None
        if not warehouse.artifact_path(row.artifact).is_dir():
            raise not_found from None
        return _registered(warehouse, row, None, max_length, precision, vector_precision)
    relative = warehouse.model_artifact(source.key)
    artifact = warehouse.artifact_path(relative)
    row = _current_row(warehouse, source.key)
    if row is not None and artifact.is_dir():
        return PreparedModel(card=ModelCard.load(artifact), artifact=artifact, exported=False, relative=relative)

    if artifact.exists() and not (artifact / CARD_FILE).is_file():
        shutil.rmtree(artifact)  # a leftover of an interrupted export
    started = time.perf_counter()
    exported = not _copy_twin(warehouse, name, source, relative)
    if exported:
        from .export import export_model  # torch and transformers: only when a model is new here

        check_available(source.precision, model=source.name)  # refused before saying it exports
        announce(f"exporting {source.name} ({source.num_layers} layers, dim {source.dim}) to ONNX once for this "
                 "warehouse, checked against torch; later runs reuse it", enabled=progress)
        with warehouse.storage.new_artifact(relative) as build:
            export_model(source, build, precision_guard=precision_guard)
    artifact = warehouse.artifact_path(relative)
    card = ModelCard.load(artifact)
    if exported:
        announce(f"exported {card.key} in {time.perf_counter() - started:.1f}s", enabled=progress)
    if row is None:
        writer.register_model(card.row(artifact=relative, created_at=now_utc()))
        detail = {"model": card.key, "source": card.source, "max_abs_diff": card.max_abs_diff}
        if card.worst_agreement is not None:
            detail.update(precision=card.precision, min_cosine=card.worst_agreement.min_cosine)
        writer.commit("register-model", detail)
    return PreparedModel(card=card, artifact=artifact, exported=exported, relative=relative)


def _copy_twin(warehouse: Warehouse, name: str, source: ModelSource, relative: str) -> bool:
    """Build the artifact ``relative`` from a stored artifact of the same encoder that only stores its vectors at
    another precision (the same graph: hard links where the file system allows, the card re-keyed), without torch;
    whether there was one. Local warehouses only: on an object store the model is exported again."""
    if not warehouse.is_local:
        return False
    artifact = warehouse.artifact_path(relative)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    for precision in VECTOR_PRECISIONS:
        if precision == source.vector_precision:
            continue
        twin = warehouse.artifact_path(warehouse.model_artifact(
            resolve_model(name, pooling=source.pooling, max_length=source.max_length, precision=source.precision,
                          vector_precision=precision).key))
        if not (twin / CARD_FILE).is_file():
            continue
        build = Path(tempfile.mkdtemp(prefix=f".{artifact.name}.", suffix=".partial", dir=artifact.parent))
        try:
            shutil.copytree(twin, build, copy_function=_link_or_copy, dirs_exist_ok=True)
            card = ModelCard.load(build)
            # save() replaces model.json (a new file): the twin's own card is left alone.
            dataclasses.replace(card, key=source.key, fingerprint=source.fingerprint,
                                vector_precision=source.vector_precision).save(build)
            os.rename(build, artifact)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return True
    return False


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def prepare_states(writer: Writer, prepared: PreparedModel, *, layer: int, name: str,
                   progress: bool | None = None) -> PreparedModel:
    """``prepared`` with an artifact that holds the layer-``layer`` token-state graph (under the write lock).

    Exported on first need (torch, and the model's weights found from ``name``, the name the
    user gave, or the card's own name) and added to the stored artifact (on an object store:
    uploaded, then its new manifest); every later call only reads ``states.json``.
    """
    card = prepared.card
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= card.num_layers:
        raise EwError(f"--token-states: layer {layer!r} does not exist; this model has layers 0..{card.num_layers}")
    if card.precision != "fp32":
        # The states graph is exported in fp32: its pooled vectors would not match this model's.
        raise EwError(f"--token-states needs an fp32 model, and {card.key} is {card.precision}; "
                      "ingest with --precision fp32 to cache token states")
    states = StatesCard.load(prepared.artifact)
    if states is not None and layer in states.graphs and (prepared.artifact / states_file(layer)).is_file():
        return prepared
    from .states_export import export_states  # torch and transformers: only when a layer is cached the first time

    announce(f"exporting the layer-{layer} token-state graph of {card.key} once (later runs reuse it)", enabled=progress)
    source = _source_of(card, name, layer)
    with writer.warehouse.storage.extended_artifact(prepared.relative) as directory:
        export_states(source, directory, layer=layer)
    return replace(prepared, artifact=writer.warehouse.artifact_path(prepared.relative))


def _source_of(card: ModelCard, name: str, layer: int) -> ModelSource:
    """The weights ``card`` was exported from, found on this machine, or an error saying how to provide them."""
    tried = []
    for candidate in dict.fromkeys([name, card.name]):
        try:
            source = resolve_model(candidate, pooling=card.pooling, max_length=card.max_length, precision=card.precision,
                                   vector_precision=card.vector_precision)
        except ModelNotFoundError:
            tried.append(candidate)
            continue
        if source.key == card.key:
            return source
        tried.append(f"{candidate} (other weights: {source.key})")
    raise EwError(
        f"caching layer {layer} token states of {card.key} exports its states graph once, from the model's own "
        f"weights, which were not found (tried {', '.join(tried)}); pass --model with the model it was exported "
        f"from ({card.source})"
    )


def model_row(warehouse: Warehouse, key: str, *, version: int | None = None) -> ModelRow:
    """The ``models`` row of a registered model key, or UnknownModelKeyError listing the known ones."""
    rows = warehouse.models(version=version)
    for row in rows:
        if row.model == key:
            return row
    raise UnknownModelKeyError(key, [row.model for row in rows])


def open_model(warehouse: Warehouse, key: str) -> PreparedModel:
    """The artifact of a registered model key, its card read and checked."""
    relative = model_row(warehouse, key).artifact
    artifact = warehouse.artifact_path(relative)
    return PreparedModel(card=ModelCard.load(artifact), artifact=artifact, exported=False, relative=relative)


@dataclass(frozen=True)
class ModelListing:
    """A registered model and its card (None where the artifact cannot be read: `ew verify` reports that)."""

    row: ModelRow
    card: ModelCard | None

    @property
    def worst(self) -> LayerAgreement | None:
        """int8/bf16: the layer furthest from fp32, as measured at export."""
        return self.card.worst_agreement if self.card is not None else None

    def to_dict(self) -> dict:
        card = self.card.to_dict() if self.card is not None else {}
        return {**self.row.to_dict(), "agreement": card.get("agreement", []), "precision_guard": card.get("precision_guard")}


def list_models(warehouse: Warehouse, *, version: int | None = None) -> list[ModelListing]:
    """The registered models (``ew models``), each with its card, which holds the measured agreement."""
    listings = []
    for row in warehouse.models(version=version):
        try:
            card = ModelCard.load(warehouse.artifact_path(row.artifact))
        except EwError:
            card = None
        listings.append(ModelListing(row=row, card=card))
    return listings


def find_model(warehouse: Warehouse, name: str | None, *, pooling: str | None = None) -> ModelRow:
    """The registered model ``name`` refers to: its key, a unique key prefix, or an alias; the only one when None.

    ``pooling`` narrows the choice to models exported with that pooling.
    """
    every = warehouse.models()
    rows = [row for row in every if pooling is None or row.pooling == pooling]
    if not rows:
        if every and pooling is not None:
            registered = ", ".join(f"{row.model} ({row.pooling})" for row in every)
            raise EwError(
                f"no model with {pooling} pooling in this warehouse (registered: {registered}); "
                f"ingest with --pooling {pooling} first"
            )
        raise UnknownModelKeyError(name or "", [])
    if name is None:
        if len(rows) == 1:
            return rows[0]
        raise EwError(
            f"the warehouse holds {len(rows)} models ({', '.join(r.model for r in rows)}); choose one with --model"
        )
    prefixes = [name]
    if name in ALIASES:
        prefixes.append(slug(ALIASES[name].hf_id))
    for prefix in prefixes:
        exact = [row for row in rows if row.model == prefix]
        if exact:
            return exact[0]
        matches = [row for row in rows if row.model.startswith(prefix + "-") or row.name == prefix]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise EwError(f"{name!r} matches several models ({', '.join(r.model for r in matches)}); pass a full key")
    raise UnknownModelKeyError(name, [row.model for row in rows])
