"""`ew` commands for heads: fit-head, heads, heads rm, predict, export-head."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from warehouse.formats import write_records

from .cli_options import ROW_FORMATS, LayerOrAuto, chosen_format, format_options, warehouse_of


@click.command("fit-head")
@click.option("--label", required=True, help="Field of documents to predict (e.g. section).")
@click.option("--model", "-m", help="Registered model key, unique key prefix or alias (default: the only model stored).")
@click.option("--layer", type=LayerOrAuto(), help="Layer whose vectors to train on (default: the last), or auto: the best of the stored layers on validation.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), help="Pooling of the model's vectors (default: the model's).")
@click.option("--corpus", help="Only documents of this corpus.")
@click.option("--where", help="Only documents matching this SQL condition on documents, e.g. \"priority = 'optional'\".")
@click.option("--head", "kind", type=click.Choice(["ensemble", "mlp", "linear"]), help="Head kind (default: ensemble, an mlp and a linear head averaged; mlp with --from-layer).")
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True, help="MLP hidden width.")
@click.option("--epochs", type=click.IntRange(min=1), help="At most; early stopping on the --select score. Default: 30, or 3 with --from-layer.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per step. Default: 64, or 16 with --from-layer.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate. Default: 1e-2, or 1e-3 with --from-layer.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-5, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=10, show_default=True, help="Epochs without a better validation score before stopping.")
@click.option("--standardize/--no-standardize", default=True, show_default=True, help="Scale inputs by the training split's mean and std (folded into the saved weights).")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True, help="balanced: every class weighs the same in the loss, whatever its size.")
@click.option("--select", type=click.Choice(["macro_f1", "loss"]), default="macro_f1", show_default=True, help="Keep the epoch with the best validation macro-F1, or the lowest validation loss.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the shuffling and the weights.")
@click.option("--split", default="80,10,10", show_default=True, help="train,val,test percentages.")
@click.option("--name", help="Head name (default: LABEL-TIMESTAMP).")
@click.option("--version", "version", type=click.IntRange(min=0), help="Train on this warehouse version (embeds nothing).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all usable cores).")
@click.option("--from-layer", type=LayerOrAuto(), help="Train the encoder layers above K too, on the cached layer-K token states (K, or auto).")
@click.option("--tune", type=click.Choice(["top", "lora"]), default="top", show_default=True, help="With --from-layer: train every parameter of those layers, or LoRA adapters.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=4, show_default=True, help="With --tune lora.")
@click.option("--state-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="With --from-layer: which cached states to read.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress of the epochs on stderr.")
@click.pass_context
def fit_head(ctx: click.Context, as_json: bool, quiet: bool, **options) -> None:
    """Train a tiny classifier head on stored embeddings (embedding only what is missing), or with
    --from-layer K the layers above K as well, on cached token states.

    Example: ew fit-head --label section --model minilm
    """
    from .fitting import fit_head as run_fit

    result = run_fit(warehouse_of(ctx), progress=False if quiet else None, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if result.layer_scores and result.tune == "head":
        for layer, score in sorted(result.layer_scores.items()):
            click.echo(f"--layer auto: layer {layer}: validation accuracy {score['val_accuracy']:.4f}, "
                       f"macro-F1 {score['val_macro_f1']:.4f}" + ("  <- chosen" if layer == result.layer else ""))
    elif result.layer_scores:
        scores = ", ".join(f"layer {k}: {v:.4f}" for k, v in sorted(result.layer_scores.items()))
        click.echo(f"--from-layer auto: validation accuracy after one epoch: {scores}; chose layer {result.from_layer}")
    trained = (f"{result.kind} on {result.model} layer {result.layer}" if result.tune == "head" else
               f"{result.tune} of the layers above {result.layer} of {result.model} + {result.kind} head "
               f"({result.trainable_parameters:,} trainable parameters)")
    click.echo(f"head {result.head}: {trained}, label {result.label!r} ({len(result.classes)} classes)")
    click.echo(
        f"rows: train {result.train:,}, val {result.val:,}, test {result.test:,}; missing label {result.missing_label:,}; "
        f"vectors reused {result.reused:,}, embedded {result.embedded:,}"
    )
    if result.no_vector:
        click.echo(f"{result.no_vector:,} labelled texts have no vector at version {result.version} and were left out")
    if result.rare_classes:
        shown = ", ".join(result.rare_classes[:8]) + (" ..." if len(result.rare_classes) > 8 else "")
        click.echo(f"{len(result.rare_classes)} classes are too small to appear in every split: {shown}")
    click.echo(
        f"test accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f}; "
        f"{result.epochs} epochs (best {result.best_epoch}) in {result.train_seconds:.1f}s, {result.seconds:.1f}s in all"
    )
    tested = [c for c in result.metrics["per_class"] if c["support"] > 0]
    worst = sorted(tested, key=lambda c: c["f1"])[:5]
    click.echo("weakest classes: " + ", ".join(f"{c['label']} (P {c['precision']:.2f} R {c['recall']:.2f})" for c in worst))
    click.echo(f"stored at {result.path} (trained on warehouse version {result.version})")
    click.echo(f"report: {result.report}")

@click.group(invoke_without_command=True)
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version.")
@format_options(ROW_FORMATS, help="table (default), csv, json (one array) or nl (one object per line).")
@click.pass_context
def heads(ctx: click.Context, version: int | None, fmt: str | None) -> None:
    """List the heads trained in this warehouse (`ew heads rm NAME` removes one).

    Example: ew heads
    """
    if ctx.invoked_subcommand is not None:
        return
    from .head_catalog import list_heads

    rows = list_heads(warehouse_of(ctx), version=version)
    fmt = chosen_format(ctx, fmt) or "table"
    if fmt != "table":
        write_records([row.summary() for row in rows], fmt=fmt, stdout=sys.stdout)
        return
    for row in rows:
        click.echo(
            f"{row.head:<32} {row.label:<12} {row.kind:<12} {row.model} layer {row.layer:<3} "
            f"acc {row.accuracy:.4f} macro-F1 {row.macro_f1:.4f} ({len(row.classes)} classes, v{row.trained_on_version})"
        )

@click.command("export-head")
@click.argument("head")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write (tokenizer.json goes beside it).")
@click.pass_context
def export_head(ctx: click.Context, head: str, output: Path) -> None:
    """Write a head, of any kind, as one ONNX graph from token ids to class probabilities
    (encoder + trained layers + head), checked against torch, with its tokenizer beside it.

    Example: ew export-head section-20261122-101500-3f2a --output serve/section.onnx
    """
    from .head_export import export_registered_head

    report = export_registered_head(warehouse_of(ctx), head, output=output)
    click.echo(f"wrote {report.path} ({report.onnx_bytes / 1e6:.1f} MB, {len(report.classes)} classes; max |onnx - torch| "
               f"{report.max_abs_diff:.2g}) and {report.tokenizer}")

@heads.command("rm")
@click.argument("name")
@click.pass_context
def heads_rm(ctx: click.Context, name: str) -> None:
    """Remove a head from the catalog, as one new version (older versions still list it).

    Example: ew heads rm section-20261122-101500-3f2a
    """
    from .head_catalog import remove_head

    version = remove_head(warehouse_of(ctx), name)
    click.echo(f"removed head {name} (warehouse version {version}; its files stay for readers of older versions)")

@click.command()
@click.argument("head")
@click.argument("corpus_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--where", help="Predict stored documents matching this SQL condition instead of a corpus file.")
@click.option("--version", "version", type=click.IntRange(min=0), help="With --where: read this warehouse version (embeds nothing).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="A .parquet or .csv file.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--id-field", default="id", show_default=True)
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On a bad line: stop, or skip it and write it to a rejects file.")
@click.option("--rejects", "rejects_file", type=click.Path(dir_okay=False, path_type=Path), help="Where --on-error skip writes bad lines (default: OUTPUT.rejects.jsonl).")
@click.option("--threads", type=click.IntRange(min=1), help="Inference threads (default: all usable cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def predict(ctx: click.Context, head: str, corpus_file: Path | None, as_json: bool, **options) -> None:
    """Apply a head to a corpus file (or stored documents) and write predictions with probabilities.

    Example: ew predict section-20261122-101500 new_packages.jsonl --output predictions.parquet
    """
    from .prediction import predict as run_predict

    result = run_predict(warehouse_of(ctx), head, corpus_file=corpus_file, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(
        f"wrote {result.rows:,} predictions of {result.head} to {result.output} "
        f"(vectors reused {result.reused:,}, embedded {result.embedded:,}; warehouse version {result.version})"
    )
    if result.rejected:
        click.echo(f"skipped {result.rejected:,} bad lines of {corpus_file}, written to {result.rejects_file}")
