"""Progress of long work, on stderr (stdout stays for data).

On a terminal, one line redrawn in place a few times a second. Elsewhere (a CI log, a pipe,
`make demo`), a plain line every ``LOG_EVERY`` seconds once the work has run that long: a short
run prints nothing, a long one is never silent. ``enabled=False`` (``--quiet``,
``progress=False`` in the library) prints nothing at all.

    show = Progress("ingest debian", total=3000)
    for chunk in chunks:
        ...
        show.advance(len(chunk))
    show.close()

The training loop reports its epochs through :func:`epoch_done` to the Progress of the
enclosing :func:`reporting_epochs`, so the loop needs no callback threaded through every caller.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

LIVE_EVERY = 0.2  # seconds between redraws of a terminal's line
LOG_EVERY = 5.0  # seconds between lines in a log


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A count of ``unit`` done (of ``total``, when known), its rate and ETA, and a detail."""

    def __init__(self, label: str, *, total: int | None = None, unit: str = "docs", stream: TextIO | None = None,
                 enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = True if enabled is None else enabled
        self.live = _is_terminal(self.stream)
        self.label = label
        self.total = total
        self.unit = unit
        self.detail = ""
        self.done = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0 if self.live else self.started  # a log's first line comes after LOG_EVERY
        self._drawn = False

    def advance(self, count: int, *, detail: str | None = None) -> None:
        self.done += count
        if detail is not None:
            self.detail = detail
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= (LIVE_EVERY if self.live else LOG_EVERY):
            self._last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The progress as one line: ``ingest debian: 1,200/3,000 (40%)  310.2 docs/s  ETA 5s``, or
        without a total ``fit-head h: 12 epochs in 3s  epoch 12: ...``."""
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        if not self.total:
            text = f"{self.label}: {self.done:,} {self.unit} in {_duration(elapsed)}"
        else:
            rate = self.done / elapsed
            text = f"{self.label}: {self.done:,}/{self.total:,} ({100 * self.done / self.total:.0f}%)  {rate:,.1f} {self.unit}/s"
            if rate > 0 and self.done < self.total:
                text += f"  ETA {_duration((self.total - self.done) / rate)}"
        return f"{text}  {self.detail}" if self.detail else text

    def _draw(self, now: float) -> None:
        self._drawn = True
        if self.live:
            self.stream.write("\r" + self.line(now).ljust(78))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The last figures (on a terminal, or in a log that showed a line already), then a new line."""
        if not self.enabled or not (self.live or self._drawn):
            return
        self._draw(time.perf_counter())
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def announce(message: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
    """One line about a long step that has no count (the one-time ONNX export), on stderr."""
    if enabled is False:
        return
    stream = stream or sys.stderr
    stream.write(message + "\n")
    stream.flush()


_EPOCHS: ContextVar[Progress | None] = ContextVar("ew_epochs", default=None)


@contextmanager
def reporting_epochs(show: Progress) -> Iterator[Progress]:
    """For the block, :func:`epoch_done` advances ``show``; closed at the end."""
    token = _EPOCHS.set(show)
    try:
        yield show
    finally:
        _EPOCHS.reset(token)
        show.close()


def epoch_done(detail: str) -> None:
    """One epoch trained (``detail``: its scores); shown by the enclosing :func:`reporting_epochs`, if any."""
    show = _EPOCHS.get()
    if show is not None:
        show.advance(1, detail=detail)
