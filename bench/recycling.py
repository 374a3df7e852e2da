"""Embedding recycling: training above cached layer-K token states, beside what the cache saves.

    python -m bench.recycling [--docs 10000] [--from-layer 4] [--epochs 2] [--recompute-epochs 1]
                              [--top-epochs N] [--batch-size 16] [--threads N] [--seeds 1] [--reuse]

One run, the same documents, split, threads and machine for every row. A seeded sample of
``--docs`` labelled Debian documents (seed 0, as bench.ingest) is ingested into a fresh
warehouse (bench/.recycling/) with model minilm and ``--token-states K`` (fp16), then again
with ``--state-precision fp32`` (the vectors are reused, only the states are computed). Then,
label ``section``, split 80/10/10 by doc_hash as fit-head splits:

  1. head only      today's `ew fit-head`: the MLP head on the pooled last layer (its own default
                    epochs and early stopping)
  2. top            `ew fit-head --from-layer K --tune top` on the fp16 cache
  3. lora           `ew fit-head --from-layer K --tune lora --lora-rank 4` on the fp16 cache
  4. recompute      the same layers and head as (2), trained by the same `train_top` with layers
                    0..K-1 recomputed from token ids every step (`lower=build_lower(...)`): the
                    cost the cache saves. Timed on ``--recompute-epochs`` epochs (default 1,
                    to fit the hour): its accuracy is after those epochs only
  5. full FT        what a user would run instead: a plain transformers BertModel (its default
                    attention), mean pooling and the same MLP head, every parameter trained from
                    token ids by ew's training loop (same optimizer, rates, schedule, seed, epochs)
  6. top fp32       (2) on the fp32 cache

With ``--seeds N`` rows 2, 5 and 6 (the rows the accuracy targets compare) are trained N times,
seed s splitting and training as ``fit-head --seed s`` does, and each shows the mean over the
seeds (the per-seed figures are kept in the JSON): one split has ~1,000 test documents, and two
trainings of the same rows differ by a point or more from the training's own randomness.
Rows 1, 3 and 4 use seed 0.

``--top-epochs N`` trains rows 2 and 6 for N epochs (default: ``--epochs``), so that the accuracy
of `--tune top` can be compared with full fine-tuning at equal training time as well as at equal
epochs: an epoch above the cache costs a third of a full fine-tuning epoch, and the target
"top train s / full FT train s <= 1" says whether the comparison gave top no more time than full FT.

Rows 4 and 5 batch token ids as the cache's reader batches states: windows of WINDOW_ROWS
documents sorted by length, padded to each batch's longest, batches shuffled per epoch.
Seconds per epoch are the mean over the epochs run of the training history's `seconds`
(training plus the validation pass). Cache bytes are the stored value bytes (n_tokens x dim x
2 or 4; pooled vectors 4 x dim). Writes bench/results/recycling.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipelines.fitting import fit_head
from pipelines.ingest import ingest
from pipelines.registry import find_model
from pipelines.tuning import EVAL_BATCH, LAYER_LR
from warehouse import Warehouse
from warehouse.query import usable_cores
from warehouse.splits import SplitSpec
from warehouse.states import WINDOW_ROWS

from .common import cpu_flags, debian_records, save, write_jsonl

HERE = Path(__file__).resolve().parent
WORK = HERE / ".recycling"
LABEL = "section"


# -- the documents, as token ids ---------------------------------------------------------------
class TokenSplits:
    """The labelled documents of the warehouse as token ids, split and indexed exactly as fit-head does."""

    def __init__(self, wh: Warehouse, *, artifact: Path, max_length: int, spec: SplitSpec):
        from tokenizers import Tokenizer

        rows = wh.query(
            f"select doc_hash, cast({LABEL} as varchar) as label, any_value(text) as text from documents "
            f"where {LABEL} is not null group by doc_hash, label"
        ).read_all().to_pylist()
        self.classes = tuple(sorted({row["label"] for row in rows}))
        index = {name: y for y, name in enumerate(self.classes)}
        # ew's encoder tokenizes the same way: the artifact's tokenizer, no padding, truncated to max_length.
        tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch([row["text"] for row in rows])]
        self.n_tokens = {row["doc_hash"]: len(i) for row, i in zip(rows, ids)}
        self.splits: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
        for split in ("train", "val", "test"):
            keep = [k for k, row in enumerate(rows) if spec.split_of(row["doc_hash"]) == split]
            self.splits[split] = ([ids[k] for k in keep], np.array([index[rows[k]["label"]] for k in keep], np.int64))
        self.seed = spec.seed

    def count(self, split: str) -> int:
        return len(self.splits[split][1])

    def batches(self, split: str, *, batch_size: int, epoch: int | None = None) -> Iterator:
        """((input_ids, attention_mask, token_type_ids) (B, T) int64, y (B,)), length-bucketed like LabelledStates."""
        ids, y = self.splits[split]
        rng = None if epoch is None else np.random.default_rng([self.seed, epoch, 7])
        order = np.arange(len(y)) if rng is None else rng.permutation(len(y))
        lengths = np.array([len(i) for i in ids])
        window = batch_size * max(1, WINDOW_ROWS // batch_size)
        for start in range(0, len(order), window):
            rows = order[start : start + window]
            rows = rows[np.argsort(lengths[rows], kind="stable")]
            cuts = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
            if rng is not None:
                cuts = [cuts[i] for i in rng.permutation(len(cuts))]
            for cut in cuts:
                width = int(lengths[cut].max())
                input_ids = np.zeros((len(cut), width), np.int64)
                mask = np.zeros((len(cut), width), np.int64)
                for b, row in enumerate(cut):
                    input_ids[b, : lengths[row]] = ids[row]
                    mask[b, : lengths[row]] = 1
                yield (input_ids, mask, np.zeros_like(input_ids)), y[cut]


# -- the rows ------------------------------------------------------------------------------------
def ew_row(name: str, result, *, cache_bytes: int, documents: int, note: str) -> dict:
    card = json.loads((Path(result.path) / "head.json").read_text())
    seconds = [epoch["seconds"] for epoch in card["history"]]
    return {
        "row": name, "accuracy": result.accuracy, "macro_f1": result.macro_f1,
        "trainable_parameters": result.trainable_parameters, "seconds_per_epoch": float(np.mean(seconds)),
        "epoch_seconds": seconds, "epochs": result.epochs, "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds, "cache_bytes": cache_bytes,
        "cache_bytes_per_document": cache_bytes / documents, "rows": {"train": result.train, "val": result.val,
                                                                      "test": result.test},
        "head": result.head, "note": note,
    }


def trained_row(name: str, *, history, best_epoch: int, parameters: int, metrics, train_seconds: float,
                data: TokenSplits, note: str) -> dict:
    seconds = [epoch.seconds for epoch in history]
    return {
        "row": name, "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "trainable_parameters": parameters,
        "seconds_per_epoch": float(np.mean(seconds)), "epoch_seconds": seconds, "epochs": len(history),
        "best_epoch": best_epoch, "train_seconds": round(train_seconds, 3), "cache_bytes": 0,
        "cache_bytes_per_document": 0.0, "rows": {s: data.count(s) for s in ("train", "val", "test")},
        "history": [asdict(epoch) for epoch in history], "note": note,
    }


def recompute(data: TokenSplits, *, weights_dir: Path, from_layer: int, pooling: str, config) -> dict:
    """The top layers and head of `--tune top`, with layers 0..K-1 recomputed from token ids every step."""
    from pipelines.metrics import classification_metrics
    from pipelines.recycling import from_text, train_top
    from pipelines.top import TopConfig, build_lower
    from pipelines.training import predict_batches

    lower = build_lower(weights_dir, from_layer)
    started = time.perf_counter()
    result = train_top(
        weights_dir, top=TopConfig(from_layer=from_layer, tune="top", pooling=pooling),
        train_batches=lambda epoch: data.batches("train", batch_size=config.batch_size, epoch=epoch),
        val_batches=lambda: data.batches("val", batch_size=EVAL_BATCH),
        steps_per_epoch=-(-data.count("train") // config.batch_size), num_classes=len(data.classes),
        config=config, layer_lr=LAYER_LR, lower=lower,
    )
    seconds = time.perf_counter() - started
    y_true, y_pred = predict_batches(from_text(lower, result.module), data.batches("test", batch_size=EVAL_BATCH))
    return trained_row(
        "recompute", history=result.history, best_epoch=result.best_epoch, parameters=result.trainable_parameters,
        metrics=classification_metrics(y_true, y_pred, classes=data.classes), train_seconds=seconds, data=data,
        note=f"train_top(lower=build_lower(K={from_layer})): layers 0..{from_layer - 1} recomputed from token ids "
             f"every step, {config.epochs} epoch(s)",
    )


def full_fine_tuning(data: TokenSplits, *, weights_dir: Path, config, head) -> dict:
    """Every parameter of a plain transformers BertModel + mean pooling + the same head, from token ids."""
    import torch
    import transformers
    from transformers import BertModel

    from pipelines.heads import build_head
    from pipelines.metrics import classification_metrics
    from pipelines.top import pool
    from pipelines.training import predict_batches, train_module

    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler is reported, harmlessly
    transformers.logging.disable_progress_bar()

    class FullModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel.from_pretrained(str(weights_dir), add_pooling_layer=False)
            self.head = build_head(head)

        def forward(self, input_ids, attention_mask, token_type_ids):  # (B, T) each -> (B, C)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state  # (B, T, D)
            return self.head(pool(torch, hidden, attention_mask, "mean"))

    def groups(module):  # as train_top: the pretrained encoder at the layers' rate, the new head at lr
        return [{"params": list(module.head.parameters())}, {"params": list(module.bert.parameters()), "lr": LAYER_LR}]

    started = time.perf_counter()
    result = train_module(
        FullModel, train_batches=lambda epoch: data.batches("train", batch_size=config.batch_size, epoch=epoch),
        val_batches=lambda: data.batches("val", batch_size=EVAL_BATCH),
        steps_per_epoch=-(-data.count("train") // config.batch_size), num_classes=len(data.classes),
        config=config, param_groups=groups,
    )
    seconds = time.perf_counter() - started
    y_true, y_pred = predict_batches(result.module, data.batches("test", batch_size=EVAL_BATCH))
    implementation = result.module.bert.config._attn_implementation
    return trained_row(
        "full FT", history=result.history, best_epoch=result.best_epoch,
        parameters=sum(p.numel() for p in result.module.parameters() if p.requires_grad),
        metrics=classification_metrics(y_true, y_pred, classes=data.classes), train_seconds=seconds, data=data,
        note=f"transformers BertModel ({implementation} attention) + mean pooling + the MLP head, every parameter "
             f"trained from token ids (embeddings and layers at {LAYER_LR}, head at {config.lr})",
    )


# -- the run -------------------------------------------------------------------------------------
def over_seeds(runs: list[dict]) -> dict:
    """One row from the same row trained with several seeds: mean accuracy, macro-F1 and epoch time; each seed's kept."""
    if len(runs) == 1:
        return {**runs[0], "seeds": 1}
    seconds = [s for r in runs for s in r["epoch_seconds"]]
    return {
        **runs[0], "accuracy": float(np.mean([r["accuracy"] for r in runs])),
        "accuracy_std": float(np.std([r["accuracy"] for r in runs], ddof=1)),
        "macro_f1": float(np.mean([r["macro_f1"] for r in runs])),
        "seconds_per_epoch": float(np.mean(seconds)), "epoch_seconds": seconds, "seeds": len(runs),
        "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        "per_seed": [{"seed": seed, **{k: r[k] for k in ("accuracy", "macro_f1", "seconds_per_epoch", "train_seconds",
                                                          "best_epoch", "head") if k in r}} for seed, r in enumerate(runs)],
    }


def cache_bytes(wh: Warehouse, *, model: str, layer: int) -> dict:
    """Stored value bytes and documents per precision of the states of ``layer``."""
    rows = wh.query(
        f"select precision, count(*) as documents, sum(octet_length(states)) as bytes from token_states "
        f"where model = '{model}' and layer = {layer} group by precision"
    ).read_all().to_pylist()
    return {row["precision"]: {"documents": row["documents"], "bytes": int(row["bytes"])} for row in rows}


def target(name: str, value: float, goal: str, passed: bool) -> dict:
    return {"target": name, "value": round(value, 4), "goal": goal, "pass": bool(passed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--from-layer", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of rows 2-6 (early stopping as fit-head's)")
    parser.add_argument("--top-epochs", type=int, default=None,
                        help="epochs of rows top and top fp32 (default: --epochs); more compares at equal time")
    parser.add_argument("--recompute-epochs", type=int, default=1, help="epochs of the recompute row (its timing)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--seeds", type=int, default=1, help="seeds of rows top, full FT and top fp32 (mean shown)")
    parser.add_argument("--reuse", action="store_true", help="keep bench/.recycling's warehouse (ingest reuses it)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    args.top_epochs = args.epochs if args.top_epochs is None else args.top_epochs
    if min(args.epochs, args.top_epochs, args.recompute_epochs) < 1:
        parser.error("--epochs, --top-epochs and --recompute-epochs must be at least 1")

    import onnxruntime
    import torch

    from pipelines.heads import HeadConfig
    from pipelines.training import TrainConfig

    flags = cpu_flags()
    print(f"CPU: {flags['model']}; {flags['usable_cores']} usable cores; torch {torch.__version__} "
          f"(capability {flags['torch_capability']}), onnxruntime {onnxruntime.__version__}")
    print(f"CPU flags: {' '.join(flags['vector_flags'])}")
    print(f"threads: onnxruntime {args.threads}, torch {args.threads} (rows 2-6; fit-head's plain head uses 1)")

    warehouse_dir = WORK / "warehouse"
    if not args.reuse and warehouse_dir.exists():
        shutil.rmtree(warehouse_dir)
    WORK.mkdir(parents=True, exist_ok=True)
    records = [r for r in debian_records(limit=args.docs, seed=0) if r.get(LABEL)]
    corpus = write_jsonl(records, WORK / f"debian-{len(records)}.jsonl")
    wh = Warehouse.open(warehouse_dir, create=True)
    K = args.from_layer

    ingests = {}
    for precision in ("fp16", "fp32"):
        done = ingest(wh, corpus, model="minilm", token_states=K, state_precision=precision, threads=args.threads,
                      progress=False)
        ingests[precision] = {**done.to_dict(), "states_bytes_per_document": done.states_bytes_per_document}
        print(f"ingest --token-states {K} --state-precision {precision}: embedded {done.embedded:,}, reused "
              f"{done.reused:,}, states cached {done.states_cached:,} ({done.states_bytes_per_document / 1e3:.1f} KB "
              f"per document) in {done.seconds:.0f}s")
    row = find_model(wh, "minilm")
    artifact = wh.root / row.artifact
    cached = cache_bytes(wh, model=row.model, layer=K)
    data = TokenSplits(wh, artifact=artifact, max_length=row.max_length, spec=SplitSpec())
    # Rows 4 and 5 read token ids: they must be the tokens whose states are cached.
    stored_tokens = {r["doc_hash"]: r["n_tokens"] for r in wh.query(
        f"select doc_hash, n_tokens from token_states where model = '{row.model}' and layer = {K} "
        "and precision = 'fp16'").read_all().to_pylist()}
    mismatched = sum(stored_tokens.get(h) != n for h, n in data.n_tokens.items())
    if mismatched:
        raise SystemExit(f"{mismatched} documents tokenize to other lengths than their cached states")
    documents = len(data.n_tokens)
    print(f"{documents:,} labelled texts ({len(data.classes)} classes): train {data.count('train'):,}, "
          f"val {data.count('val'):,}, test {data.count('test'):,}; token ids match the cache's n_tokens")

    rows = []
    stamp = int(time.time())

    def fit(name: str, seed: int = 0, **options):
        started = time.perf_counter()
        result = fit_head(wh, label=LABEL, model=row.model, name=f"bench-{name.replace(' ', '-')}-{seed}-{stamp}",
                          threads=args.threads, seed=seed, **options)
        print(f"  {name} (seed {seed}): {result.accuracy:.4f} in {time.perf_counter() - started:.0f}s", flush=True)
        return result

    vector_bytes = documents * row.dim * 4
    head_only = fit("head only")
    rows.append(ew_row("head only", head_only, cache_bytes=vector_bytes, documents=documents,
                       note=f"ew fit-head: the default head on pooled layer {row.num_layers} (up to 30 epochs, "
                            "early stopping, 1 torch thread)"))
    tuned = dict(from_layer=K, epochs=args.epochs, batch_size=args.batch_size)
    seeded: dict[str, list[dict]] = {"top": [], "full FT": [], "top fp32": []}

    def top_row(name: str, seed: int, precision: str) -> dict:
        result = fit(name, seed, **{**tuned, "epochs": args.top_epochs}, tune="top", state_precision=precision)
        return ew_row(name, result, cache_bytes=cached[precision]["bytes"], documents=documents,
                      note=f"ew fit-head --from-layer {K} --tune top --state-precision {precision} "
                           f"--epochs {args.top_epochs}")

    seeded["top"].append(top_row("top", 0, "fp16"))
    result = fit("lora", **tuned, tune="lora", lora_rank=4, state_precision="fp16")
    lora = ew_row("lora", result, cache_bytes=cached["fp16"]["bytes"], documents=documents,
                  note=f"ew fit-head --from-layer {K} --tune lora --lora-rank 4 (fp16 cache)")

    torch.set_num_threads(args.threads)  # as fit-head above layer K
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)  # fit-head's defaults otherwise
    weights_dir = artifact / "torch"
    started = time.perf_counter()
    again = recompute(data, weights_dir=weights_dir, from_layer=K, pooling=row.pooling,
                      config=TrainConfig(epochs=args.recompute_epochs, batch_size=args.batch_size))
    print(f"  recompute: {again['accuracy']:.4f} in {time.perf_counter() - started:.0f}s", flush=True)
    head = HeadConfig(kind=config.kind, input_dim=row.dim, num_classes=len(data.classes), hidden=config.hidden,
                      dropout=config.dropout, activation=config.activation)
    for seed in range(args.seeds):
        if seed:
            seeded["top"].append(top_row("top", seed, "fp16"))
        seed_data = data if seed == 0 else TokenSplits(wh, artifact=artifact, max_length=row.max_length,
                                                        spec=SplitSpec(seed=seed))
        started = time.perf_counter()
        seeded["full FT"].append(full_fine_tuning(seed_data, weights_dir=weights_dir,
                                                  config=replace(config, seed=seed), head=head))
        print(f"  full FT (seed {seed}): {seeded['full FT'][-1]['accuracy']:.4f} in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        seeded["top fp32"].append(top_row("top fp32", seed, "fp32"))
    rows.extend([over_seeds(seeded["top"]), lora, again, over_seeds(seeded["full FT"]), over_seeds(seeded["top fp32"])])

    by = {r["row"]: r for r in rows}
    top, full, again = by["top"], by["full FT"], by["recompute"]
    targets = [
        target("top - head only (points)", 100 * (top["accuracy"] - by["head only"]["accuracy"]), ">= 5",
               100 * (top["accuracy"] - by["head only"]["accuracy"]) >= 5),
        target("full FT - top (points)", 100 * (full["accuracy"] - top["accuracy"]), "<= 1",
               100 * (full["accuracy"] - top["accuracy"]) <= 1),
        target("top train s / full FT train s", top["train_seconds"] / full["train_seconds"], "<= 1",
               top["train_seconds"] <= full["train_seconds"]),
        target("full FT epoch / top epoch", full["seconds_per_epoch"] / top["seconds_per_epoch"], ">= 2",
               full["seconds_per_epoch"] / top["seconds_per_epoch"] >= 2),
        target("recompute epoch / top epoch", again["seconds_per_epoch"] / top["seconds_per_epoch"], ">= 1.5",
               again["seconds_per_epoch"] / top["seconds_per_epoch"] >= 1.5),
        target("|fp16 - fp32| (points)", 100 * abs(top["accuracy"] - by["top fp32"]["accuracy"]), "<= 0.3",
               100 * abs(top["accuracy"] - by["top fp32"]["accuracy"]) <= 0.3),
    ]
    if args.seeds > 1:
        print("per seed (test accuracy):")
        for name in seeded:
            print(f"  {name:<9} " + "  ".join(f"{r['accuracy']:.4f}" for r in seeded[name]))

    path = save("recycling", {
        "config": {"label": LABEL, "docs": len(records), "labelled_texts": documents, "sample": "debian_records seed 0",
                   "model": row.model, "max_tokens": row.max_length, "from_layer": K, "epochs": args.epochs,
                   "top_epochs": args.top_epochs,
                   "recompute_epochs": args.recompute_epochs, "batch_size": args.batch_size, "lr": config.lr,
                   "layer_lr": LAYER_LR, "seeds": list(range(args.seeds)), "patience": config.patience, "split": "80,10,10",
                   "threads": {"onnxruntime": args.threads, "torch": args.threads, "head_only_torch": 1},
                   "reused_warehouse": args.reuse},
        "cpu": flags,
        "ingest": ingests,
        "cache": cached,
        "rows": rows,
        "targets": targets,
        "load_average": list(__import__("os").getloadavg()),
    })
    print_table(rows, targets, documents=documents, args=args)
    print(f"written to {path}")


def print_table(rows: list[dict], targets: list[dict], *, documents: int, args) -> None:
    print(f"\nsection on {documents:,} Debian texts, minilm, from layer {args.from_layer}, batch {args.batch_size}, "
          f"{args.threads} threads" + (f"; top, full FT and top fp32: mean of {args.seeds} seeds" if args.seeds > 1 else ""))
    print(f"{'row':<10} {'test acc':>8} {'macro-F1':>8} {'trainable':>11} {'s/epoch':>8} {'epochs':>6} "
          f"{'train s':>8} {'cache bytes':>13} {'per doc':>9}")
    for r in rows:
        print(f"{r['row']:<10} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['trainable_parameters']:>11,} "
              f"{r['seconds_per_epoch']:>8.2f} {r['epochs']:>6} {r['train_seconds']:>8.0f} {r['cache_bytes']:>13,} "
              f"{r['cache_bytes_per_document']:>9,.0f}")
    for r in rows:
        print(f"  {r['row']}: {r['note']}")
    print("targets:")
    for t in targets:
        print(f"  {t['target']:<30} {t['value']:>8.3f}  goal {t['goal']:<7} {'PASS' if t['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
