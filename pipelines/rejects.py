"""The ``--on-error`` policy shared by ingest and predict: stop at the first bad line, or skip it
and keep it in a JSONL rejects file (file, line, reason, raw text) to fix and feed again."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from warehouse.errors import EwError

from .corpus import Record, Rejected
from .errors import InputError

ON_ERROR = ("fail", "skip")


def check_on_error(value: str) -> str:
    if value not in ON_ERROR:
        raise EwError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {value!r}")
    return value


class Rejects:
    """Applies ``on_error`` to a stream of records: raise InputError, or count and write the bad lines."""

    def __init__(self, source: Path, path: Path, *, on_error: str = "fail"):
        self.source = Path(source)
        self.path = Path(path)
        self.on_error = check_on_error(on_error)
        self.count = 0
        self._handle = None

    def filter(self, items: Iterable[Record | Rejected], *,
               on_progress: Callable[[int], None] | None = None) -> Iterator[Record]:
        for item in items:
            if isinstance(item, Record):
                yield item
                continue
            if self.on_error == "fail":
                raise InputError(self.source, item.line, item.reason)
            self.count += 1
            if on_progress:
                on_progress(1)
            self._write(item)

    def _write(self, item: Rejected) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps(item.to_dict(self.source), ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> "Rejects":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
