"""A one-line progress meter on stderr: shown on a terminal, silent otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, label: str, *, total: int | None = None, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self._last_draw > 0.2:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"\r{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * self.done / self.total:.0f}%)"
        text += f"  {rate:,.1f} docs/s"
        if self.total and rate > 0:
            text += f"  ETA {_duration((self.total - self.done) / rate)}"
        self.stream.write(text.ljust(78))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
