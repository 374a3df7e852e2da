"""`ew fit-head --layer auto`: score every stored layer by cross-validation, train the head on the best one.

Intermediate layers often beat the last one, and the vectors of every layer are stored already,
so comparing them costs no encoder work. A head's score on one small validation split is too
noisy to rank layers a point or two apart (bench/fit_head.py: picks 1.9-2.7 points of test
accuracy below the best layer), so each layer is scored by a cheap linear probe instead:
a ridge classifier on standardized vectors, fit in closed form on K-1 of K folds of train + val
and scored on the K-th, every row scored once (:func:`probe_layer`). Two streamed passes over
the vectors, memory O(K * D^2) whatever the corpus size, and no SGD. The head is then trained
once, on the best layer; the test split is never seen before it scores that head.

>>> probe = lambda layer: probe_layer(batches_of(layer), num_classes=12, layer=layer)  # doctest: +SKIP
>>> layer, scores = choose_layer([3, 6], score=probe)                                 # doctest: +SKIP
>>> scores[3]                                                                         # doctest: +SKIP
LayerScore(layer=3, val_accuracy=0.751, val_macro_f1=0.512)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from warehouse import Warehouse
from warehouse.errors import EwError
from warehouse.tables import EMBEDDINGS

FOLDS = 5
# Ridge penalties per training row, on standardized vectors; each layer is scored with its best.
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)
# What the scores are, as a head card records it
LAYER_SCORE = f"ridge probe, {FOLDS}-fold cross-validation over train + val; chosen by accuracy + macro-F1"


@dataclass(frozen=True)
class LayerScore:
    layer: int
    val_accuracy: float  # cross-validated over folds of train + val
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


def choose_layer(layers: Sequence[int], *, score: Callable[[int], LayerScore]) -> tuple[int, dict[int, LayerScore]]:
    """(best layer, every layer's score): the highest :attr:`LayerScore.key`."""
    if not layers:
        raise EwError("--layer auto compares the stored layers, but this model has no vectors stored; "
                      "ingest with --layers all (or a list such as 3,6) first")
    scores = {layer: score(layer) for layer in layers}
    return max(scores.values(), key=lambda s: s.key).layer, scores


def probe_layer(batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], *, num_classes: int, layer: int,
                folds: int = FOLDS, penalties: Sequence[float] = PENALTIES) -> LayerScore:
    """Cross-validated accuracy and macro-F1 of a ridge classifier on one layer's vectors.

    ``batches()`` yields (x (B, D), y (B,) class index) in the same order every call (it is read
    twice); row i belongs to fold i % ``folds``. Pass 1 sums, per fold, the Gram matrix of [x, 1]
    and its products with the one-hot labels; each fold's solution comes from the other folds'
    sums, standardized in closed form (z = (x - mean) / std is a linear map of [x, 1]). Pass 2
    predicts every row with the solution that did not see it.
    """
    from .metrics import classification_metrics

    gram, targets, rows = None, None, 0
    for x, y in batches():
        xa, fold = _augmented(x, rows, folds)  # (B, D + 1), (B,)
        if gram is None:
            gram = np.zeros((folds, xa.shape[1], xa.shape[1]))  # (K, D + 1, D + 1)
            targets = np.zeros((folds, xa.shape[1], num_classes))  # (K, D + 1, C)
        onehot = np.eye(num_classes)[np.asarray(y, dtype=np.int64)]  # (B, C)
        for k in range(folds):
            part = fold == k
            gram[k] += xa[part].T @ xa[part]
            targets[k] += xa[part].T @ onehot[part]
        rows += len(xa)
    if rows < folds:
        raise EwError(f"--layer auto needs at least {folds} labelled rows in train + val to compare layers, got {rows}")
    solutions = np.stack([_ridge(gram.sum(0) - gram[k], targets.sum(0) - targets[k], penalties)
                          for k in range(folds)])  # (K, P, D + 1, C)
    truth, predicted, seen = [], [], 0
    for x, y in batches():
        xa, fold = _augmented(x, seen, folds)
        chosen = np.empty((len(xa), len(penalties)), dtype=np.int64)  # (B, P)
        for k in range(folds):
            part = fold == k
            chosen[part] = np.einsum("bd,pdc->bpc", xa[part], solutions[k]).argmax(axis=2)
        predicted.append(chosen)
        truth.append(np.asarray(y, dtype=np.int64))
        seen += len(xa)
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    classes = [str(c) for c in range(num_classes)]
    measured = [classification_metrics(truth, predicted[:, p], classes=classes) for p in range(len(penalties))]
    return max((LayerScore(layer=layer, val_accuracy=m.accuracy, val_macro_f1=m.macro_f1) for m in measured),
               key=lambda s: s.key)


def _augmented(x: np.ndarray, first_row: int, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """([x, 1] in float64 (B, D + 1), each row's fold (B,)) for a batch whose first row is row ``first_row``."""
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((len(x), 1))]), (first_row + np.arange(len(x))) % folds


def _ridge(gram: np.ndarray, targets: np.ndarray, penalties: Sequence[float]) -> np.ndarray:
    """(P, D + 1, C) weights over [x, 1], one per penalty, of ridge on the standardized x behind ``gram``."""
    d = gram.shape[0] - 1
    n = gram[d, d]
    mean = gram[:d, d] / n
    std = np.sqrt(np.maximum(np.diag(gram)[:d] / n - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    to_z = np.eye(d + 1)  # [x, 1] @ to_z = [(x - mean) / std, 1]
    to_z[:d, :d] = np.diag(1.0 / std)
    to_z[d, :d] = -mean / std
    gram_z, targets_z = to_z.T @ gram @ to_z, to_z.T @ targets
    solutions = []
    for penalty in penalties:
        ridge = np.diag(np.r_[np.full(d, penalty * n), 0.0])  # the intercept is not penalized
        solutions.append(to_z @ np.linalg.solve(gram_z + ridge, targets_z))
    return np.stack(solutions)
