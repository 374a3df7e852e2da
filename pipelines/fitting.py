"""`ew fit-head`: train a tiny classifier head on stored embeddings.

    result = fit_head("ew-warehouse", label="section")
    result.accuracy, result.head

DuckDB assembles the splits (a document's split is a function of its doc_hash and the split
seed) and streams them as batches; labelled documents that lack vectors are embedded first
through the ingest path, every stored vector is reused. The head is stored as safetensors plus
a JSON card inside the warehouse, with a PNG report, and registered in the ``heads`` table.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from warehouse import Warehouse
from warehouse.errors import EwError
from warehouse.selection import INTERNAL_MEMORY_LIMIT, DocumentFilter
from warehouse.splits import LabelledVectors, SplitSpec, SplitStats
from warehouse.store import now_utc

from .embedding import ensure_vectors
from .errors import HeadError, MissingDependencyError
from .head_catalog import check_head_name, check_name_free, default_head_name, store_head
from .head_card import HeadCard
from .layer_choice import LAYER_SCORE, LayerScore
from .progress import Progress, reporting_epochs
from .registry import find_model
from .training import torch_threads
from .tuning import StatesPlan, Trained, train_on_states

REPORT_FILE = "report.png"

EVAL_BATCH = 1024
DEFAULT_EPOCHS = 30
DEFAULT_TUNE_EPOCHS = 3
DEFAULT_BATCH = 64
# On pooled vectors 1e-3 left small corpora under-trained (30 epochs of 13 steps at 1,000 documents:
# up to 1.9 points of accuracy below LogisticRegression at 5 of 7 layers); 1e-2 with patience 10 was not
# below it at any layer of 1,000-10,000 documents (bench/fit_head.py, 5 split seeds). Layers above K
# keep 1e-3: they are pretrained (and have their own rate, tuning.LAYER_LR).
DEFAULT_LR = 1e-2
DEFAULT_TUNE_LR = 1e-3
DEFAULT_TUNE_BATCH = 16
# On pooled vectors: an mlp and a linear head, probabilities averaged (bench/fit_head.py: the only
# kind measured not below LogisticRegression on both accuracy and macro-F1 at every layer)
DEFAULT_KIND = "ensemble"


@dataclass(frozen=True)
class FitResult:
    head: str
    path: str
    report: str
    model: str
    layer: int
    pooling: str
    label: str
    kind: str
    classes: tuple[str, ...]
    accuracy: float
    macro_f1: float
    train: int
    val: int
    test: int
    missing_label: int
    no_vector: int                 # labelled texts left out: no vector (or states) at this version (only with --version)
    rare_classes: tuple[str, ...]  # too few examples to appear in every split
    reused: int                    # distinct labelled texts whose vectors (or states) were stored already
    embedded: int                  # distinct labelled texts embedded (or whose states were cached) first by this run
    epochs: int
    best_epoch: int
    train_seconds: float
    seconds: float
    version: int                   # the warehouse version the head was trained on
    metrics: dict
    tune: str = "head"             # "head": on pooled vectors; "top" / "lora": layers above from_layer too
    from_layer: int | None = None  # K, for top / lora
    trainable_parameters: int = 0
    layer_scores: dict = field(default_factory=dict)  # --layer auto / --from-layer auto: each layer's scores

    @classmethod
    def of(cls, card: HeadCard, *, path: Path | str, report: Path | str, reused: int, embedded: int, seconds: float,
           layer_scores: dict | None = None) -> "FitResult":
        """The result of a run that stored ``card``: the card's facts plus what the run itself did."""
        return cls(
            head=card.name, path=str(path), report=str(report), model=card.model, layer=card.layer,
            pooling=card.pooling, label=card.label, kind=card.config.kind, classes=card.classes,
            accuracy=card.accuracy, macro_f1=card.macro_f1, train=card.rows["train"], val=card.rows["val"],
            test=card.rows["test"], missing_label=card.missing_label, no_vector=card.no_vector,
            rare_classes=card.rare_classes, reused=reused, embedded=embedded, epochs=len(card.history),
            best_epoch=card.best_epoch, train_seconds=card.train_seconds, seconds=round(seconds, 3),
            version=card.trained_on_version, metrics=card.metrics, tune=card.tune, from_layer=card.from_layer,
            trainable_parameters=card.parameters, layer_scores=dict(layer_scores or {}),
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["rare_classes"] = list(self.rare_classes)
        return data


def fit_head(
    warehouse: Warehouse | str | Path,
    *,
    label: str,
    model: str | None = None,
    layer: int | str | None = None,
    pooling: str | None = None,
    corpus: str | None = None,
    where: str | None = None,
    kind: str | None = None,
    hidden: int = 64,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 1e-5,
    patience: int = 10,
    standardize: bool = True,
    class_weight: str = "none",
    select: str = "macro_f1",
    seed: int = 0,
    split: str = "80,10,10",
    name: str | None = None,
    threads: int | None = None,
    memory_limit: str = INTERNAL_MEMORY_LIMIT,
    version: int | None = None,
    from_layer: int | str | None = None,
    tune: str = "top",
    lora_rank: int = 4,
    state_precision: str = "fp16",
    progress: bool | None = None,
) -> FitResult:
    """Train a head predicting ``label`` from the stored vectors of one model and layer.

    With ``version``, trains on that pinned warehouse version and embeds nothing; by default
    it reads the latest version after embedding the labelled documents that lack vectors.
    (Long only by its options: the training is in _train_on_vectors and tuning.train_on_states.)
    With ``from_layer`` (K, or "auto"), trains the encoder layers above K (``tune`` "top", or
    "lora" adapters of rank ``lora_rank``) and the head on the cached layer-K token states
    instead: see :mod:`pipelines.tuning`. ``layer="auto"`` scores every stored layer with a
    linear probe cross-validated over train + val and trains the head on the best
    (:mod:`pipelines.layer_choice`). The epochs are shown on stderr (:mod:`pipelines.progress`)
    unless ``progress`` is False.

    The defaults (inputs standardized, lr 1e-2, the epoch kept by validation macro-F1, no class weights)
    were measured against scikit-learn's LogisticRegression: see ``python -m bench.fit_head``.
    """
    started = time.perf_counter()
    from .heads import require_torch
    from .report import write_report
    from .training import TrainConfig

    # Fail before anything is embedded or written when the training extra is missing.
    require_torch()
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("matplotlib", "train", "writing the PNG report of a head")
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse)
    spec = SplitSpec.parse(split, seed=seed)
    row = find_model(warehouse, model, pooling=pooling)
    layer = row.num_layers if layer is None else layer
    if layer != "auto" and not 0 <= layer <= row.num_layers:
        raise EwError(f"--layer {layer} does not exist; model {row.model} has layers 0..{row.num_layers}")
    name = check_head_name(name or default_head_name(label))
    check_name_free(warehouse, name)
    # Above layer K an epoch is real encoder work and a few epochs suffice; a plain head is cheap.
    epochs = epochs or (DEFAULT_EPOCHS if from_layer is None else DEFAULT_TUNE_EPOCHS)
    # Measured on 2,000 Debian texts: batch 64 gives the layers above K too few steps to move
    # (0.14 test accuracy after 3 epochs), batch 16 four times as many (0.65, head-only 0.56).
    batch_size = batch_size or (DEFAULT_BATCH if from_layer is None else DEFAULT_TUNE_BATCH)
    kind = kind or (DEFAULT_KIND if from_layer is None else "mlp")
    lr = lr or (DEFAULT_LR if from_layer is None else DEFAULT_TUNE_LR)
    config = TrainConfig(kind=kind, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, patience=patience, select=select,
                         class_weight=class_weight, standardize=standardize)

    documents = DocumentFilter(label=label, corpus=corpus, where=where)
    with reporting_epochs(Progress(f"fit-head {name}", unit="epochs", enabled=progress)):
        if from_layer is None:
            def train(layer: int) -> Trained:
                return _train_on_vectors(warehouse, row=row, name=name, layer=layer, documents=documents, spec=spec,
                                         config=config, threads=threads, memory_limit=memory_limit, version=version)

            trained = train(layer) if layer != "auto" else _train_on_best_layer(
                warehouse, row, train, documents=documents, spec=spec, threads=threads, memory_limit=memory_limit,
                version=version)
        else:
            plan = StatesPlan(from_layer=from_layer, tune=tune, lora_rank=lora_rank, precision=state_precision)
            trained = train_on_states(warehouse, row=row, name=name, documents=documents, spec=spec, config=config,
                                      plan=plan, check=_check_splits, threads=threads, memory_limit=memory_limit,
                                      version=version)
    what = f"layer {trained.card.layer}" if trained.card.tune == "head" else f"{trained.card.tune} above layer {trained.card.layer}"

    def write(directory: Path, card: HeadCard) -> HeadCard:
        """The head's files, and its report beside them: stored (and uploaded) together."""
        card = trained.write(directory, card)
        write_report(directory / REPORT_FILE, history=trained.history, metrics=trained.metrics,
                     best_epoch=card.best_epoch, title=f"{name}: {label} from {row.model} {what}")
        return card

    card, directory = store_head(warehouse, replace(trained.card, created_at=now_utc().isoformat()), write)
    report = f"{directory}/{REPORT_FILE}"
    return FitResult.of(card, path=directory, report=report, reused=trained.documents - trained.embedded,
                        embedded=trained.embedded, seconds=time.perf_counter() - started,
                        layer_scores=trained.layer_scores)


def _train_on_vectors(warehouse: Warehouse, *, row, name: str, layer: int, documents: DocumentFilter,
                      spec: SplitSpec, config, threads: int | None, memory_limit: str, version: int | None) -> Trained:
    """A plain head on the stored pooled vectors of ``layer`` (embedding the labelled texts that lack one first)."""
    from .heads import save_head

    embedded = 0
    if version is None:
        embedded = ensure_vectors(warehouse, documents, model_key=row.model, layer=layer, pooling=row.pooling,
                                  threads=threads, operation="embed-for-head")
    # A head is a few thousand weights: one thread trains it fastest and leaves the other cores
    # to DuckDB streaming the next batches (more threads only spin against each other).
    with torch_threads(1), LabelledVectors(warehouse, model=row.model, layer=layer, pooling=row.pooling,
                                              documents=documents, spec=spec, memory_limit=memory_limit,
                                              threads=threads, version=version) as data:
        stats = data.assemble()
        _check_splits(stats, documents.label)
        trained, metrics, train_seconds = _train_and_test(data, stats, config)
    # DuckDB's copy of the vectors is closed, and its memory handed back, before the report is drawn.
    card = HeadCard(
        name=name, config=trained.config, classes=stats.classes, model=row.model, layer=layer, pooling=row.pooling,
        label=documents.label, trained_on_version=stats.version, model_source=row.source, corpus=documents.corpus,
        where=documents.where, split=spec.to_card(),
        rows=dict(stats.counts), missing_label=stats.missing_label, no_vector=stats.no_vector,
        rare_classes=stats.rare_classes,
        hyperparameters={**asdict(config), **({"members": trained.members} if trained.members else {})},
        history=tuple(asdict(epoch) for epoch in trained.history), best_epoch=trained.best_epoch,
        metrics=metrics.to_dict(), train_seconds=round(train_seconds, 3),
    )
    return Trained(card=card, write=lambda directory, c: save_head(directory, trained.module, c),
                    history=trained.history, metrics=metrics, documents=stats.documents, embedded=embedded)


def _train_on_best_layer(warehouse: Warehouse, row, train: Callable[[int], Trained], *, documents: DocumentFilter,
                         spec: SplitSpec, threads: int | None, memory_limit: str, version: int | None) -> Trained:
    """--layer auto: every stored layer scored by a cross-validated linear probe on train + val
    (:mod:`pipelines.layer_choice`), then one head trained on the best; every layer's scores go on its card."""
    from .layer_choice import choose_layer, probe_layer, stored_layers

    embedded = 0

    def score(layer: int) -> LayerScore:
        nonlocal embedded
        if version is None:  # as a fixed --layer does: labelled texts without this layer's vector are embedded first
            embedded += ensure_vectors(warehouse, documents, model_key=row.model, layer=layer, pooling=row.pooling,
                                       threads=threads, operation="embed-for-head")
        with LabelledVectors(warehouse, model=row.model, layer=layer, pooling=row.pooling, documents=documents,
                             spec=spec, memory_limit=memory_limit, threads=threads, version=version) as data:
            stats = data.assemble()
            _check_splits(stats, documents.label)
            # The test split is left out: it scores the chosen head alone, as for a fixed layer.
            return probe_layer(lambda: itertools.chain(data.batches("train", batch_size=EVAL_BATCH),
                                                       data.batches("val", batch_size=EVAL_BATCH)),
                               num_classes=len(stats.classes), layer=layer)

    layers = stored_layers(warehouse, model=row.model, pooling=row.pooling, version=version)
    layer, scores = choose_layer(layers, score=score)
    trained = train(layer)
    layer_scores = {layer: {"val_accuracy": round(s.val_accuracy, 4), "val_macro_f1": round(s.val_macro_f1, 4)}
                    for layer, s in scores.items()}
    hyperparameters = {**trained.card.hyperparameters, "layer": "auto", "layer_score": LAYER_SCORE,
                       "layer_scores": {str(layer): s for layer, s in layer_scores.items()}}
    return replace(trained, card=replace(trained.card, hyperparameters=hyperparameters), layer_scores=layer_scores,
                   embedded=trained.embedded + embedded)


def _train_and_test(data: LabelledVectors, stats: SplitStats, config):
    """(trained head, test metrics, training seconds): train on train, stop early on val, score test."""
    from .metrics import classification_metrics
    from .training import input_moments, predict_batches, train_head

    started = time.perf_counter()
    moments = None
    if config.standardize or config.class_weight == "balanced":
        moments = input_moments(data.batches("train", batch_size=EVAL_BATCH), num_classes=len(stats.classes))
    trained = train_head(
        train_batches=lambda epoch: data.batches("train", batch_size=config.batch_size, epoch=epoch),
        val_batches=lambda: data.batches("val", batch_size=EVAL_BATCH),
        steps_per_epoch=math.ceil(stats.counts["train"] / config.batch_size),
        input_dim=stats.dim,
        num_classes=len(stats.classes),
        config=config,
        moments=moments,
    )
    seconds = time.perf_counter() - started
    y_true, y_pred = predict_batches(trained.module, data.batches("test", batch_size=EVAL_BATCH))
    return trained, classification_metrics(y_true, y_pred, classes=stats.classes), seconds


def _check_splits(data: SplitStats, label: str) -> None:
    total = sum(data.counts.values())
    if total == 0:
        raise HeadError(
            f"no document has both a {label!r} label and a vector of this model/layer; "
            "check --label, --corpus and --where, or ingest labelled documents first"
        )
    for split, count in data.counts.items():
        if count == 0:
            raise HeadError(
                f"the {split} split is empty ({total} labelled documents in all: {data.counts}); "
                "ingest more labelled documents or change --split"
            )
    if len(data.classes) < 2:
        raise HeadError(f"label {label!r} has a single class ({data.classes[0]!r}); a head needs at least two")
