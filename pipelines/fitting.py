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
import json
import math
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from warehouse import Warehouse
from warehouse.errors import EwError, HeadError, MissingDependencyError
from warehouse.splits import INTERNAL_MEMORY_LIMIT, DocumentFilter, LabelledVectors, SplitSpec
from warehouse.store import now_utc
from warehouse.tables import HEADS

from .ingest import ensure_vectors
from .registry import find_model

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
EVAL_BATCH = 1024


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
    no_vector: int                 # labelled texts left out: no vector at this version (only with --version)
    rare_classes: tuple[str, ...]  # too few examples to appear in every split
    reused: int                    # distinct labelled texts whose vectors were stored already
    embedded: int                  # distinct labelled texts embedded first by this run
    epochs: int
    best_epoch: int
    train_seconds: float
    seconds: float
    version: int                   # the warehouse version the head was trained on
    metrics: dict

    def to_dict(self) -> dict:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["rare_classes"] = list(self.rare_classes)
        return data


def check_head_name(name: str) -> str:
    if not NAME.match(name):
        raise HeadError(f"head name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def fit_head(
    warehouse: Warehouse | str | Path,
    *,
    label: str,
    model: str | None = None,
    layer: int | None = None,
    pooling: str | None = None,
    corpus: str | None = None,
    where: str | None = None,
    kind: str = "mlp",
    hidden: int = 64,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    patience: int = 3,
    seed: int = 0,
    split: str = "80,10,10",
    name: str | None = None,
    threads: int | None = None,
    memory_limit: str = INTERNAL_MEMORY_LIMIT,
    version: int | None = None,
) -> FitResult:
    """Train a head predicting ``label`` from the stored vectors of one model and layer.

    With ``version``, trains on that pinned warehouse version and embeds nothing; by default
    it reads the latest version after embedding the labelled documents that lack vectors.
    """
    started = time.perf_counter()
    from .heads import require_torch, save_head
    from .metrics import classification_metrics
    from .report import write_report
    from .training import TrainConfig, predict_batches, train_head

    # Fail before anything is embedded or written when the training extra is missing.
    require_torch()
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("matplotlib", "train", "writing the PNG report of a head")
    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse.open(warehouse)
    spec = SplitSpec.parse(split, seed=seed)
    row = find_model(warehouse, model, pooling=pooling)
    key, pooling = row["model"], row["pooling"]
    layer = row["num_layers"] if layer is None else layer
    if not 0 <= layer <= row["num_layers"]:
        raise EwError(f"--layer {layer} does not exist; model {key} has layers 0..{row['num_layers']}")
    name = check_head_name(name or f"{label}-{now_utc():%Y%m%d-%H%M%S}")
    directory = warehouse.head_dir(name)
    if directory.exists():
        raise HeadError(f"a head named {name!r} already exists; pick another --name")
    config = TrainConfig(kind=kind, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, patience=patience)

    documents = DocumentFilter(label=label, corpus=corpus, where=where)
    embedded = 0
    if version is None:
        embedded = ensure_vectors(warehouse, documents, model_key=key, layer=layer, pooling=pooling,
                                  threads=threads, operation="embed-for-head")

    with _one_torch_thread(), LabelledVectors(warehouse, model=key, layer=layer, pooling=pooling, label=label, spec=spec,
                         corpus=corpus, where=where, memory_limit=memory_limit, threads=threads,
                         version=version) as data:
        _check_splits(data, label)
        train_started = time.perf_counter()
        trained = train_head(
            train_batches=lambda epoch: data.batches("train", batch_size=batch_size, epoch=epoch),
            val_batches=lambda: data.batches("val", batch_size=EVAL_BATCH),
            steps_per_epoch=math.ceil(data.counts["train"] / batch_size),
            input_dim=data.dim,
            num_classes=len(data.classes),
            config=config,
        )
        train_seconds = time.perf_counter() - train_started
        y_true, y_pred = predict_batches(trained.module, data.batches("test", batch_size=EVAL_BATCH))
        metrics = classification_metrics(y_true, y_pred, classes=data.classes)
    # DuckDB's copy of the vectors is closed, and its memory handed back, before the report is drawn.
    reused = data.documents - embedded
    card = {
        "name": name,
        "model": key,
        "model_source": row["source"],
        "layer": layer,
        "pooling": pooling,
        "label": label,
        "classes": data.classes,
        "corpus": corpus,
        "where": where,
        "split": {"train": spec.train, "val": spec.val, "test": spec.test, "seed": spec.seed,
                  "rule": "int(sha256(f'{seed}:{doc_hash}')[:8], 16) % 10000"},
        "rows": dict(data.counts),
        "missing_label": data.missing_label,
        "no_vector": data.no_embedding,
        "rare_classes": data.rare_classes,
        "trained_on_version": data.version,
        "hyperparameters": asdict(config),
        "history": [asdict(epoch) for epoch in trained.history],
        "best_epoch": trained.best_epoch,
        "metrics": metrics.to_dict(),
        "train_seconds": round(train_seconds, 3),
        "created_at": now_utc().isoformat(),
    }
    with warehouse.writer() as writer:
        try:
            save_head(directory, trained.module, config=trained.config, card=card)
            report = write_report(directory / "report.png", history=trained.history, metrics=metrics,
                                  title=f"{name}: {label} from {key} layer {layer}")
            writer.add_head(
                {
                    "head": name, "model": key, "layer": layer, "pooling": pooling, "label": label, "kind": kind,
                    "classes": data.classes, "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1,
                    "train_rows": data.counts["train"], "val_rows": data.counts["val"],
                    "test_rows": data.counts["test"], "trained_on_version": data.version,
                    "artifact": str(directory.relative_to(warehouse.root)),
                    "card": json.dumps(card, sort_keys=True), "created_at": now_utc(),
                }
            )
            writer.commit("fit-head", {"head": name, "label": label, "model": key, "layer": layer})
        except BaseException:
            # A head is stored whole or not at all: no unregistered folder holds its name.
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return FitResult(
        head=name, path=str(directory), report=str(report), model=key, layer=layer, pooling=pooling, label=label,
        kind=kind, classes=tuple(data.classes), accuracy=metrics.accuracy, macro_f1=metrics.macro_f1,
        train=data.counts["train"], val=data.counts["val"], test=data.counts["test"],
        missing_label=data.missing_label, no_vector=data.no_embedding, rare_classes=tuple(data.rare_classes), reused=reused, embedded=embedded,
        epochs=len(trained.history), best_epoch=trained.best_epoch, train_seconds=round(train_seconds, 3),
        seconds=round(time.perf_counter() - started, 3), version=data.version, metrics=metrics.to_dict(),
    )


@contextmanager
def _one_torch_thread():
    """A head is a few thousand weights: one thread trains it fastest and leaves the other cores
    to DuckDB streaming the next batches (more threads only spin against each other)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_splits(data: LabelledVectors, label: str) -> None:
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


def list_heads(warehouse: Warehouse, *, version: int | None = None) -> list[dict]:
    """Rows of the ``heads`` table, oldest first."""
    rows = warehouse.dataset(HEADS, warehouse.snapshot(version)).to_table().to_pylist()
    return sorted(rows, key=lambda row: row["created_at"])
