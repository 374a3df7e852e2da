"""`ew verify`: the tables (:mod:`warehouse.integrity`) plus the artifacts they register.

    report = verify(Warehouse.open("ew-warehouse"), deep=True)
    if not report.ok:
        print("\\n".join(problem.line() for problem in report.problems))

Every registered model's directory must hold a card that loads and describes that model, and
``model.onnx`` and ``tokenizer.json`` with the digests the card records (cards written before
digests existed: the files must exist). Every registered head must load (:func:`load_head`
checks its digests) and be the head its catalog row registered.
"""
from __future__ import annotations

import time
from dataclasses import replace

from warehouse import Warehouse
from warehouse.catalog import HeadRow, ModelRow
from warehouse.errors import EwError
from warehouse.integrity import check_tables
from warehouse.problems import RESTORE, Problem, VerifyReport
from warehouse.keys import file_digest

from .artifacts import ModelCard
from .head_catalog import load_registered

__all__ = ["Problem", "VerifyReport", "check_head", "check_model", "verify"]


def verify(warehouse: Warehouse, *, deep: bool = False) -> VerifyReport:
    """Check the tables the latest version pins (every row with ``deep``) and every registered model and head."""
    started = time.perf_counter()
    report = check_tables(warehouse, deep=deep)
    problems = list(report.problems)
    models: list[ModelRow] = []
    heads: list[HeadRow] = []
    if report.version is not None:
        models = _registered(warehouse.models, report.version)
        heads = _registered(warehouse.heads, report.version)
    for row in models:
        problems += check_model(warehouse, row)
    for row in heads:
        problems += check_head(warehouse, row)
    return replace(report, models=len(models), heads=len(heads), problems=tuple(problems),
                   seconds=time.perf_counter() - started)


def check_model(warehouse: Warehouse, row: ModelRow) -> list[Problem]:
    """What is wrong with the artifact of a registered model (nothing: an empty list)."""
    directory = warehouse.artifact_path(row.artifact)
    fix = f"delete {directory} and export the model again with `ew ingest CORPUS --model SOURCE` (it came from {row.source})"
    if not directory.is_dir():
        return [Problem("model-artifact", f"the artifact of model {row.model} is missing", str(directory), fix)]
    try:
        card = ModelCard.load(directory)
    except EwError as error:
        return [Problem("model-artifact", f"model {row.model}: {getattr(error, 'reason', error)}", str(directory), fix)]
    if (card.key, card.dim, card.num_layers) != (row.model, row.dim, row.num_layers):
        return [Problem(
            "model-artifact",
            f"its card describes model {card.key} (dim {card.dim}, {card.num_layers} layers), the models table "
            f"registers {row.model} (dim {row.dim}, {row.num_layers} layers) here", str(directory), fix,
        )]
    problems = []
    for name, digest in card.file_digests().items():
        path = directory / name
        if not path.is_file():
            problems.append(Problem("model-artifact", f"model {row.model}: {name} is missing", str(path), fix))
        elif digest and file_digest(path) != digest:
            problems.append(Problem("model-artifact", f"model {row.model}: {name} does not match the digest in its card "
                                    "(changed or truncated)", str(path), fix))
    return problems


def check_head(warehouse: Warehouse, row: HeadRow) -> list[Problem]:
    """What is wrong with the files of a registered head (nothing: an empty list)."""
    try:
        load_registered(warehouse, row)
    except EwError as error:
        return [Problem(
            "head-artifact", f"head {row.head} cannot be used: {error}", str(warehouse.artifact_path(row.artifact)),
            # HeadError's message already says to train the head again
            f"or {RESTORE}; `ew heads rm {row.head}` takes it out of the catalog",
        )]
    return []


def _registered(read, version: int) -> list:
    try:
        return read(version=version)
    except EwError:  # a damaged models or heads table, reported file by file by check_tables
        return []
