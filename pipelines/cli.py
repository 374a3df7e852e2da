"""The `ew` command line: each command parses, calls one library function and prints.

The commands live by subject in cli_data, cli_heads and cli_lifecycle; this module is the
group, its one error boundary, and the entry point.
"""
from __future__ import annotations

import io
import os
import sys
import traceback

import click

from warehouse import EwError
from warehouse.store import DEFAULT_PATH, ENV_VAR

from . import cli_data, cli_heads, cli_lifecycle
from .memory import limit_arenas


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
        except BrokenPipeError:
            # The reader of stdout went away (`ew query ... | head`): the output was wanted only in
            # part; like other Unix tools, end quietly.
            _discard_stdout()
            ctx.exit(0)
        except KeyboardInterrupt:
            click.echo(
                "Interrupted: every version committed before the interrupt is kept; run the same command again to continue.",
                err=True,
            )
            ctx.exit(130)


@click.group(cls=_Group)
@click.option(
    # A string, not a Path: a Path would fold s3://bucket into s3:/bucket.
    "-w", "--warehouse", type=str, envvar=ENV_VAR, default=DEFAULT_PATH, show_default=True,
    help=f"The warehouse: a directory, or s3://BUCKET/PREFIX with the AWS_* environment variables (or set ${ENV_VAR}).",
)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="ew")
@click.pass_context
def cli(ctx: click.Context, warehouse: str, debug: bool) -> None:
    """ew, the embedding warehouse: run the encoder once per document, keep every layer's
    vectors in Delta Lake tables, and train tiny heads on them in seconds.

    Example: ew ingest corpus.jsonl --model minilm && ew query "select count(*) from embeddings"
    """
    ctx.ensure_object(dict)
    ctx.obj["warehouse"] = warehouse
    ctx.obj["debug"] = debug


for _command in (cli_data.ingest, cli_data.query, cli_data.log, cli_data.models, cli_data.search, cli_data.info,
                 cli_data.export, cli_data.verify, cli_heads.fit_head, cli_heads.heads, cli_heads.predict,
                 cli_heads.export_head, cli_lifecycle.compact, cli_lifecycle.vacuum, cli_lifecycle.rm):
    cli.add_command(_command)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a real file (a test's runner): nothing to flush
        pass


def main() -> None:
    limit_arenas()  # process-wide: every command gets it; ingest and tuning also bound the heap (pipelines.memory)
    cli(prog_name="ew")


if __name__ == "__main__":
    main()
