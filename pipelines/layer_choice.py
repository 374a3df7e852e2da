"""`ew fit-head --layer auto`: train the head on every stored layer and keep the one that scores best on validation.

Intermediate layers often beat the last one, and the vectors of every layer are stored already,
so trying them all costs one head training per layer and no encoder work. The choice uses only
the validation split; the test split scores the chosen head alone, as for a fixed layer.

>>> best, scores = choose_layer([3, 6], train=lambda layer: train_one(layer))   # doctest: +SKIP
>>> scores[3]                                                                    # doctest: +SKIP
LayerScore(layer=3, val_accuracy=0.751, val_macro_f1=0.512)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from warehouse import Warehouse
from warehouse.errors import EwError
from warehouse.tables import EMBEDDINGS

T = TypeVar("T")


@dataclass(frozen=True)
class LayerScore:
    layer: int
    val_accuracy: float  # of the kept epoch
    val_macro_f1: float

    @property
    def key(self) -> tuple[float, int]:
        # Accuracy plus macro-F1: neither the frequent classes nor the rare ones alone decide. Ties
        # go to the higher layer (the usual default, and the cheaper one for --from-layer later).
        return (round(self.val_accuracy + self.val_macro_f1, 6), self.layer)


def stored_layers(warehouse: Warehouse, *, model: str, pooling: str, version: int | None = None) -> list[int]:
    """The layers of ``model`` with ``pooling`` vectors stored at ``version`` (default: the latest)."""
    result = warehouse.query(
        f"select distinct layer from {EMBEDDINGS} where model = '{model}' and pooling = '{pooling}' order by layer",
        version=version,
    )
    return [int(row["layer"]) for row in result.read_all().to_pylist()]


def choose_layer(layers: Sequence[int], *, train: Callable[[int], T],
                 score: Callable[[int, T], LayerScore]) -> tuple[int, T, dict[int, LayerScore]]:
    """(best layer, what ``train`` returned for it, every layer's validation score).

    ``train(layer)`` trains a complete head; the best one is kept, so nothing is trained twice.
    """
    if not layers:
        raise EwError("--layer auto compares the stored layers, but this model has no vectors stored; "
                      "ingest with --layers all (or a list such as 3,6) first")
    best: tuple[LayerScore, T] | None = None
    scores: dict[int, LayerScore] = {}
    for layer in layers:
        trained = train(layer)
        scores[layer] = score(layer, trained)
        if best is None or scores[layer].key > best[0].key:
            best = (scores[layer], trained)
    return best[0].layer, best[1], scores
