"""The heads a warehouse holds: list them, check a name, open one, register and remove one.

A head's files live in a directory of their own, ``artifacts/heads/NAME.XXXXXXXX``, that only
the run which trained it creates and, if the run fails, removes; the name is claimed in the
``heads`` table under the write lock, at the commit that registers the head. Two runs that
pick the same name never touch each other's files: the second one to commit is told the
name is taken and removes only its own directory.

    >>> head = open_head(wh, "section-20261122-101500-3f2a")   # doctest: +SKIP
    >>> head.card.model, head.card.layer                        # doctest: +SKIP
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path

from warehouse import Warehouse
from warehouse.catalog import HeadRow
from warehouse.store import now_utc
from warehouse.tables import HEADS

from .errors import HeadError
from .artifacts import TORCH_DIR
from .head_card import HeadCard
from .heads import LoadedHead, load_head

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Registering a trained head waits this long for another writer rather than losing the training.
REGISTER_WAIT = 600.0


def check_head_name(name: str) -> str:
    if not NAME.match(name):
        raise HeadError(f"head name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def default_head_name(label: str) -> str:
    """``LABEL-YYYYmmdd-HHMMSS-xxxx``: unique even for runs started in the same second."""
    stem = _UNSAFE.sub("-", label).strip("-._")[:60] or "head"
    return f"{stem}-{now_utc():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def list_heads(warehouse: Warehouse, *, version: int | None = None) -> list[HeadRow]:
    """The registered heads at ``version`` (default latest), oldest first."""
    return warehouse.heads(version=version)


def find_head(warehouse: Warehouse, name: str, *, version: int | None = None) -> HeadRow:
    check_head_name(name)
    registered = {row.head: row for row in list_heads(warehouse, version=version)}
    if name not in registered:
        raise HeadError(
            f"no head named {name!r} (heads: {', '.join(registered) or 'none yet: run `ew fit-head`'}); see `ew heads`"
        )
    return registered[name]


def check_name_free(warehouse: Warehouse, name: str) -> None:
    """Fail early, before training, when ``name`` is taken (the commit checks again, under the lock)."""
    if any(row.head == name for row in list_heads(warehouse)):
        raise HeadError(f"a head named {name!r} already exists; pick another --name (or `ew heads rm {name}`)")


def open_head(warehouse: Warehouse, name: str) -> LoadedHead:
    """Load a registered head; its card must describe the same head as its catalog row."""
    return load_registered(warehouse, find_head(warehouse, name))


def load_registered(warehouse: Warehouse, row: HeadRow):
    """Load the files of the head ``row`` registers (their digests are checked) and check they are that head.

    A plain head comes back as a :class:`LoadedHead` (NumPy); one trained above layer K
    (``--tune top|lora``) as a :class:`pipelines.recycling.TopHead` on its model's weights.
    """
    if _row_card(row).get("tune", "head") == "head":
        head = load_head(warehouse.artifact_path(row.artifact))
    else:
        from .recycling import load_top_head

        model = next((m for m in warehouse.models() if m.model == row.model), None)
        if model is None:
            raise HeadError(f"head {row.head!r} reads model {row.model}, which is not registered here")
        head = load_top_head(warehouse.artifact_path(row.artifact), weights_dir=warehouse.artifact_path(model.artifact) / TORCH_DIR)
    card = head.card
    if (card.name, card.model, card.layer, card.pooling) != (row.head, row.model, row.layer, row.pooling):
        raise HeadError(
            f"head {row.head!r}: its card ({row.artifact}) says {card.name}/{card.model}/layer {card.layer}, the heads "
            f"table says {row.head}/{row.model}/layer {row.layer}; the files were changed: train the head again"
        )
    registered = _registered_digest(row)
    if registered and card.digest != registered:
        raise HeadError(
            f"head {row.head!r}: its files ({row.artifact}) are not the ones the heads table registered (another "
            "digest); the files were replaced: train the head again"
        )
    models = {model.model: model for model in warehouse.models()}
    if card.model not in models or not 0 <= card.layer <= models[card.model].num_layers:
        known = models.get(card.model)
        where = f"it has layers 0..{known.num_layers}" if known else "it is not registered here"
        raise HeadError(f"head {row.head!r} reads layer {card.layer} of model {card.model}, but {where}; "
                        "train the head again in this warehouse")
    return head


def _registered_digest(row: HeadRow) -> str | None:
    return _row_card(row).get("digest")


def _row_card(row: HeadRow) -> dict:
    try:
        card = row.card_dict()
    except (ValueError, TypeError):  # a card column that is not JSON: nothing to compare
        return {}
    return card if isinstance(card, dict) else {}


def store_head(warehouse: Warehouse, card: HeadCard,
               write: Callable[[Path, HeadCard], HeadCard]) -> tuple[HeadCard, str]:
    """Write the head's files with ``write(directory, card)`` (e.g. :func:`save_head` of a module) in a
    directory of their own, store it in the warehouse and register it in one commit; returns (card as
    saved, where the warehouse keeps it: a path, or an s3:// URI).

    A head is stored whole or not at all, and a name taken meanwhile by another run is an
    error that leaves the other head alone.
    """
    # A directory no other run can pick: writing refuses an existing one, so this run owns it.
    relative = f"artifacts/heads/{card.name}.{secrets.token_hex(4)}"
    with warehouse.storage.new_artifact(relative) as directory:
        card = write(directory, card)
    row_written = False
    try:
        with warehouse.writer(wait=REGISTER_WAIT) as writer:
            taken = writer.warehouse.current_dataset(HEADS).to_table(columns=["head"]).column("head").to_pylist()
            if card.name in taken:
                raise HeadError(f"a head named {card.name!r} was registered meanwhile by another run; pick another --name")
            writer.add_head(card.row(artifact=relative, created_at=now_utc()))
            # From here the row exists in the heads table (the next writer adopts it if the log
            # commit below never happens): its files must stay, whatever interrupts us.
            row_written = True
            writer.commit("fit-head", {"head": card.name, "label": card.label, "model": card.model, "layer": card.layer})
    except BaseException:
        if not row_written:
            warehouse.storage.delete(relative)  # only this run's own directory
        raise
    return card, warehouse.storage.location(relative)


def remove_head(warehouse: Warehouse, name: str) -> int:
    """Remove ``name`` from the catalog in one commit; returns the new version.

    Its files stay, so readers of older versions can still open it.
    """
    with warehouse.writer() as writer:
        find_head(warehouse, name)
        writer.remove_head(name)
        return writer.commit("remove-head", {"head": name})
