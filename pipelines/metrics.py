"""Classification metrics from (y_true, y_pred) class indices, in NumPy.

Definitions follow scikit-learn's: precision, recall and F1 are 0 where undefined, and
macro-F1 averages over the classes that occur in y_true or y_pred
(``f1_score(average="macro", labels=present)``).

>>> m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), classes=["a", "b"])
>>> round(m.accuracy, 3), m.confusion.tolist()
(0.667, [[1, 0], [1, 1]])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.errors import HeadError


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # rows whose true class is this one


@dataclass(frozen=True, eq=False)
class Metrics:
    accuracy: float
    macro_f1: float
    per_class: tuple[ClassMetrics, ...]  # one per class, in class-index order, absent classes included
    confusion: np.ndarray  # (C, C) int64 counts; rows = true, cols = predicted

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self) -> dict:
        """JSON-ready: plain floats, ints and lists."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "rows": self.rows,
            "per_class": [asdict(item) for item in self.per_class],
            "confusion": self.confusion.tolist(),
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, *, classes: Sequence[str]) -> Metrics:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    num_classes = len(classes)
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise HeadError(f"y_true has {y_true.size} rows but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise HeadError("no rows to evaluate: the split is empty")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(values.dtype, np.integer):
            raise HeadError(f"{name} must hold class indices (integers), got {values.dtype}")
        if values.min() < 0 or values.max() >= num_classes:
            raise HeadError(
                f"{name} holds class indices outside 0..{num_classes - 1} "
                f"(min {values.min()}, max {values.max()}); pass the full list of classes"
            )
    y_true = y_true.astype(np.int64)
    y_pred = y_pred.astype(np.int64)
    confusion = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)  # (C, C)

    true_positive = np.diag(confusion).astype(np.float64)  # (C,)
    support = confusion.sum(axis=1)  # (C,) true rows per class
    predicted = confusion.sum(axis=0)  # (C,) predicted rows per class
    precision = _ratio(true_positive, predicted.astype(np.float64))
    recall = _ratio(true_positive, support.astype(np.float64))
    # 2tp / (2tp + fp + fn), as sklearn computes it; equals 2pr / (p + r) where defined
    f1 = _ratio(2 * true_positive, (support + predicted).astype(np.float64))
    present = (support + predicted) > 0
    per_class = tuple(
        ClassMetrics(
            label=str(label),
            precision=float(precision[index]),
            recall=float(recall[index]),
            f1=float(f1[index]),
            support=int(support[index]),
        )
        for index, label in enumerate(classes)
    )
    return Metrics(
        accuracy=float(true_positive.sum() / y_true.size),
        macro_f1=float(f1[present].mean()),
        per_class=per_class,
        confusion=confusion,
    )
