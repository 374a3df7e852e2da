"""``--on-error``: what ingest and predict do with the corpus lines the reader rejects.

    with Rejects(source, warehouse_root / "rejects" / "news.jsonl", on_error="skip") as rejects:
        for record in rejects.filter(read_corpus(source)):
            ...
    rejects.count, rejects.path

``fail`` raises :class:`InputError` on the first bad line, before anything of it is used;
``skip`` counts the line and appends it, with its reason, to a JSONL rejects file that is
created on the first bad line only.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

from warehouse.errors import EwError

from .corpus import Record, Rejected
from .errors import InputError

ON_ERROR = ("fail", "skip")


def check_on_error(on_error: str) -> str:
    """``on_error`` if it is a policy ew knows, else EwError naming the allowed values."""
    if on_error not in ON_ERROR:
        raise EwError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    return on_error


class Rejects:
    """Applies an --on-error policy to the items of ``read_corpus(source)``; see the module docstring."""

    def __init__(self, source: Path, path: Path, *, on_error: str):
        self.on_error = check_on_error(on_error)
        self.source = Path(source)
        self.path = Path(path)
        if self.path.exists() and self.source.exists() and self.path.samefile(self.source):
            # Appending to the file being read would feed every reject back in, without end.
            raise EwError(f"the rejects file {self.path} is the corpus file itself; choose another with --rejects")
        self.count = 0
        self._handle: TextIO | None = None

    def filter(self, items: Iterable[Record | Rejected], on_progress: Callable[[int], None] | None = None) -> Iterator[Record]:
        """The Records of ``items``; each Rejected raises (fail) or is written and counted (skip)."""
        for item in items:
            if isinstance(item, Record):
                yield item
                continue
            if self.on_error == "fail":
                raise InputError(self.source, item.line, item.reason)
            self._write(json.dumps(item.to_dict(self.source), ensure_ascii=False) + "\n")
            self.count += 1
            if on_progress:
                on_progress(1)

    def _write(self, text: str) -> None:
        try:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.path, "a", encoding="utf-8")
            self._handle.write(text)
        except OSError as error:
            self._abandon()
            raise self._error(error) from None

    def close(self) -> None:
        """Flush and close the rejects file; a write that fails only now (a full disk) is an EwError too."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError as error:
                raise self._error(error) from None

    def _abandon(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass  # the first error is the one to report

    def _error(self, error: OSError) -> EwError:
        reason = error.strerror or type(error).__name__
        return EwError(
            f"cannot write the rejects file {self.path} ({reason}) for the bad lines of {self.source}; "
            "free some space there or choose a writable place with --rejects"
        )

    def __enter__(self) -> Rejects:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
