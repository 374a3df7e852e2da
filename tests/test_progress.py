"""pipelines/progress.py: a live line on a terminal, a line every few seconds in a log, nothing when disabled."""
import io

import pytest

from pipelines import progress
from pipelines.progress import Progress, announce, epoch_done, reporting_epochs


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    return clock


def test_off_a_terminal_a_line_every_few_seconds(clock):
    log = io.StringIO()
    show = Progress("ingest c", total=1000, stream=log)
    show.advance(100)
    clock.now += progress.LOG_EVERY - 1
    show.advance(100)
    assert log.getvalue() == ""  # a short run prints nothing
    clock.now += 1
    show.advance(200)
    clock.now += progress.LOG_EVERY
    show.advance(400)
    clock.now += 1
    show.close()
    assert log.getvalue().splitlines() == [
        "ingest c: 400/1,000 (40%)  80.0 docs/s  ETA 7s",
        "ingest c: 800/1,000 (80%)  80.0 docs/s  ETA 2s",
        "ingest c: 800/1,000 (80%)  72.7 docs/s  ETA 2s",
    ]


def test_a_short_run_off_a_terminal_prints_nothing(clock):
    log = io.StringIO()
    show = Progress("ingest c", total=10, stream=log)
    show.advance(10)
    show.close()
    assert log.getvalue() == ""


def test_on_a_terminal_one_line_redrawn(clock):
    terminal = Terminal()
    show = Progress("ingest c", total=10, stream=terminal)
    clock.now += 1
    show.advance(5)
    clock.now += 1
    show.advance(5)
    show.close()
    assert terminal.getvalue() == "\r" + "ingest c: 5/10 (50%)  5.0 docs/s  ETA 1s".ljust(78) + \
        "\r" + "ingest c: 10/10 (100%)  5.0 docs/s".ljust(78) + "\r" + "ingest c: 10/10 (100%)  5.0 docs/s".ljust(78) + "\n"


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_disabled_is_silent(clock, stream):
    out = stream()
    show = Progress("ingest c", stream=out, enabled=False)
    clock.now += 60
    show.advance(5)
    show.close()
    announce("exporting", enabled=False, stream=out)
    assert out.getvalue() == ""


def test_epochs_reach_the_enclosing_progress(clock):
    epoch_done("outside any block: shown nowhere")
    terminal = Terminal()
    with reporting_epochs(Progress("fit-head h", unit="epochs", stream=terminal)):
        clock.now += 1
        epoch_done("epoch 1: validation accuracy 0.500")
    assert terminal.getvalue().split("\n")[0].split("\r")[-1].rstrip() == \
        "fit-head h: 1 epochs in 1s  epoch 1: validation accuracy 0.500"
