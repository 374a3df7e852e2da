"""Metrics agree with scikit-learn (used here only, never in the product)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from pipelines.metrics import classification_metrics
from pipelines.errors import HeadError


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    classes = [f"class {index}" for index in range(num_classes)]
    # classes 5 and 6 never occur as truth; 6 is predicted sometimes, 5 never
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.choice([0, 1, 2, 3, 4, 6], size=300))

    metrics = classification_metrics(y_true, y_pred, classes=classes)

    present = sorted(set(y_true) | set(y_pred))
    assert metrics.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(num_classes)), zero_division=0
    )
    assert [item.label for item in metrics.per_class] == classes
    np.testing.assert_allclose([item.precision for item in metrics.per_class], precision)
    np.testing.assert_allclose([item.recall for item in metrics.per_class], recall)
    np.testing.assert_allclose([item.f1 for item in metrics.per_class], f1)
    assert [item.support for item in metrics.per_class] == support.tolist()
    np.testing.assert_array_equal(metrics.confusion, confusion_matrix(y_true, y_pred, labels=list(range(num_classes))))


def test_to_dict_is_json_ready():
    metrics = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), classes=["a", "b"])
    payload = json.loads(json.dumps(metrics.to_dict()))
    assert payload["confusion"] == [[1, 0], [1, 1]]
    assert payload["rows"] == 3
    assert payload["per_class"][1] == {"label": "b", "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_bad_inputs_are_head_errors():
    with pytest.raises(HeadError, match="outside 0..1"):
        classification_metrics(np.array([0, 2]), np.array([0, 1]), classes=["a", "b"])
    with pytest.raises(HeadError, match="2 rows but y_pred has 1"):
        classification_metrics(np.array([0, 1]), np.array([0]), classes=["a", "b"])
    with pytest.raises(HeadError, match="no rows"):
        classification_metrics(np.array([], dtype=np.int64), np.array([], dtype=np.int64), classes=["a", "b"])
