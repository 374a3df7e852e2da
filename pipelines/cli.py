"""The `ew` command line: each command parses, calls one library function and prints."""
from __future__ import annotations

import ctypes
import json
import sys
import traceback
from pathlib import Path

import click
import pyarrow.compute as pc

from warehouse import EwError, Warehouse
from warehouse.formats import FORMATS, format_for, write_result, written_in_place
from warehouse.query import memory_cap
from warehouse.store import DEFAULT_PATH, ENV_VAR

M_ARENA_MAX = -8  # glibc's mallopt parameter number


class _Group(click.Group):
    """The one error boundary: EwError -> `Error: ...` on stderr, exit 1; --debug shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EwError as error:
            if ctx.params.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {error}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo(
                "Interrupted: every version committed before the interrupt is kept; run the same command again to continue.",
                err=True,
            )
            ctx.exit(130)


class _LayerOrAuto(click.ParamType):
    name = "K|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            layer = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a layer number or 'auto'", param, ctx)
        if layer < 0:
            self.fail(f"{value!r} is below 0", param, ctx)
        return layer


def _warehouse(ctx: click.Context, *, create: bool = False) -> Warehouse:
    return Warehouse.open(ctx.obj["warehouse"], create=create)


@click.group(cls=_Group)
@click.option(
    "-w", "--warehouse", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_VAR, default=DEFAULT_PATH,
    show_default=True, help=f"The warehouse directory (or set ${ENV_VAR}).",
)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="ew")
@click.pass_context
def cli(ctx: click.Context, warehouse: Path, debug: bool) -> None:
    """ew, the embedding warehouse: run the encoder once per document, keep every layer's
    vectors in Delta Lake tables, and train tiny heads on them in seconds.

    Example: ew ingest corpus.jsonl --model minilm && ew query "select count(*) from embeddings"
    """
    ctx.ensure_object(dict)
    ctx.obj["warehouse"] = warehouse
    ctx.obj["debug"] = debug


@cli.command()
@click.argument("corpus_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", default="minilm", show_default=True, help="Alias (see `ew models --available`), Hugging Face id, local directory, or registered model key.")
@click.option("--corpus", help="Corpus name in `documents` (default: the file name without extensions).")
@click.option("--text-field", default="text", show_default=True, help="JSON field holding the text.")
@click.option("--id-field", default="id", show_default=True, help="JSON field holding the record id; missing ids are derived from the line.")
@click.option("--layers", default="all", show_default=True, help="Layers to store: all, last, or a list like 0,3,6.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), help="Pooling of a newly exported model (default: mean; a registered model keeps its own).")
@click.option("--max-length", type=click.IntRange(min=1), help="Token limit; longer texts are truncated and counted. Default: the model's.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Records per commit.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On a bad line: stop, or skip it and write it to a rejects file.")
@click.option("--rejects", "rejects_file", type=click.Path(dir_okay=False, path_type=Path), help="Where --on-error skip writes bad lines (default: WAREHOUSE/rejects/CORPUS-TIME.jsonl).")
@click.option("--threads", type=click.IntRange(min=1), help="Inference threads (default: all usable cores).")
@click.option("--token-states", type=click.IntRange(min=0), metavar="K", help="Also cache layer K's hidden states of every token (0 = embedding output), once per document, in `token_states`.")
@click.option("--state-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="How --token-states are stored.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def ingest(ctx: click.Context, corpus_file: Path, as_json: bool, **options) -> None:
    """Embed every document of a JSONL (or .jsonl.gz) corpus that is not stored yet.

    Example: ew ingest examples/debian_sample.jsonl --model minilm
    """
    from .ingest import ingest as run_ingest

    result = run_ingest(_warehouse(ctx, create=True), corpus_file, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(
        f"{result.corpus}: read {result.read:,}, new documents {result.new_documents:,}, updated {result.updated_documents:,}; "
        f"embedded {result.embedded:,}, reused {result.reused:,}, duplicates {result.duplicates:,}, "
        f"rejected {result.rejected:,}, truncated {result.truncated:,} in {result.seconds:.1f}s"
    )
    click.echo(f"model {result.model}, layers {','.join(map(str, result.layers))}; warehouse version {result.version}")
    if result.token_states is not None:
        click.echo(
            f"token states of layer {result.token_states} ({result.state_precision}): cached {result.states_cached:,} "
            f"documents, {result.states_bytes_per_document / 1e3:,.1f} KB per document (mean), "
            f"{result.states_bytes / 1e6:,.1f} MB in all"
        )
    if result.duplicate_ids:
        click.echo(f"{result.duplicate_ids:,} records repeat an earlier record's id (ids are compared as text: "
                   "1 and \"1\" are the same id); the last one of each id was kept")
    if result.recovered:
        click.echo(f"made {result.recovered:,} rows of an interrupted earlier run visible first (a 'recover' version)")
    if result.rejects_file:
        click.echo(f"rejected lines written to {result.rejects_file}")


@cli.command()
@click.argument("sql")
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version (see `ew log`).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format (default: table, or from --output's extension).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop the query after this many seconds.")
@click.pass_context
def query(ctx: click.Context, sql: str, version: int | None, fmt: str | None, output: Path | None,
          timeout: float | None) -> None:
    """Run one read-only SQL SELECT (DuckDB) over the tables documents, embeddings, models, heads, token_states.

    Example: ew query "select model, layer, count(*) from embeddings group by all order by all"
    """
    chosen = format_for(output, fmt)
    try:
        with memory_cap(), _warehouse(ctx).query(sql, version=version, timeout=timeout) as result:
            rows = write_result(result.reader, fmt=chosen, output=output, stdout=sys.stdout)
    except KeyboardInterrupt:
        unwritten = f"; {output} was not written" if output is not None else ""
        click.echo(f"Interrupted: the query was stopped{unwritten}.", err=True)
        ctx.exit(130)
    if output is not None:
        where = f"{output}, in place (not a regular file)" if written_in_place(output) else str(output)
        click.echo(f"wrote {rows:,} rows to {where} (warehouse version {result.version})", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@click.pass_context
def log(ctx: click.Context, as_json: bool) -> None:
    """List the warehouse's versions: number, time, operation, rows added, the Delta version of
    each table it pins (for readers that time-travel without ew), and details.

    Example: ew log
    """
    entries = _warehouse(ctx).log()
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.to_dict()))
        return
    tables = list(entries[0].pins) if entries else []
    pins_title = "pins (" + "/".join(tables) + ")" if tables else "pins"
    click.echo(f"{'version':>7}  {'committed at (UTC)':<19}  {'operation':<14}  {'rows added':>10}  {pins_title}  detail")
    for entry in entries:
        pins = "/".join("-" if entry.pins[t] < 0 else str(entry.pins[t]) for t in tables).ljust(len(pins_title))
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items())
        click.echo(
            f"{entry.version:>7}  {entry.committed_at:%Y-%m-%d %H:%M:%S}  {entry.operation:<14}  {entry.rows_added:>10,}  "
            f"{pins}  {detail}"
        )


@cli.command()
@click.option("--available", is_flag=True, help="List the aliases ew knows and whether their weights are installed.")
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.pass_context
def models(ctx: click.Context, available: bool, version: int | None, as_json: bool) -> None:
    """List the models registered in the warehouse (or, with --available, the aliases).

    Example: ew models --available
    """
    if available:
        from .models import available_models

        rows = available_models()
        for row in rows:
            if as_json:
                click.echo(json.dumps(row))
            else:
                state = f"installed at {row['path']}" if row["installed"] else "not installed"
                click.echo(f"{row['alias']:<10} {row['hf_id']:<42} {state}")
        return
    for row in _warehouse(ctx).models(version=version):
        if as_json:
            click.echo(json.dumps(row.to_dict(), default=str))
        else:
            click.echo(
                f"{row.model:<32} dim {row.dim:<5} layers 0..{row.num_layers:<3} {row.pooling:<5} "
                f"max_length {row.max_length:<5} {row.precision}  from {row.source}"
            )


@cli.command("fit-head")
@click.option("--label", required=True, help="Field of documents to predict (e.g. section).")
@click.option("--model", "-m", help="Registered model key, unique key prefix or alias (default: the only model stored).")
@click.option("--layer", type=click.IntRange(min=0), help="Layer whose vectors to train on (default: the last).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), help="Pooling of the model's vectors (default: the model's).")
@click.option("--corpus", help="Only documents of this corpus.")
@click.option("--where", help="Only documents matching this SQL condition on documents, e.g. \"priority = 'optional'\".")
@click.option("--head", "kind", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True, help="MLP hidden width.")
@click.option("--epochs", type=click.IntRange(min=1), help="At most; early stopping on validation loss. Default: 30, or 3 with --from-layer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-5, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True, help="Epochs without a better validation loss before stopping.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the shuffling and the weights.")
@click.option("--split", default="80,10,10", show_default=True, help="train,val,test percentages.")
@click.option("--name", help="Head name (default: LABEL-TIMESTAMP).")
@click.option("--version", "version", type=click.IntRange(min=0), help="Train on this warehouse version (embeds nothing).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all usable cores).")
@click.option("--from-layer", type=_LayerOrAuto(), help="Train the encoder layers above K too, on the cached layer-K token states (K, or auto).")
@click.option("--tune", type=click.Choice(["top", "lora"]), default="top", show_default=True, help="With --from-layer: train every parameter of those layers, or LoRA adapters.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=4, show_default=True, help="With --tune lora.")
@click.option("--state-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="With --from-layer: which cached states to read.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def fit_head(ctx: click.Context, as_json: bool, **options) -> None:
    """Train a tiny classifier head on stored embeddings (embedding only what is missing), or with
    --from-layer K the layers above K as well, on cached token states.

    Example: ew fit-head --label section --model minilm
    """
    from .fitting import fit_head as run_fit

    result = run_fit(_warehouse(ctx), **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if result.layer_scores:
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


@cli.group(invoke_without_command=True)
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per head.")
@click.pass_context
def heads(ctx: click.Context, version: int | None, as_json: bool) -> None:
    """List the heads trained in this warehouse (`ew heads rm NAME` removes one).

    Example: ew heads
    """
    if ctx.invoked_subcommand is not None:
        return
    from .head_catalog import list_heads

    for row in list_heads(_warehouse(ctx), version=version):
        if as_json:
            click.echo(json.dumps(row.summary()))
        else:
            click.echo(
                f"{row.head:<32} {row.label:<12} {row.kind:<6} {row.model} layer {row.layer:<3} "
                f"acc {row.accuracy:.4f} macro-F1 {row.macro_f1:.4f} ({len(row.classes)} classes, v{row.trained_on_version})"
            )


@cli.command("export-head")
@click.argument("head")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write (tokenizer.json goes beside it).")
@click.pass_context
def export_head(ctx: click.Context, head: str, output: Path) -> None:
    """Write a head, of any kind, as one ONNX graph from token ids to class probabilities
    (encoder + trained layers + head), checked against torch, with its tokenizer beside it.

    Example: ew export-head section-20261122-101500-3f2a --output serve/section.onnx
    """
    from .head_export import export_registered_head

    report = export_registered_head(_warehouse(ctx), head, output=output)
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

    version = remove_head(_warehouse(ctx), name)
    click.echo(f"removed head {name} (warehouse version {version}; its files stay for readers of older versions)")


@cli.command()
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

    result = run_predict(_warehouse(ctx), head, corpus_file=corpus_file, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(
        f"wrote {result.rows:,} predictions of {result.head} to {result.output} "
        f"(vectors reused {result.reused:,}, embedded {result.embedded:,}; warehouse version {result.version})"
    )
    if result.rejected:
        click.echo(f"skipped {result.rejected:,} bad lines of {corpus_file}, written to {result.rejects_file}")


@cli.command()
@click.argument("text")
@click.option("--model", "-m", help="Registered model key, unique key prefix or alias (default: the only model stored).")
@click.option("--layer", type=click.IntRange(min=0), help="Layer whose vectors to compare (default: the last).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many documents to show.")
@click.option("--corpus", help="Only documents of this corpus.")
@click.option("--where", help="Only documents matching this SQL condition on documents, e.g. \"section = 'python'\".")
@click.option("--version", "version", type=click.IntRange(min=0), help="Search this warehouse version.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all usable cores).")
@click.pass_context
def search(ctx: click.Context, text: str, fmt: str, as_json: bool, **options) -> None:
    """Find the stored documents nearest TEXT by cosine similarity (TEXT is embedded with the same model).

    Example: ew search "python bindings for a C library" -k 5 --where "section = 'python'"
    """
    from .search import search as run_search

    found = run_search(_warehouse(ctx), text, **options)
    fmt = "json" if as_json else fmt
    table = found.table()
    if fmt == "table":  # for reading: 4 decimals, no hash
        table = table.drop_columns(["doc_hash"]).set_column(1, "score", pc.round(table.column("score"), 4))
    write_result(table.to_reader(), fmt=fmt, output=None, stdout=sys.stdout)


@cli.command()
@click.option("--version", "version", type=click.IntRange(min=0), help="Describe this warehouse version.")
@click.option("--json", "as_json", is_flag=True, help="Print it as one JSON object.")
@click.pass_context
def info(ctx: click.Context, version: int | None, as_json: bool) -> None:
    """What the warehouse holds: documents per corpus, vectors and token states per model/layer,
    files and bytes per table, and its versions.

    Example: ew info
    """
    from warehouse.summary import summarize

    summary = summarize(_warehouse(ctx), version=version)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    for line in _summary_lines(summary):
        click.echo(line)


def _summary_lines(summary) -> list[str]:
    """`ew info`'s text: one block per kind of thing, numbers aligned."""
    when = "never" if summary.committed_at is None else f"{summary.committed_at:%Y-%m-%d %H:%M:%S} UTC"
    lines = [f"warehouse {summary.root}: version {summary.version} of {summary.latest_version} "
             f"({summary.versions:,} versions), committed {when}; {_size(summary.bytes)} in all"]
    lines.append(f"{'corpus':<24} {'documents':>10} {'texts':>10}  labelled fields")
    for c in summary.corpora:
        fields = ", ".join(f"{name} {n:,}" for name, n in c.labelled.items()) or "-"
        lines.append(f"{c.corpus:<24} {c.documents:>10,} {c.texts:>10,}  {fields}")
    lines.append(f"{'model':<32} {'layer':>5} {'pooling':<7} {'vectors':>10} {'on disk':>10}")
    for v in summary.vectors:
        lines.append(f"{v.model:<32} {v.layer:>5} {v.pooling:<7} {v.vectors:>10,} {_size(v.bytes):>10}")
    if summary.token_states:
        lines.append(f"{'token states of model':<32} {'layer':>5} {'prec.':<7} {'documents':>10} {'on disk':>10}")
        for s in summary.token_states:
            lines.append(f"{s.model:<32} {s.layer:>5} {s.precision:<7} {s.documents:>10,} {_size(s.bytes):>10}")
    lines.append(f"{'table':<14} {'delta version':>13} {'files':>7} {'on disk':>10}")
    for name, t in summary.tables.items():
        lines.append(f"{name:<14} {t.delta_version if t.delta_version >= 0 else '-':>13} {t.files:>7,} {_size(t.bytes):>10}")
    return lines


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return ""


@cli.command("export")
@click.option("--label", required=True, help="Field of documents to export as the label (e.g. section).")
@click.option("--model", "-m", help="Registered model key, unique key prefix or alias (default: the only model stored).")
@click.option("--layer", type=click.IntRange(min=0), help="Layer whose vectors to export (default: the last).")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="all", show_default=True)
@click.option("--split-sizes", default="80,10,10", show_default=True, help="train,val,test percentages (fit-head's --split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, as in fit-head.")
@click.option("--corpus", help="Only documents of this corpus.")
@click.option("--where", help="Only documents matching this SQL condition on documents.")
@click.option("--version", "version", type=click.IntRange(min=0), help="Export this warehouse version.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .parquet file to write.")
@click.pass_context
def export(ctx: click.Context, model: str | None, split_sizes: str, seed: int, output: Path, **options) -> None:
    """Write a training set: doc_hash, the label, the split (fit-head's rule) and the vector as
    FixedSizeList<float32>[dim], streamed to one Parquet file.

    Example: ew export --label section --split train --output train.parquet
    """
    from warehouse.splits import SplitSpec
    from warehouse.training_set import write_training_set

    from .registry import find_model

    warehouse = _warehouse(ctx)
    key = find_model(warehouse, model).model
    reader = warehouse.training_set(model=key, spec=SplitSpec.parse(split_sizes, seed=seed), **options)
    rows = write_training_set(reader, output)
    version = reader.schema.metadata[b"ew.warehouse_version"].decode()
    click.echo(f"wrote {rows:,} rows ({reader.schema.field('embedding').type}) to {output} (warehouse version {version})",
               err=True)


@cli.command()
@click.option("--deep", is_flag=True, help="Also read every row: unique keys, vector widths and layers, document hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def verify(ctx: click.Context, deep: bool, as_json: bool) -> None:
    """Check that every file the latest version pins exists and reads, and every model and head loads.

    Prints one line per problem (where: what; what to do) and exits 1, or a summary and exits 0.

    Example: ew verify --deep
    """
    from .integrity import verify as run_verify

    report = run_verify(_warehouse(ctx), deep=deep)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            click.echo(problem.line())
        click.echo(report.summary())
    if not report.ok:
        ctx.exit(1)


def main() -> None:
    _limit_malloc_arenas()
    cli(prog_name="ew")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each new thread a heap of its own; batches made in fit-head's prefetch thread
    and freed in the training thread then fragment them, and RSS creeps up by ~100 MB over the
    epochs. Two heaps are plenty for ew, whose heavy allocations go to DuckDB's and Arrow's own
    allocators. Process-wide, so only the `ew` command sets it, never the library."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


if __name__ == "__main__":
    main()
