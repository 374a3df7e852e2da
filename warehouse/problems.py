"""What `ew verify` finds and reports: a :class:`Problem` per finding, a :class:`VerifyReport` per run.

    report.ok, report.summary(), [problem.line() for problem in report.problems]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

RESTORE = "restore it from a backup of the warehouse"


@dataclass(frozen=True)
class Problem:
    """One finding: ``what`` is wrong, ``where`` (a file, or a table and key), and ``fix``: what to do."""

    # log, pin, delta-log, ahead, missing-file, damaged-file, row-count, file-size (tables);
    # duplicate-key, doc-hash, vector-width, layer-range, unknown-model, unreadable-rows (deep);
    # model-artifact, head-artifact (pipelines.integrity)
    kind: str
    what: str
    where: str
    fix: str

    def line(self) -> str:
        return f"{self.where}: {self.what}; {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    """What `ew verify` checked and found; sound when ``problems`` is empty."""

    root: str
    version: int | None      # the warehouse version checked (None: no version could be read)
    deep: bool
    tables: int = 0          # tables whose Delta log was read
    files: int = 0           # Parquet files whose footer was read
    rows: int = 0            # rows in those files
    versions: int = 0        # rows of the log whose pins were checked
    models: int = 0          # model artifacts checked
    heads: int = 0           # head artifacts checked
    seconds: float = 0.0
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(counted(n, noun) for n, noun in (
            (self.tables, "table"), (self.files, "file"), (self.rows, "row"), (self.versions, "version"),
            (self.models, "model"), (self.heads, "head")))
        checked = f"{counts} checked{' row by row' if self.deep else ''} in {self.seconds:.1f}s"
        at = "no version" if self.version is None else f"version {self.version}"
        if self.ok:
            return f"warehouse {self.root} ({at}) is sound: {checked}"
        return f"found {counted(len(self.problems), 'problem')} in warehouse {self.root} ({at}): {checked}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        data["problems"] = [problem.to_dict() for problem in self.problems]
        return data


def counted(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'s' * (number != 1)}"
