"""`ew fit-head --from-layer K --tune top|lora`: train the encoder layers above K and a head on
the cached layer-K token states (embedding recycling).

The layers K+1..N start from the model's own weights (the artifact's ``torch/`` copy, made
when its states were first cached); ``top`` trains them all, ``lora`` freezes them and trains
rank-R adapters on the attention query and value projections. Either way the head on top is
trained too, on the same splits as a plain head, with the same early stopping, metrics and
report. Labelled documents whose states are not cached yet are encoded first (up to layer K)
and cached, as fit-head embeds missing vectors. The states are streamed from the table in
length-bucketed batches (:class:`warehouse.states.LabelledStates`), never held whole.

Choosing K: a lower K trains more layers (slower per epoch, usually more accurate); a higher
K is cheaper. ``--from-layer auto`` trains one epoch above every cached layer and keeps the
layer with the best validation accuracy.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from warehouse import Warehouse
from warehouse.catalog import ModelRow
from warehouse.errors import EwError
from warehouse.selection import DocumentFilter
from warehouse.query import usable_cores
from warehouse.splits import SplitSpec
from warehouse.states import LabelledStates
from warehouse.tables import TOKEN_STATES

from .artifacts import TORCH_DIR
from .embedding import ensure_states
from .head_card import HeadCard
from .metrics import Metrics
from .memory import bound_heap
from .training import TrainConfig, torch_threads

TUNES = ("top", "lora")
EVAL_BATCH = 64
# The transformer layers above K are fine-tuned at this peak rate (the head and LoRA adapters
# take --lr): pretrained layers move far less than a freshly initialised head. Measured on
# 10,000 Debian texts (MiniLM, K = 4, 3 epochs, batch 16; test accuracy): 5e-5 0.769,
# 1e-4 0.780, 2e-4 0.782, against 0.791 for full fine-tuning at 1e-4 and 0.665 head-only.
# Head-first (LP-FT) initialisation and warm-up measured no better.
LAYER_LR = 1e-4


@dataclass(frozen=True)
class StatesPlan:
    """What to train on: which cached layer, and how."""

    from_layer: int | str        # K, or "auto"
    tune: str = "top"            # "top" | "lora"
    lora_rank: int = 4
    precision: str = "fp16"      # of the cached states to read
    layer_lr: float = LAYER_LR

    def __post_init__(self) -> None:
        if self.tune not in TUNES:
            raise EwError(f"--tune must be one of {', '.join(TUNES)}, not {self.tune!r}")
        if self.from_layer != "auto" and (isinstance(self.from_layer, bool) or not isinstance(self.from_layer, int)):
            raise EwError(f"--from-layer must be a layer number or 'auto', not {self.from_layer!r}")


@dataclass(frozen=True)
class Trained:
    """A trained head, not stored yet: what fit-head registers and reports, whatever it trained on."""

    card: HeadCard                               # complete but for the digests writing adds
    write: Callable[[Path, HeadCard], HeadCard]  # stores the weights and the card in a directory
    history: tuple
    metrics: Metrics
    documents: int                               # distinct labelled texts trained and tested on
    embedded: int                                # distinct texts embedded (states cached) first by this run
    layer_scores: dict = field(default_factory=dict)  # --from-layer auto: one-epoch validation accuracy per layer


def train_on_states(
    warehouse: Warehouse,
    *,
    row: ModelRow,
    name: str,
    documents: DocumentFilter,
    spec: SplitSpec,
    config: TrainConfig,
    plan: StatesPlan,
    check: Callable,
    threads: int | None,
    memory_limit: str,
    version: int | None,
) -> Trained:
    """Train above the planned layer (choosing it first with ``auto``); ``check(stats, label)`` vets the splits."""
    weights_dir = warehouse.artifact_path(row.artifact) / TORCH_DIR
    bound_heap()  # batches of every length: without it freed activations stay with the process

    def run(layer: int, config: TrainConfig):
        """(trained top, test metrics, training seconds, split stats) above ``layer``."""
        # The layers above K are real matrix work: every usable core helps (unlike a tiny head).
        with torch_threads(threads or usable_cores()), LabelledStates(
            warehouse, model=row.model, layer=layer, precision=plan.precision, documents=documents, spec=spec,
            version=version, memory_limit=memory_limit, threads=threads,
        ) as data:
            stats = data.assemble()
            check(stats, documents.label)
            return (*_train_and_test(data, stats, weights_dir=weights_dir, layer=layer, pooling=row.pooling,
                                     config=config, plan=plan), stats)

    layer_scores: dict[int, float] = {}
    layer = plan.from_layer
    if layer == "auto":
        layer, layer_scores = _choose_layer(warehouse, row=row, plan=plan, version=version,
                                            one_epoch=lambda k: run(k, replace(config, epochs=1, patience=0))[0])
    if not 0 <= layer <= row.num_layers:
        raise EwError(f"--from-layer {layer} does not exist; model {row.model} has layers 0..{row.num_layers}")
    embedded = 0
    if version is None:
        embedded = ensure_states(warehouse, documents, model_key=row.model, layer=layer, precision=plan.precision,
                                 threads=threads, operation="embed-for-head")
    if not weights_dir.is_dir():
        raise EwError(f"training above layer {layer} needs the weights of {row.model} in {weights_dir}, which the "
                      f"first `ew ingest FILE --model {row.model} --token-states {layer}` copies there")
    result, metrics, seconds, stats = run(layer, config)
    card = HeadCard(
        name=name, config=result.head, classes=stats.classes, model=row.model, layer=layer, pooling=row.pooling,
        label=documents.label, trained_on_version=stats.version, model_source=row.source, corpus=documents.corpus,
        where=documents.where, split=spec.to_card(), rows=dict(stats.counts), missing_label=stats.missing_label,
        no_vector=stats.no_states, rare_classes=stats.rare_classes,
        hyperparameters={**asdict(config), "state_precision": plan.precision, "layer_lr": plan.layer_lr,
                         "lora_rank": plan.lora_rank if plan.tune == "lora" else None,
                         "layer_scores": {str(k): v for k, v in layer_scores.items()}},
        history=tuple(asdict(epoch) for epoch in result.history), best_epoch=result.best_epoch,
        metrics=metrics.to_dict(), train_seconds=round(seconds, 3),
    )
    from .recycling import save_top_head

    return Trained(
        card=card, write=lambda directory, c: save_top_head(directory, result, c, weights_dir=weights_dir),
        history=result.history, metrics=metrics, documents=stats.documents, embedded=embedded,
        layer_scores=layer_scores,
    )


def _train_and_test(data: LabelledStates, stats, *, weights_dir: Path, layer: int, pooling: str,
                    config: TrainConfig, plan: StatesPlan):
    """(trained top, test metrics, training seconds)."""
    from .metrics import classification_metrics
    from .recycling import train_top
    from .top import TopConfig
    from .training import predict_batches

    started = time.perf_counter()
    result = train_top(
        weights_dir,
        top=TopConfig(from_layer=layer, tune=plan.tune, pooling=pooling, rank=plan.lora_rank),
        train_batches=lambda epoch: data.batches("train", batch_size=config.batch_size, epoch=epoch),
        val_batches=lambda: data.batches("val", batch_size=EVAL_BATCH),
        steps_per_epoch=data.steps("train", batch_size=config.batch_size),
        num_classes=len(stats.classes),
        config=config,
        layer_lr=plan.layer_lr if plan.tune == "top" else None,
    )
    seconds = time.perf_counter() - started
    y_true, y_pred = predict_batches(result.module, data.batches("test", batch_size=EVAL_BATCH))
    return result, classification_metrics(y_true, y_pred, classes=stats.classes), seconds


def _choose_layer(warehouse: Warehouse, *, row: ModelRow, plan: StatesPlan, version: int | None,
                  one_epoch: Callable[[int], object]) -> tuple[int, dict[int, float]]:
    """The cached layer whose one-epoch run (``one_epoch(K)``) scores best on validation, and every layer's score."""
    layers = cached_layers(warehouse, model=row.model, precision=plan.precision, version=version)
    if not layers:
        raise EwError(f"--from-layer auto compares the cached layers, but no {plan.precision} token states of "
                      f"{row.model} are cached; run `ew ingest FILE --model {row.model} --token-states K` first")
    scores = {layer: round(one_epoch(layer).history[-1].val_accuracy, 4) for layer in layers}
    best = max(layers, key=lambda layer: (scores[layer], layer))  # ties: the higher, cheaper layer
    return best, scores


def cached_layers(warehouse: Warehouse, *, model: str, precision: str, version: int | None = None) -> list[int]:
    """The layers of ``model`` with token states of ``precision`` at ``version`` (default latest)."""
    result = warehouse.query(
        f"select distinct layer from {TOKEN_STATES} where model = '{model}' and precision = '{precision}' order by layer",
        version=version,
    )
    return [int(row["layer"]) for row in result.read_all().to_pylist()]
