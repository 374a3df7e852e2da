"""Heads on stored embeddings: ew fit-head beside scikit-learn, and streamed vs in-memory epochs.

    python -m bench.fit_head [--warehouse bench/.warehouse] [--docs N] [--threads N]

On the whole Debian corpus (label `section`, model `minilm`, last layer) prints and writes
(bench/results/fit_head.json): the MLP head's test accuracy and macro-F1 beside scikit-learn
LogisticRegression fit on the same train split; the time of one training epoch streamed from
the warehouse beside one over the same vectors held in NumPy memory; the peak RSS of
`ew fit-head`. The warehouse is kept, so a second run embeds nothing.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.ingest import ingest
from pipelines.metrics import classification_metrics
from warehouse import Warehouse
from warehouse.query import usable_cores
from warehouse.selection import DocumentFilter
from warehouse.splits import LabelledVectors

from .common import DATA, save

HERE = Path(__file__).resolve().parent


def load_split(data: LabelledVectors, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*data.batches(split, batch_size=8192))
    return np.concatenate(xs), np.concatenate(ys)


def epoch_seconds(batches_for_epoch, *, dim: int, classes: int, epochs: int = 3) -> float:
    """Median seconds of one training epoch of the default MLP over the batches given."""
    import torch

    from pipelines.heads import HeadConfig, build_head
    from pipelines.training import prefetch

    torch.manual_seed(0)
    module = build_head(HeadConfig(kind="mlp", input_dim=dim, num_classes=classes))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-5, amsgrad=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for x, y in prefetch(batches_for_epoch(epoch)):
            optimizer.zero_grad(set_to_none=True)
            # Streamed batches are read-only views of Arrow memory: copy them, as train_head does.
            loss = loss_fn(module(torch.from_numpy(np.require(x, requirements="W"))), torch.from_numpy(np.require(y, requirements="W")))
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warehouse", type=Path, default=HERE / ".warehouse")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as ew fit-head does: a tiny head trains fastest on one thread
    wh = Warehouse.open(args.warehouse, create=True)
    ingested = ingest(wh, DATA, model="minilm", layers="last", threads=args.threads, progress=None)
    print(f"ingest: embedded {ingested.embedded:,}, reused {ingested.reused:,} in {ingested.seconds:.0f}s")

    name = f"bench-{int(time.time())}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-w", str(args.warehouse), "fit-head", "--label", "section",
         "--model", ingested.model, "--name", name, "--threads", str(args.threads), "--json"],
        capture_output=True, text=True,
    )
    fit_wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ew fit-head failed:\n{done.stderr}")
    fit = json.loads(done.stdout)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    from sklearn.linear_model import LogisticRegression

    with LabelledVectors(wh, model=fit["model"], layer=fit["layer"], pooling=fit["pooling"],
                         documents=DocumentFilter(label="section")) as data:
        stats = data.assemble()
        x_train, y_train = load_split(data, "train")
        x_test, y_test = load_split(data, "test")
        started = time.perf_counter()
        logistic = LogisticRegression(max_iter=1000).fit(x_train, y_train)
        logistic_seconds = time.perf_counter() - started
        baseline = classification_metrics(y_test, logistic.predict(x_test), classes=stats.classes)

        streamed = epoch_seconds(lambda e: data.batches("train", batch_size=args.batch_size, epoch=e),
                                 dim=stats.dim, classes=len(stats.classes))

        def in_memory(epoch: int):
            order = np.random.default_rng(epoch).permutation(len(x_train))
            for start in range(0, len(order), args.batch_size):
                rows = order[start : start + args.batch_size]
                yield x_train[rows], y_train[rows]

        held = epoch_seconds(in_memory, dim=stats.dim, classes=len(stats.classes))

    result = {
        "config": {"label": "section", "model": fit["model"], "layer": fit["layer"], "threads": args.threads,
                   "batch_size": args.batch_size, "head": fit["head"], "warehouse_version": fit["version"]},
        "rows": {"train": fit["train"], "val": fit["val"], "test": fit["test"]},
        "mlp_accuracy": fit["accuracy"],
        "mlp_macro_f1": fit["macro_f1"],
        "logistic_regression_accuracy": baseline.accuracy,
        "logistic_regression_macro_f1": baseline.macro_f1,
        "accuracy_points_vs_logistic": round(100 * (fit["accuracy"] - baseline.accuracy), 2),
        "fit_head_train_seconds": fit["train_seconds"],
        "fit_head_wall_seconds": round(fit_wall, 2),
        "logistic_regression_seconds": round(logistic_seconds, 2),
        "streamed_epoch_seconds": round(streamed, 4),
        "in_memory_epoch_seconds": round(held, 4),
        "streamed_over_in_memory": round(streamed / held, 3),
        "fit_head_peak_rss_mb": round(peak_rss_mb, 1),
    }
    path = save("fit_head", result)
    print(f"fit-head on {DATA.name} (label section, {fit['model']} layer {fit['layer']}, {args.threads} threads)")
    print(f"  MLP head          accuracy {fit['accuracy']:.4f}  macro-F1 {fit['macro_f1']:.4f}  ({fit['train_seconds']:.1f}s training)")
    print(f"  LogisticRegression accuracy {baseline.accuracy:.4f}  macro-F1 {baseline.macro_f1:.4f}  ({logistic_seconds:.1f}s)")
    print(f"  accuracy difference {result['accuracy_points_vs_logistic']:+.2f} points")
    print(f"  one epoch streamed {streamed:.3f}s vs in memory {held:.3f}s: ratio {streamed / held:.2f}x")
    print(f"  peak RSS of ew fit-head {peak_rss_mb:.0f} MB")
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
