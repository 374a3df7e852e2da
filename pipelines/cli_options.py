"""What the `ew` commands share: the warehouse they act on, and option types."""
from __future__ import annotations

import click

from warehouse import EwError, Warehouse


def warehouse_of(ctx: click.Context, *, create: bool = False) -> Warehouse:
    """The warehouse given to the `ew` group (--warehouse / $EW_WAREHOUSE)."""
    return Warehouse.open(ctx.find_root().obj["warehouse"], create=create)


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
