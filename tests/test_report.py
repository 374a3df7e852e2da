"""The PNG report."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from pipelines.metrics import classification_metrics
from pipelines.report import write_report
from pipelines.training import EpochStats
from pipelines.errors import MissingDependencyError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sixty_class_metrics():
    rng = np.random.default_rng(0)
    classes = [f"section {index}: a rather long heading name number {index}" for index in range(60)]
    y_true = rng.integers(0, 60, size=2000)
    y_pred = np.where(rng.random(2000) < 0.6, y_true, rng.integers(0, 60, size=2000))
    return classification_metrics(y_true, y_pred, classes=classes)


HISTORY = [
    EpochStats(epoch=epoch, train_loss=2.0 / epoch, val_loss=2.2 / epoch + 0.05 * epoch, val_accuracy=0.5 + 0.04 * epoch, seconds=0.3)
    for epoch in range(1, 9)
]


def test_writes_a_png_with_sixty_classes(tmp_path):
    path = write_report(tmp_path / "out" / "report.png", history=HISTORY, metrics=sixty_class_metrics(), title="section")
    assert path == tmp_path / "out" / "report.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000
    assert [item.name for item in path.parent.iterdir()] == ["report.png"]  # no temp file left


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"ew\[train\]"):
        write_report(tmp_path / "report.png", history=HISTORY, metrics=sixty_class_metrics(), title="section")
