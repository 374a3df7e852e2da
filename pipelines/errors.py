"""The errors of ew's pipelines (corpora, models, heads), all under :class:`warehouse.errors.EwError`.

The storage layer raises its own (``warehouse.errors``); the CLI catches EwError once.
"""
from __future__ import annotations

from pathlib import Path

from warehouse.errors import EwError


class InputError(EwError):
    """A line of an input corpus is unusable."""

    def __init__(self, path: Path | str, line: int, reason: str, *, hint: str | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        hint = hint or "fix the line, or pass --on-error skip to skip such lines and write them to a rejects file"
        super().__init__(f"{self.path}, line {line}: {reason}; {hint}")


class ModelNotFoundError(EwError):
    def __init__(self, name: str, looked_in: list[str], *, hint: str | None = None):
        self.name = name
        self.looked_in = looked_in
        where = "; ".join(looked_in) if looked_in else "nowhere"
        hint = hint or (
            "pass a local directory in Hugging Face format (config.json, weights, tokenizer), "
            "or an alias from `ew models --available`"
        )
        super().__init__(f"model {name!r} not found (looked in: {where}); {hint}")


class ExportError(EwError):
    """Exporting a model to ONNX failed or its outputs disagree with the torch model."""


class UnknownModelKeyError(EwError):
    def __init__(self, key: str, known: list[str]):
        self.key = key
        self.known = known
        listing = ", ".join(known) if known else "none yet: run `ew ingest` first"
        super().__init__(f"no model {key!r} in this warehouse (registered: {listing}); see `ew models`")


class HeadError(EwError):
    """A head cannot be trained, found or applied."""


class MissingDependencyError(EwError):
    def __init__(self, module: str, extra: str, purpose: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python package {module!r}, which is not installed; "
            f"install it with: pip install 'ew[{extra}]'"
        )


class ArtifactError(EwError):
    """An exported model directory is missing or unusable."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"model artifact {self.path} is unusable: {reason}; delete the directory and export the model again"
        )


class ModelOptionError(EwError):
    """An option for a model (pooling, max_length, precision) has a value ew cannot use."""

    def __init__(self, name: str, option: str, value: object, allowed: str):
        self.name = name
        self.option = option
        self.value = value
        super().__init__(f"model {name!r}: {option}={value!r} is not supported; use {allowed}")
