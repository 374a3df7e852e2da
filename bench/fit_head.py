"""Heads on stored embeddings: ew fit-head's default head beside scikit-learn, at every layer and corpus size.

    python -m bench.fit_head [--warehouse bench/.warehouse] [--sizes 1000,4000,10000] [--layers all]
                             [--seeds 5] [--offset 10000] [--threads N] [--timing] [--name fit_head]

For each size N, lines OFFSET+1 .. OFFSET+N of the Debian corpus are ingested as corpus
``debian-N`` with model ``minilm`` (vectors of a text stored once are reused by every size).
For every stored layer and every split seed 0 .. SEEDS-1, the default ``ew fit-head --label
section --seed S`` is trained and tested beside scikit-learn ``LogisticRegression(max_iter=1000)``
fit on the same train split (ew's split rule with the same seed) of the same vectors; then
``--layer auto --seed S`` is run. One split's test set is small (105 rows at 1,000 documents: one
row is a point of accuracy), so the comparisons are made on the means over the seeds, and the
per-seed wins / ties / losses are reported beside them; ``--seeds 1`` is the one-split run.
Targets, on the means: the head not below logistic regression on accuracy or macro-F1 at any
(size, layer); ``--layer auto``'s test accuracy within 0.5 points of the layer whose mean test
accuracy is highest. ``--timing`` also times one training epoch streamed from the warehouse
beside one over the same vectors in NumPy memory (largest size, last layer). Prints a table and
writes bench/results/NAME.json; the warehouse is kept, so a second run embeds nothing. The whole
corpus (``--sizes 0``, 63,666 documents x 7 layers) is its own run: ``make bench`` writes it to
bench/results/fit_head_whole.json with 2 seeds.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import time
from pathlib import Path

import numpy as np

from pipelines.fitting import fit_head
from pipelines.ingest import ingest
from pipelines.metrics import classification_metrics
from warehouse import Warehouse
from warehouse.query import usable_cores
from warehouse.selection import DocumentFilter
from warehouse.splits import LabelledVectors, SplitSpec

from .common import DATA, save

HERE = Path(__file__).resolve().parent
LABEL = "section"
METRICS = ("accuracy", "macro_f1")
AUTO_TOLERANCE = 0.5  # points of test accuracy below the best layer's


def load_split(data: LabelledVectors, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*data.batches(split, batch_size=8192))
    return np.concatenate(xs), np.concatenate(ys)


def corpus_file(directory: Path, *, offset: int, size: int) -> Path:
    """Lines offset+1 .. offset+size of the Debian corpus (fewer if it ends first), as a JSONL file."""
    path = directory / f"debian-{size}.jsonl"
    if not path.exists():
        with gzip.open(DATA, "rt", encoding="utf-8") as source:
            path.write_text("".join(itertools.islice(source, offset, offset + size)), encoding="utf-8")
    return path


def logistic_regression(wh: Warehouse, *, model: str, layer: int, pooling: str, corpus: str,
                        seed: int = 0, threads: int | None = None) -> tuple[dict, float]:
    """Test accuracy and macro-F1 of scikit-learn's LogisticRegression on ew's split (``seed``) of the same vectors."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with LabelledVectors(wh, model=model, layer=layer, pooling=pooling, spec=SplitSpec(seed=seed),
                         documents=DocumentFilter(label=LABEL, corpus=corpus)) as data:
        stats = data.assemble()
        x_train, y_train = load_split(data, "train")
        x_test, y_test = load_split(data, "test")
    started = time.perf_counter()
    # BLAS threads beyond the cores given spin against each other (10x slower on a loaded 2-core machine)
    with threadpool_limits(limits=threads):
        logistic = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    seconds = time.perf_counter() - started
    metrics = classification_metrics(y_test, logistic.predict(x_test), classes=stats.classes)
    return {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1}, seconds


def epoch_seconds(batches_for_epoch, *, dim: int, classes: int, epochs: int = 3) -> float:
    """Median seconds of one training epoch of an MLP head over the batches given."""
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


def timing(wh: Warehouse, *, model: str, layer: int, pooling: str, corpus: str, batch_size: int) -> dict:
    with LabelledVectors(wh, model=model, layer=layer, pooling=pooling,
                         documents=DocumentFilter(label=LABEL, corpus=corpus)) as data:
        stats = data.assemble()
        x_train, y_train = load_split(data, "train")
        streamed = epoch_seconds(lambda e: data.batches("train", batch_size=batch_size, epoch=e),
                                 dim=stats.dim, classes=len(stats.classes))

        def in_memory(epoch: int):
            order = np.random.default_rng(epoch).permutation(len(x_train))
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                yield x_train[rows], y_train[rows]

        held = epoch_seconds(in_memory, dim=stats.dim, classes=len(stats.classes))
    return {"streamed_epoch_seconds": round(streamed, 4), "in_memory_epoch_seconds": round(held, 4),
            "streamed_over_in_memory": round(streamed / held, 3)}


def compare(runs: list[dict]) -> dict:
    """Means over the seeds' runs of one (size, layer), and per metric the seeds where the head won / tied / lost."""
    summary = {f"{who}_{metric}": float(np.mean([run[f"{who}_{metric}"] for run in runs]))
               for who in ("head", "lr") for metric in METRICS}
    for metric in METRICS:
        differences = [run[f"head_{metric}"] - run[f"lr_{metric}"] for run in runs]
        summary[f"{metric}_wins_ties_losses"] = [sum(d > 1e-12 for d in differences), sum(abs(d) <= 1e-12 for d in differences),
                                                 sum(d < -1e-12 for d in differences)]
        summary[f"head_not_below_lr_{metric}"] = summary[f"head_{metric}"] >= summary[f"lr_{metric}"] - 1e-12
    return summary


def measure_size(wh: Warehouse, *, size: int, path: Path, layers: str, threads: int, seeds: list[int]) -> dict:
    corpus = f"debian-{size}"
    ingested = ingest(wh, path, model="minilm", corpus=corpus, layers=layers, threads=threads, progress=None)
    print(f"{corpus}: embedded {ingested.embedded:,}, reused {ingested.reused:,} in {ingested.seconds:.0f}s")
    stamp = int(time.time())
    rows = []
    for layer in ingested.layers:
        runs = []
        for seed in seeds:
            fit = fit_head(wh, label=LABEL, model=ingested.model, layer=layer, corpus=corpus, seed=seed,
                           name=f"bench-{size}-{layer}-s{seed}-{stamp}", threads=threads, progress=False)
            baseline, lr_seconds = logistic_regression(wh, model=fit.model, layer=layer, pooling=fit.pooling,
                                                       corpus=corpus, seed=seed, threads=threads)
            runs.append({"seed": seed, "train": fit.train, "val": fit.val, "test": fit.test,
                         "head_accuracy": fit.accuracy, "head_macro_f1": fit.macro_f1,
                         "lr_accuracy": baseline["accuracy"], "lr_macro_f1": baseline["macro_f1"],
                         "head_train_seconds": fit.train_seconds, "lr_seconds": round(lr_seconds, 2)})
        row = {"layer": layer, **compare(runs), "runs": runs}
        rows.append(row)
        print(f"  layer {layer}: head {row['head_accuracy']:.4f} / {row['head_macro_f1']:.4f}   "
              f"LogisticRegression {row['lr_accuracy']:.4f} / {row['lr_macro_f1']:.4f}   (means over {len(seeds)} "
              f"seeds; head won/tied/lost accuracy {row['accuracy_wins_ties_losses']}, macro-F1 {row['macro_f1_wins_ties_losses']})")
    result = {"size": size, "corpus": corpus, "model": ingested.model, "seeds": seeds, "layers": rows}
    if len(rows) > 1:
        picks = []
        for seed in seeds:
            auto = fit_head(wh, label=LABEL, model=ingested.model, layer="auto", corpus=corpus, seed=seed,
                            name=f"bench-{size}-auto-s{seed}-{stamp}", threads=threads, progress=False)
            oracle = max(rows, key=lambda row: row["runs"][seeds.index(seed)]["head_accuracy"])
            picks.append({"seed": seed, "layer": auto.layer, "accuracy": auto.accuracy, "macro_f1": auto.macro_f1,
                          "seconds": auto.seconds, "best_layer_on_this_test_split": oracle["layer"],
                          "scores": auto.layer_scores})
        best = max(rows, key=lambda row: row["head_accuracy"])
        accuracy = float(np.mean([pick["accuracy"] for pick in picks]))
        result["auto"] = {"accuracy": accuracy, "macro_f1": float(np.mean([pick["macro_f1"] for pick in picks])),
                          "layers_chosen": [pick["layer"] for pick in picks],
                          "best_layer": best["layer"], "best_accuracy": best["head_accuracy"],
                          "points_below_best": round(100 * (best["head_accuracy"] - accuracy), 2),
                          "within_tolerance": 100 * (best["head_accuracy"] - accuracy) <= AUTO_TOLERANCE,
                          "runs": picks}
        print(f"  --layer auto chose layers {result['auto']['layers_chosen']}: mean test accuracy {accuracy:.4f}; "
              f"the best layer on mean test accuracy is {best['layer']} ({best['head_accuracy']:.4f})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warehouse", type=Path, default=HERE / ".warehouse")
    parser.add_argument("--sizes", default="1000,4000,10000", help="Corpus sizes in documents; 0 = the whole corpus.")
    parser.add_argument("--offset", type=int, default=10_000, help="First line (0-based) of every sample.")
    parser.add_argument("--layers", default="all", help="Layers to ingest and compare: all, last, or a list like 3,6.")
    parser.add_argument("--seeds", type=int, default=5, help="Split seeds 0..N-1 per comparison (1: one split).")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timing", action="store_true", help="Also time streamed vs in-memory epochs.")
    parser.add_argument("--name", default="fit_head", help="Results file: bench/results/NAME.json.")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    import torch

    torch.set_num_threads(1)  # as ew fit-head does: a tiny head trains fastest on one thread
    wh = Warehouse.open(args.warehouse, create=True)
    samples = args.warehouse.parent / f"{args.warehouse.name}-samples"
    samples.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        offset = 0 if size == 0 else args.offset
        path = DATA if size == 0 else corpus_file(samples, offset=offset, size=size)
        results.append(measure_size(wh, size=size or 63_666, path=path, layers=args.layers, threads=args.threads,
                                    seeds=seeds))
    targets = {
        "head_not_below_lr": all(row[f"head_not_below_lr_{metric}"] for size in results for row in size["layers"]
                                 for metric in METRICS),
        "auto_within_0.5_points": all(size["auto"]["within_tolerance"] for size in results if "auto" in size),
    }
    report = {"config": {"label": LABEL, "model": "minilm", "offset": args.offset, "threads": args.threads,
                         "layers": args.layers, "seeds": seeds, "head": "fit_head defaults"},
              "targets": targets, "sizes": results}
    if args.timing:
        last = results[-1]
        report["timing"] = timing(wh, model=last["model"], layer=last["layers"][-1]["layer"], pooling="mean",
                                  corpus=last["corpus"], batch_size=args.batch_size)
    path = save(args.name, report)
    print(f"\nMeans over split seeds {seeds[0]}..{seeds[-1]}; W/T/L: the seeds where the head beat, tied, trailed LR")
    print("| docs | layer | head acc | LR acc | acc W/T/L | head macro-F1 | LR macro-F1 | F1 W/T/L |")
    print("| ---: | ---: | ---: | ---: | :---: | ---: | ---: | :---: |")
    for size in results:
        for row in size["layers"]:
            print(f"| {size['size']:,} | {row['layer']} | {row['head_accuracy']:.3f} | {row['lr_accuracy']:.3f} | "
                  f"{'/'.join(map(str, row['accuracy_wins_ties_losses']))} | {row['head_macro_f1']:.3f} | "
                  f"{row['lr_macro_f1']:.3f} | {'/'.join(map(str, row['macro_f1_wins_ties_losses']))} |")
    for size in results:
        if "auto" in size:
            auto = size["auto"]
            print(f"{size['size']:,} docs: --layer auto chose {auto['layers_chosen']} ({auto['accuracy']:.3f}), "
                  f"best layer {auto['best_layer']} ({auto['best_accuracy']:.3f}): {auto['points_below_best']:+.2f} points")
    for target, passed in targets.items():
        print(f"{target}: {'PASS' if passed else 'FAIL'}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
