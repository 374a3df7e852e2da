"""A one-page PNG about a trained head: learning curves and the row-normalised confusion matrix.

Drawn on matplotlib's Agg canvas directly (no pyplot), so it never touches the caller's
backend or global figure state.

>>> write_report(Path("heads/section/report.png"), history=result.history,
...              metrics=metrics, title="section, minilm-3f2a9c, v12")  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.metrics import Metrics
from pipelines.training import EpochStats
from pipelines.errors import MissingDependencyError
from warehouse.output import atomic_output

CURVES_HEIGHT = 3.2  # inches
CELL = 0.22  # inches per confusion-matrix class: 60 classes give a 13-inch matrix
LABEL_CHARS = 28  # longer class names are cut with an ellipsis
ANNOTATE_UP_TO = 15  # write the percentage in each cell up to this many classes


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "\u2026"


def _tick_fontsize(num_classes: int) -> int:
    return 9 if num_classes <= 20 else 8 if num_classes <= 40 else 7


def _row_labels(metrics: Metrics) -> list[str]:
    return [f"{_short(item.label)} ({item.support})" for item in metrics.per_class]


def _plot_curves(axes, history: Sequence[EpochStats], best_epoch: int | None) -> None:
    if not history:
        axes.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    epochs = [stats.epoch for stats in history]
    axes.plot(epochs, [stats.train_loss for stats in history], marker="o", ms=3, label="train loss")
    axes.plot(epochs, [stats.val_loss for stats in history], marker="o", ms=3, label="val loss")
    # The epoch the head keeps (chosen by validation macro-F1 or loss); the lowest loss if not given.
    best = best_epoch or min(history, key=lambda stats: stats.val_loss).epoch
    axes.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"kept epoch ({best})")
    axes.set_xlabel("epoch")
    axes.set_ylabel("cross-entropy")
    accuracy_axes = axes.twinx()
    accuracy_axes.plot(
        epochs, [stats.val_accuracy for stats in history], color="tab:green", marker="s", ms=3, label="val accuracy"
    )
    accuracy_axes.set_ylabel("val accuracy")
    accuracy_axes.set_ylim(0.0, 1.0)
    lines = axes.get_legend_handles_labels()
    more = accuracy_axes.get_legend_handles_labels()
    axes.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    axes.grid(alpha=0.3)
    if len(epochs) <= 30:
        axes.set_xticks(epochs)


def _plot_confusion(figure, axes, colorbar_axes, metrics: Metrics) -> None:
    confusion = metrics.confusion.astype(np.float64)  # (C, C)
    support = confusion.sum(axis=1, keepdims=True)  # (C, 1)
    normalised = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)
    num_classes = confusion.shape[0]
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    fontsize = _tick_fontsize(num_classes)
    axes.set_xticks(range(num_classes))
    axes.set_yticks(range(num_classes))
    axes.set_xticklabels([_short(item.label) for item in metrics.per_class], rotation=90, fontsize=fontsize)
    axes.set_yticklabels(_row_labels(metrics), fontsize=fontsize)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (rows)")
    axes.set_title("confusion matrix, normalised by row (recall on the diagonal)", fontsize=10)
    if num_classes <= ANNOTATE_UP_TO:
        for row in range(num_classes):
            for col in range(num_classes):
                value = normalised[row, col]
                if value > 0:
                    axes.text(
                        col, row, f"{value:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black",
                    )
    figure.colorbar(image, cax=colorbar_axes)


def write_report(path: Path, *, history: Sequence[EpochStats], metrics: Metrics, title: str,
                 best_epoch: int | None = None) -> Path:
    """Draw the report into ``path`` (PNG) via a temp file and an atomic replace; return ``path``.

    ``best_epoch``: the epoch whose weights the head keeps, marked on the curves.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "train", "writing the PNG report") from None

    path = Path(path)
    # Laid out by hand in inches: a tight or constrained layout draws every tick label again,
    # which doubles the time with 60 classes.
    num_classes = metrics.confusion.shape[0]
    matrix_side = max(4.0, CELL * num_classes)
    longest = max((len(label) for label in _row_labels(metrics)), default=4)
    # tick labels at ~0.6 em per character, plus the axis label
    label_room = 0.5 + longest * 0.6 * _tick_fontsize(num_classes) / 72
    width = max(9.0, label_room + matrix_side + 1.2)
    height = 0.9 + CURVES_HEIGHT + 1.1 + matrix_side + label_room
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)

    def axes_at(left: float, top: float, axes_width: float, axes_height: float):
        """Axes placed by its top-left corner, in inches from the figure's top-left."""
        return figure.add_axes(
            (left / width, 1.0 - (top + axes_height) / height, axes_width / width, axes_height / height)
        )

    figure.suptitle(
        f"{title}\naccuracy {metrics.accuracy:.3f} \u00b7 macro-F1 {metrics.macro_f1:.3f} \u00b7 {metrics.rows} rows",
        fontsize=12,
        y=1.0 - 0.15 / height,
        va="top",
    )
    _plot_curves(axes_at(0.9, 0.9, width - 1.9, CURVES_HEIGHT), history, best_epoch)
    matrix_top = 0.9 + CURVES_HEIGHT + 1.1
    _plot_confusion(
        figure,
        axes_at(label_room, matrix_top, matrix_side, matrix_side),
        axes_at(label_room + matrix_side + 0.2, matrix_top, 0.2, matrix_side),
        metrics,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "wb") as handle:
        figure.savefig(handle, format="png")
    return path
