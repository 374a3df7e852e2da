"""The training loop on gaussian blobs: 16 dims, 3 classes."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipelines.heads import HeadCard, load_head, save_head
from pipelines.training import InputMoments, TrainConfig, input_moments, predict_batches, prefetch, train_head
from pipelines.errors import HeadError

DIM, CLASSES = 16, 3


@pytest.fixture(scope="module")
def one_thread():
    # Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core machine
    # OpenMP workers waiting on each other can make a 1-second test take 30.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(rows: int, *, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated gaussian clusters; the centres are the same for every seed."""
    centres = np.random.default_rng(42).normal(scale=4.0, size=(CLASSES, DIM))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=rows)
    x = centres[y] + rng.normal(scale=spread, size=(rows, DIM))
    return x.astype(np.float32), y.astype(np.int64)


def batched(x: np.ndarray, y: np.ndarray, *, size: int = 32, seed: int | None = None):
    order = np.arange(len(y)) if seed is None else np.random.default_rng(seed).permutation(len(y))
    for start in range(0, len(y), size):
        index = order[start : start + size]
        yield x[index], y[index]


def fit(train, val, *, class_weights=None, **options):
    config = TrainConfig(**{"epochs": 8, "hidden": 16, "lr": 1e-2, **options})
    moments = input_moments(batched(*train), num_classes=CLASSES)
    return train_head(
        train_batches=lambda epoch: batched(*train, seed=epoch),
        val_batches=lambda: batched(*val),
        steps_per_epoch=-(-len(train[1]) // 32),
        input_dim=DIM,
        num_classes=CLASSES,
        config=config,
        class_weights=class_weights,
        moments=moments,
    )


def test_learns_separable_blobs():
    train, val = blobs(600, seed=1), blobs(200, seed=2)
    result = fit(train, val)
    assert result.history[result.best_epoch - 1].val_accuracy > 0.95
    y_true, y_pred = predict_batches(result.module, batched(*val))
    np.testing.assert_array_equal(y_true, val[1])
    assert (y_true == y_pred).mean() > 0.95
    assert not result.module.training


def test_saved_head_predicts_like_the_trained_module(tmp_path):
    train, val = blobs(300, seed=1), blobs(100, seed=2)
    result = fit(train, val, epochs=2)
    directory = tmp_path / "blobs"
    save_head(directory, result.module, HeadCard(name="blobs", config=result.config, classes=("a", "b", "c"), model="m",
                                                 layer=0, pooling="mean", label="blob", trained_on_version=0))
    _, y_pred = predict_batches(result.module, batched(*val))
    np.testing.assert_array_equal(load_head(directory).predict(val[0]), y_pred)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_same_seed_gives_identical_weights(kind):
    train, val = blobs(300, seed=1), blobs(100, seed=2)
    first = fit(train, val, kind=kind, epochs=3, patience=0).module.state_dict()
    second = fit(train, val, kind=kind, epochs=3, patience=0).module.state_dict()
    other = fit(train, val, kind=kind, epochs=3, patience=0, seed=1).module.state_dict()
    for name in first:
        assert torch.equal(first[name], second[name])
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_does_not_disturb_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(blobs(64, seed=1), blobs(32, seed=2), epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_keeps_the_best_epoch():
    # Validation labels are the training labels shifted by one class, so the better the
    # head fits the training data, the worse the validation loss: epoch 1 is the best.
    train = blobs(300, seed=1)
    x_val, y_val = blobs(100, seed=2)
    val = (x_val, (y_val + 1) % CLASSES)
    result = fit(train, val, epochs=30, patience=2)
    assert result.best_epoch == 1
    assert len(result.history) == 3
    assert result.history[2].val_loss > result.history[0].val_loss
    # the module holds epoch 1's weights, not the last epoch's
    with torch.no_grad():
        logits = result.module(torch.from_numpy(val[0]))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(val[1])).item()
    assert loss == pytest.approx(result.history[0].val_loss, rel=1e-5)


def test_empty_validation_split_is_a_head_error():
    with pytest.raises(HeadError, match="validation split is empty"):
        train_head(
            train_batches=lambda epoch: batched(*blobs(64, seed=1)),
            val_batches=lambda: iter(()),
            steps_per_epoch=2,
            input_dim=DIM,
            num_classes=CLASSES,
            config=TrainConfig(epochs=2),
        )


def test_class_weights_must_match_the_classes():
    with pytest.raises(HeadError, match=r"class_weights must have shape \(3,\)"):
        train_head(
            train_batches=lambda epoch: batched(*blobs(64, seed=1)),
            val_batches=lambda: batched(*blobs(32, seed=2)),
            steps_per_epoch=2,
            input_dim=DIM,
            num_classes=CLASSES,
            config=TrainConfig(epochs=1),
            class_weights=np.ones(4),
        )


def test_read_only_arrays_are_accepted_without_warnings(recwarn):
    x, y = blobs(64, seed=1)
    x.flags.writeable = False
    y.flags.writeable = False
    result = fit((x, y), blobs(32, seed=2), epochs=1)
    assert result.history
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_prefetch_preserves_order():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))


def test_prefetch_propagates_producer_errors():
    def producer():
        yield 1
        yield 2
        raise HeadError("the query failed")

    consumed = []
    with pytest.raises(HeadError, match="the query failed"):
        for item in prefetch(producer()):
            consumed.append(item)
    assert consumed == [1, 2]


def test_prefetch_stops_the_producer_when_the_consumer_stops_early():
    closed = threading.Event()

    def producer():
        try:
            for item in range(1_000_000):
                yield item
        finally:
            closed.set()

    before = threading.active_count()
    iterator = prefetch(producer(), depth=2)
    assert next(iterator) == 0
    iterator.close()
    assert closed.is_set()  # the producer's iterator was closed, and its thread joined
    assert threading.active_count() == before


def test_input_moments_stream_mean_std_and_class_counts():
    x, y = blobs(300, seed=1)
    x[:, 0] = 7.0  # a constant dimension scales by 1, not by infinity
    moments = input_moments(batched(x, y, size=7), num_classes=CLASSES + 1)
    np.testing.assert_allclose(moments.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(moments.std[1:], x[:, 1:].std(0), rtol=1e-4)
    assert moments.std[0] == 1.0
    assert moments.class_counts.tolist() == [*np.bincount(y, minlength=CLASSES).tolist(), 0]


def test_balanced_weights_are_scikit_learns_and_zero_for_absent_classes():
    moments = InputMoments(mean=np.zeros(2), std=np.ones(2), class_counts=np.array([60, 30, 10, 0]))
    # n / (k * n_c) over the k = 3 present classes: each present class weighs 100 / 3 in all.
    np.testing.assert_allclose(moments.balanced_weights(), [100 / 180, 100 / 90, 100 / 30, 0], rtol=1e-6)


def test_balanced_class_weight_is_the_weighted_loss():
    x, y = blobs(300, seed=1)
    keep = (y != 2) | (np.arange(len(y)) % 6 == 0)  # class 2 becomes rare
    train, val = (x[keep], y[keep]), blobs(90, seed=2)
    weights = input_moments(batched(*train), num_classes=CLASSES).balanced_weights()
    balanced = fit(train, val, epochs=2, patience=0, class_weight="balanced")
    explicit = fit(train, val, epochs=2, patience=0, class_weights=weights)
    unweighted = fit(train, val, epochs=2, patience=0)
    assert balanced.history[-1].val_loss == explicit.history[-1].val_loss
    assert balanced.history[-1].train_loss != unweighted.history[-1].train_loss
    # the validation loss is the weighted mean: sum_i w[y_i] * loss_i / sum_i w[y_i]
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(balanced.module(torch.from_numpy(val[0])), torch.from_numpy(val[1]),
                                                   reduction="none").numpy()
    expected = (weights[val[1]] * losses).sum() / weights[val[1]].sum()
    assert balanced.history[-1].val_loss == pytest.approx(expected, rel=1e-4)


def test_standardize_and_balanced_need_the_moments():
    with pytest.raises(HeadError, match="need the training split's moments"):
        train_head(train_batches=lambda epoch: batched(*blobs(64, seed=1)), val_batches=lambda: batched(*blobs(32, seed=2)),
                   steps_per_epoch=2, input_dim=DIM, num_classes=CLASSES, config=TrainConfig(standardize=True))


def test_standardized_training_returns_a_plain_head_that_reads_raw_vectors(tmp_path):
    (x, y), (xv, yv) = blobs(300, seed=1), blobs(100, seed=2)
    shift = np.linspace(-50, 50, DIM).astype(np.float32)
    train, val = (x * 30 + shift, y), (xv * 30 + shift, yv)  # far from 0, large scale
    result = fit(train, val, standardize=True)
    assert set(result.module.state_dict()) == set(result.config.weight_shapes())
    assert result.history[result.best_epoch - 1].val_accuracy > 0.95
    _, y_pred = predict_batches(result.module, batched(*val))
    assert (y_pred == val[1]).mean() == result.history[result.best_epoch - 1].val_accuracy
    save_head(tmp_path / "scaled", result.module, HeadCard(name="scaled", config=result.config, classes=("a", "b", "c"),
                                                           model="m", layer=0, pooling="mean", label="blob",
                                                           trained_on_version=0))
    np.testing.assert_array_equal(load_head(tmp_path / "scaled").predict(val[0]), y_pred)


@pytest.mark.parametrize("select", ["loss", "macro_f1"])
def test_the_kept_epoch_is_the_best_by_the_selection(select):
    x, y = blobs(300, seed=1, spread=4.0)  # overlapping: scores move from epoch to epoch
    result = fit((x, y), blobs(100, seed=2, spread=4.0), epochs=8, patience=0, lr=3e-2, select=select)
    history = result.history
    assert all(0 <= epoch.val_macro_f1 <= 1 for epoch in history)
    if select == "loss":
        expected = min(history, key=lambda e: e.val_loss)
    else:  # highest macro-F1, ties to the lower loss
        expected = max(history, key=lambda e: (e.val_macro_f1, -e.val_loss))
    assert result.best_epoch == expected.epoch
    _, y_pred = predict_batches(result.module, batched(*blobs(100, seed=2, spread=4.0)))
    assert (y_pred == blobs(100, seed=2, spread=4.0)[1]).mean() == pytest.approx(expected.val_accuracy)


def test_unknown_selection_or_class_weight_is_a_head_error():
    with pytest.raises(HeadError, match="unknown selection 'f1': choose one of loss, macro_f1"):
        TrainConfig(select="f1")
    with pytest.raises(HeadError, match="unknown class weight 'auto': choose one of balanced, none"):
        TrainConfig(class_weight="auto")


def test_ensemble_trains_each_member_as_alone_and_averages_them():
    train, val = blobs(300, seed=1), blobs(100, seed=2)
    options = dict(epochs=3, patience=0, standardize=True, select="macro_f1")
    both = fit(train, val, kind="ensemble", **options)
    alone = {kind: fit(train, val, kind=kind, **options) for kind in ("mlp", "linear")}
    assert set(both.members) == {"mlp", "linear", "ensemble"} and both.config.kind == "ensemble"
    for kind, result in alone.items():
        for name, tensor in result.module.state_dict().items():
            assert torch.equal(both.module.state_dict()[f"{kind}.{name}"], tensor)
        assert both.members[kind]["best_epoch"] == result.best_epoch
    y_true, y_pred = predict_batches(both.module, batched(*val))
    assert (y_true == y_pred).mean() > 0.95
    assert both.members["ensemble"]["val_accuracy"] == (y_true == y_pred).mean()  # the averaged head's own score
