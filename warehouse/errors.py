"""One exception tree for ew. Every message says what failed, where, and what to do.

The CLI catches :class:`EwError` once, prints ``Error: <message>`` and exits 1.
Any other exception escaping to the user is a bug.
"""
from __future__ import annotations

from pathlib import Path


class EwError(Exception):
    """Root of every error ew raises on purpose."""


def first_line(error: BaseException) -> str:
    """The first line of another library's error message, to quote inside ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class WarehouseNotFoundError(EwError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(
            f"no warehouse at {self.path}: run `ew ingest CORPUS.jsonl` to create one, "
            "or point --warehouse / EW_WAREHOUSE at an existing one"
        )


class WarehouseLockedError(EwError):
    def __init__(self, path: Path | str, holder: str):
        self.path = str(path)
        self.holder = holder
        super().__init__(
            f"another ew process ({holder}) is writing to the warehouse {self.path}; "
            "wait for it to finish and run the command again"
        )


class VersionNotFoundError(EwError):
    def __init__(self, version: int, latest: int | None):
        self.version = version
        self.latest = latest
        known = "the warehouse has no versions yet" if latest is None else f"versions run 0..{latest}"
        super().__init__(f"version {version} does not exist ({known}); see `ew log`")


class QueryError(EwError):
    """The SQL could not run (syntax, unknown column, ...)."""


class QueryRefusedError(QueryError):
    """The SQL was refused by the sandbox; nothing ran and nothing was written."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"query refused: {reason}. `ew query` runs one read-only SELECT over the warehouse tables")


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
