"""pipelines.layer_choice: the cross-validated ridge probe that --layer auto ranks layers by."""
import numpy as np
import pytest

from pipelines.layer_choice import LayerScore, choose_layer, probe_layer
from pipelines.metrics import classification_metrics
from warehouse.errors import EwError


def labelled(seed: int, *, signal: float, rows: int = 120, dim: int = 6, classes: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    x = rng.normal(size=(rows, dim)) * 3.0 + 10.0  # far from 0 and unevenly scaled, as inner layers are
    x[:, :classes] += signal * np.eye(classes)[y]
    return x.astype(np.float32), y


def in_batches(x, y, size):
    return lambda: ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))


def test_probe_matches_ridge_fit_fold_by_fold_on_standardized_rows():
    x, y = labelled(0, signal=2.0)
    folds, penalty = 4, 0.1
    score = probe_layer(in_batches(x, y, 17), num_classes=3, layer=2, folds=folds, penalties=[penalty])
    fold = np.arange(len(x)) % folds
    predicted = np.empty(len(x), dtype=np.int64)
    for k in range(folds):
        train = x[fold != k].astype(np.float64)
        mean, std = train.mean(0), train.std(0)
        z = np.hstack([(train - mean) / std, np.ones((len(train), 1))])
        ridge = np.diag(np.r_[np.full(x.shape[1], penalty * len(train)), 0.0])
        weights = np.linalg.solve(z.T @ z + ridge, z.T @ np.eye(3)[y[fold != k]])
        held = np.hstack([(x[fold == k] - mean) / std, np.ones(((fold == k).sum(), 1))])
        predicted[fold == k] = (held @ weights).argmax(1)
    expected = classification_metrics(y, predicted, classes=["0", "1", "2"])
    assert score == LayerScore(layer=2, val_accuracy=pytest.approx(expected.accuracy),
                               val_macro_f1=pytest.approx(expected.macro_f1))


def test_probe_does_not_depend_on_the_batch_size():
    x, y = labelled(1, signal=1.0)
    scores = {probe_layer(in_batches(x, y, size), num_classes=3, layer=0) for size in (1, 7, len(x))}
    assert len(scores) == 1


def test_choose_layer_keeps_the_informative_layer_and_scores_every_one():
    data = {0: labelled(2, signal=0.0), 1: labelled(2, signal=30.0), 2: labelled(2, signal=3.0)}
    layer, scores = choose_layer([0, 1, 2], score=lambda layer: probe_layer(in_batches(*data[layer], 32), num_classes=3,
                                                                             layer=layer))
    assert layer == 1 and sorted(scores) == [0, 1, 2]
    assert scores[1].val_accuracy > 0.95 > scores[2].val_accuracy > scores[0].val_accuracy


def test_choose_layer_ties_go_to_the_higher_layer():
    same = lambda layer: LayerScore(layer=layer, val_accuracy=0.5, val_macro_f1=0.25)
    assert choose_layer([3, 6, 4], score=same)[0] == 6


def test_too_few_rows_or_no_layer_is_an_error_that_says_what_to_do():
    x, y = labelled(3, signal=1.0, rows=3)
    with pytest.raises(EwError, match="at least 5 labelled rows in train \\+ val"):
        probe_layer(in_batches(x, y, 2), num_classes=3, layer=0)
    with pytest.raises(EwError, match="ingest with --layers all"):
        choose_layer([], score=lambda layer: None)
