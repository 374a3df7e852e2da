"""What the `ew` commands share: the warehouse they act on, and option types."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from warehouse import EwError, Warehouse


def warehouse_path(ctx: click.Context) -> Path:
    """The warehouse directory given to the `ew` group (--warehouse / $EW_WAREHOUSE)."""
    return ctx.find_root().obj["warehouse"]


def warehouse_of(ctx: click.Context, *, create: bool = False) -> Warehouse:
    """The warehouse given to the `ew` group (--warehouse / $EW_WAREHOUSE)."""
    return Warehouse.open(warehouse_path(ctx), create=create)


class LayerOrAuto(click.ParamType):
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


class Age(click.ParamType):
    name = "AGE"

    def convert(self, value, param, ctx):
        from warehouse.lifecycle import parse_age

        try:
            return parse_age(value)
        except EwError as error:
            self.fail(str(error), param, ctx)


def size_text(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return ""


# -- output formats: sqlite-utils' --csv/--json/--nl as aliases of --format -------------------

#: What a command that prints rows of its own (log, models, heads, search) can print them as.
ROW_FORMATS = ("table", "csv", "json", "nl")
_FLAG_HELP = {
    "csv": "CSV",
    "json": "one JSON array",
    "nl": "newline-delimited JSON, one object per line",
}
_FLAGS_ASKED = "ew.format_flags"


def format_options(formats: Sequence[str], *, help: str):
    """``--format`` (one of ``formats``) and, for those among them, the flags ``--csv``, ``--json``
    and ``--nl``; the command reads the choice with :func:`chosen_format`."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.meta.setdefault(_FLAGS_ASKED, []).append(param.name)

    def decorate(command):
        for fmt in reversed([fmt for fmt in _FLAG_HELP if fmt in formats]):
            command = click.option(f"--{fmt}", fmt, is_flag=True, expose_value=False, callback=remember,
                                   help=f"Same as --format {fmt}: {_FLAG_HELP[fmt]}.")(command)
        return click.option("--format", "fmt", type=click.Choice(formats), help=help)(command)

    return decorate


def chosen_format(ctx: click.Context, fmt: str | None) -> str | None:
    """The format asked for by --format or one of its flags (None: none was); two different ones are a usage error."""
    asked = sorted(set(ctx.meta.get(_FLAGS_ASKED, [])) | ({fmt} if fmt else set()))
    if len(asked) > 1:
        raise click.UsageError(f"choose one output format, not {' and '.join(asked)}")
    return asked[0] if asked else None
