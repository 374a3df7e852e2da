"""`ew` commands over the data: ingest, query, log, models, search, info, export, verify."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pyarrow.compute as pc

from warehouse.formats import FORMATS, format_for, write_records, write_result
from warehouse.output import written_in_place
from warehouse.query import memory_cap

from .cli_options import ROW_FORMATS, chosen_format, format_options, size_text, warehouse_of, warehouse_path
from .models import PRECISIONS
from .precision import PRECISION_GUARD


@click.command()
@click.argument("corpus_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", default="minilm", show_default=True, help="Alias (see `ew models --available`), Hugging Face id, local directory, or registered model key.")
@click.option("--corpus", help="Corpus name in `documents` (default: the file name without extensions).")
@click.option("--text-field", default="text", show_default=True, help="JSON field holding the text.")
@click.option("--id-field", default="id", show_default=True, help="JSON field holding the record id; missing ids are derived from the line.")
@click.option("--layers", default="all", show_default=True, help="Layers to store: all, last, or a list like 0,3,6.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), help="Pooling of a newly exported model (default: mean; a registered model keeps its own).")
@click.option("--max-length", type=click.IntRange(min=1), help="Token limit; longer texts are truncated and counted. Default: the model's.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Arithmetic of a newly exported model: int8 is faster on CPUs with VNNI, bf16 needs CPU and onnxruntime support (default: fp32; a registered model keeps its own).")
@click.option("--precision-guard", type=click.FloatRange(min=0, max=1, min_open=True), default=PRECISION_GUARD, show_default=True, help="With --precision int8/bf16: refuse the export if any layer's vectors fall below this min cosine to fp32's on sample texts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Records per commit.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On a bad line: stop, or skip it and write it to a rejects file.")
@click.option("--rejects", "rejects_file", type=click.Path(dir_okay=False, path_type=Path), help="Where --on-error skip writes bad lines (default: WAREHOUSE/rejects/CORPUS-TIME.jsonl; for an s3:// warehouse, CORPUS-TIME.rejects.jsonl beside the corpus file).")
@click.option("--threads", type=click.IntRange(min=1), help="Inference threads (default: all usable cores).")
@click.option("--token-states", type=click.IntRange(min=0), metavar="K", help="Also cache layer K's hidden states of every token (0 = embedding output), once per document, in `token_states`.")
@click.option("--state-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="How --token-states are stored.")
@click.option("--vector-precision", type=click.Choice(["fp32", "fp16"]), help="How a newly exported model's pooled vectors are stored: fp16 takes half the bytes and is another model key (default: fp32; a registered model keeps its own).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="Where the encoder runs: in this process, or on a Ray cluster's actors (pip install 'ew[ray]'; --threads is then per actor, default 1).")
@click.option("--ray-address", metavar="HOST:PORT", help="The Ray cluster of --engine ray (default: start one on this machine).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (by default a live line on a terminal, a line every few seconds in a log).")
@click.pass_context
def ingest(ctx: click.Context, corpus_file: Path, as_json: bool, quiet: bool, **options) -> None:
    """Embed every document of a JSONL (or .jsonl.gz) corpus that is not stored yet.

    Example: ew ingest examples/debian_sample.jsonl --model minilm
    """
    from .ingest import ingest as run_ingest

    # The path, not an open warehouse: ingest creates it only once the arguments check out.
    result = run_ingest(warehouse_path(ctx), corpus_file, progress=False if quiet else None, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(
        f"{result.corpus}: read {result.read:,}, new documents {result.new_documents:,}, updated {result.updated_documents:,}; "
        f"embedded {result.embedded:,}, reused {result.reused:,}, duplicates {result.duplicates:,}, "
        f"rejected {result.rejected:,}, truncated {result.truncated:,} in {result.seconds:.1f}s"
    )
    click.echo(f"model {result.model}, layers {','.join(map(str, result.layers))}, {result.vector_precision} vectors; "
               f"warehouse version {result.version}")
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

@click.command()
@click.argument("sql")
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version (see `ew log`).")
@format_options(FORMATS, help="Output format (default: table, or from --output's extension): table, csv, json (one array), nl (one object per line), parquet.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file (its extension must match --format) instead of stdout.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop the query after this many seconds.")
@click.pass_context
def query(ctx: click.Context, sql: str, version: int | None, fmt: str | None, output: Path | None,
          timeout: float | None) -> None:
    """Run one read-only SQL SELECT (DuckDB) over the tables documents, embeddings, models, heads,
    token_states, and log (the warehouse versions, with the Delta version each pins).

    Example: ew query "select model, layer, count(*) from embeddings group by all order by all"
    """
    chosen = format_for(output, chosen_format(ctx, fmt))
    try:
        with memory_cap(), warehouse_of(ctx).query(sql, version=version, timeout=timeout) as result:
            rows = write_result(result.reader, fmt=chosen, output=output, stdout=sys.stdout)
    except KeyboardInterrupt:
        unwritten = f"; {output} was not written" if output is not None else ""
        click.echo(f"Interrupted: the query was stopped{unwritten}.", err=True)
        ctx.exit(130)
    if output is not None:
        where = f"{output}, in place (not a regular file)" if written_in_place(output) else str(output)
        click.echo(f"wrote {rows:,} rows to {where} (warehouse version {result.version})", err=True)

@click.command()
@format_options(ROW_FORMATS, help="table (default), csv, json (one array) or nl (one object per line, with a pins map).")
@click.pass_context
def log(ctx: click.Context, fmt: str | None) -> None:
    """List the warehouse's versions: number, time, operation, rows added, the Delta version of
    each table it pins (for readers that time-travel without ew), and details.

    Example: ew log
    """
    entries = warehouse_of(ctx).log()
    fmt = chosen_format(ctx, fmt) or "table"
    if fmt != "table":
        write_records([entry.to_dict() for entry in entries], fmt=fmt, stdout=sys.stdout)
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

@click.command()
@click.option("--available", is_flag=True, help="List the aliases ew knows and whether their weights are installed.")
@click.option("--version", "version", type=click.IntRange(min=0), help="Read this warehouse version.")
@format_options(ROW_FORMATS, help="table (default), csv, json (one array) or nl (one object per line).")
@click.pass_context
def models(ctx: click.Context, available: bool, version: int | None, fmt: str | None) -> None:
    """List the models registered in the warehouse (or, with --available, the aliases).

    Example: ew models --available
    """
    fmt = chosen_format(ctx, fmt) or "table"
    if available:
        from .models import available_models

        aliases = available_models()
        if fmt != "table":
            write_records(aliases, fmt=fmt, stdout=sys.stdout)
            return
        for alias in aliases:
            state = f"installed at {alias['path']}" if alias["installed"] else "not installed"
            click.echo(f"{alias['alias']:<10} {alias['hf_id']:<42} {state}")
        return
    from .registry import list_models

    listings = list_models(warehouse_of(ctx), version=version)
    if fmt != "table":
        write_records([listing.to_dict() for listing in listings], fmt=fmt, stdout=sys.stdout)
        return
    for listing in listings:
        row, worst = listing.row, listing.worst
        agreement = "" if worst is None else (
            f" (cosine to fp32, worst layer {worst.layer}: min {worst.min_cosine:.4f}, mean {worst.mean_cosine:.4f})"
        )
        click.echo(
            f"{row.model:<32} dim {row.dim:<5} layers 0..{row.num_layers:<3} {row.pooling:<5} "
            f"max_length {row.max_length:<5} {row.precision}{agreement}, {row.vector_precision} vectors  from {row.source}"
        )

@click.command()
@click.argument("text")
@click.option("--model", "-m", help="Registered model key, unique key prefix or alias (default: the only model stored).")
@click.option("--layer", type=click.IntRange(min=0), help="Layer whose vectors to compare (default: the last).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many documents to show.")
@click.option("--corpus", help="Only documents of this corpus.")
@click.option("--where", help="Only documents matching this SQL condition on documents, e.g. \"section = 'python'\".")
@click.option("--version", "version", type=click.IntRange(min=0), help="Search this warehouse version.")
@format_options(ROW_FORMATS, help="table (default), csv, json (one array) or nl (one object per line); all but table with doc_hash.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all usable cores).")
@click.pass_context
def search(ctx: click.Context, text: str, fmt: str | None, **options) -> None:
    """Find the stored documents nearest TEXT by cosine similarity (TEXT is embedded with the same model).

    Example: ew search "python bindings for a C library" -k 5 --where "section = 'python'"
    """
    from .search import search as run_search

    found = run_search(warehouse_of(ctx), text, **options)
    fmt = chosen_format(ctx, fmt) or "table"
    table = found.table()
    if fmt == "table":  # for reading: 4 decimals, no hash
        table = table.drop_columns(["doc_hash"]).set_column(1, "score", pc.round(table.column("score"), 4))
    write_result(table.to_reader(), fmt=fmt, output=None, stdout=sys.stdout)

@click.command()
@click.option("--version", "version", type=click.IntRange(min=0), help="Describe this warehouse version.")
@click.option("--json", "as_json", is_flag=True, help="Print it as one JSON object.")
@click.pass_context
def info(ctx: click.Context, version: int | None, as_json: bool) -> None:
    """What the warehouse holds: documents per corpus, vectors and token states per model/layer,
    files and bytes per table, and its versions.

    Example: ew info
    """
    from warehouse.summary import summarize

    summary = summarize(warehouse_of(ctx), version=version)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    for line in _summary_lines(summary):
        click.echo(line)

def _summary_lines(summary) -> list[str]:
    """`ew info`'s text: one block per kind of thing, numbers aligned."""
    when = "never" if summary.committed_at is None else f"{summary.committed_at:%Y-%m-%d %H:%M:%S} UTC"
    lines = [f"warehouse {summary.root}: version {summary.version} of {summary.latest_version} "
             f"({summary.versions:,} versions), committed {when}; {size_text(summary.bytes)} in all"]
    lines.append(f"{'corpus':<24} {'documents':>10} {'texts':>10}  labelled fields")
    for c in summary.corpora:
        fields = ", ".join(f"{name} {n:,}" for name, n in c.labelled.items()) or "-"
        lines.append(f"{c.corpus:<24} {c.documents:>10,} {c.texts:>10,}  {fields}")
    lines.append(f"{'model':<32} {'layer':>5} {'pooling':<7} {'vectors':>10} {'on disk':>10}")
    for v in summary.vectors:
        lines.append(f"{v.model:<32} {v.layer:>5} {v.pooling:<7} {v.vectors:>10,} {size_text(v.bytes):>10}")
    if summary.token_states:
        lines.append(f"{'token states of model':<32} {'layer':>5} {'prec.':<7} {'documents':>10} {'on disk':>10}")
        for s in summary.token_states:
            lines.append(f"{s.model:<32} {s.layer:>5} {s.precision:<7} {s.documents:>10,} {size_text(s.bytes):>10}")
    lines.append(f"{'table':<14} {'delta version':>13} {'files':>7} {'on disk':>10}")
    for name, t in summary.tables.items():
        lines.append(f"{name:<14} {t.delta_version if t.delta_version >= 0 else '-':>13} {t.files:>7,} {size_text(t.bytes):>10}")
    return lines

@click.command("export")
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

    warehouse = warehouse_of(ctx)
    key = find_model(warehouse, model).model
    reader = warehouse.training_set(model=key, spec=SplitSpec.parse(split_sizes, seed=seed), **options)
    rows = write_training_set(reader, output)
    version = reader.schema.metadata[b"ew.warehouse_version"].decode()
    click.echo(f"wrote {rows:,} rows ({reader.schema.field('embedding').type}) to {output} (warehouse version {version})",
               err=True)

@click.command()
@click.option("--deep", is_flag=True, help="Also read every row: unique keys, vector widths and layers, document hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def verify(ctx: click.Context, deep: bool, as_json: bool) -> None:
    """Check that every file the latest version pins exists and reads, and every model and head loads.

    Prints one line per problem (where: what; what to do) and exits 1, or a summary and exits 0.

    Example: ew verify --deep
    """
    from .integrity import verify as run_verify

    report = run_verify(warehouse_of(ctx), deep=deep)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            click.echo(problem.line())
        click.echo(report.summary())
    if not report.ok:
        ctx.exit(1)
