"""`ew` commands over a warehouse's life: compact, vacuum, rm."""
from __future__ import annotations

import json

import click

from .cli_heads import heads_rm
from .cli_options import Age, size_text, warehouse_of


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say which files would be rewritten; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def compact(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Rewrite the small files of every partition (documents per corpus, embeddings and token states per
    model and layer) into larger ones, as one new version; every query reads the same rows.

    Example: ew compact --dry-run
    """
    from warehouse.lifecycle import compact as run_compact

    result = run_compact(warehouse_of(ctx), dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    would = "would rewrite" if dry_run else "rewrote"
    for table in result.tables:
        click.echo(f"{table.table}: {would} {table.partitions:,} partitions, {table.files_before:,} files -> "
                   f"{table.files_after:,} ({size_text(table.bytes_before)})")
    if not result.tables:
        click.echo("nothing to compact: no partition has more than one small file")
    elif result.version is not None:
        click.echo(f"warehouse version {result.version}; older versions still read their own files until `ew vacuum`")

@click.command()
@click.option("--keep-versions", type=click.IntRange(min=1), metavar="N", help="Keep the newest N versions (vacuum versions do not count).")
@click.option("--older-than", type=Age(), help="Keep every version since the one that was the latest AGE ago (e.g. 7d, 12h).")
@click.option("--yes", is_flag=True, help="Delete; without it, only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def vacuum(ctx: click.Context, keep_versions: int | None, older_than, yes: bool, as_json: bool) -> None:
    """Delete the data files and artifacts (removed heads, unregistered models) that no kept version
    needs; a dry run unless --yes. Versions older than the kept ones are no longer readable.

    Example: ew vacuum --keep-versions 10 --yes
    """
    from warehouse.lifecycle import vacuum as run_vacuum

    result = run_vacuum(warehouse_of(ctx), keep_versions=keep_versions, older_than=older_than, dry_run=not yes)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for table, (files, size) in result.tables.items():
        click.echo(f"{table}: {files:,} files, {size_text(size)}")
    if result.artifacts:
        click.echo(f"artifacts: {', '.join(result.artifacts)} ({size_text(result.artifact_bytes)})")
    what = f"{result.files:,} files ({size_text(result.bytes)}) and {len(result.artifacts):,} artifact directories " \
           f"({size_text(result.artifact_bytes)})"
    if not result.files and not result.artifacts:
        click.echo(f"nothing to delete: every file is needed by a version from {result.oldest_version} on")
    elif result.dry_run:
        click.echo(f"would delete {what}; versions before {result.oldest_version} would no longer be readable. "
                   "Run again with --yes to delete them.")
    else:
        recorded = f" (recorded by version {result.version})" if result.version is not None else ""
        click.echo(f"deleted {what}; the oldest readable version is {result.oldest_version}{recorded}")

@click.group()
def rm() -> None:
    """Remove a corpus's documents or a head, as one new version (older versions still read them
    until `ew vacuum`).

    Example: ew rm corpus debian
    """

@rm.command("corpus")
@click.argument("name")
@click.pass_context
def rm_corpus(ctx: click.Context, name: str) -> None:
    """Delete every document of a corpus; its vectors stay (other corpora may hold the same texts).

    Example: ew rm corpus debian
    """
    from warehouse.lifecycle import remove_corpus

    result = remove_corpus(warehouse_of(ctx), name)
    click.echo(f"removed corpus {name}: {result.documents:,} documents (warehouse version {result.version}; "
               "its files stay for readers of older versions until `ew vacuum`)")

rm.add_command(heads_rm, "head")
