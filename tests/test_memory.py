import sys

import pytest

from pipelines.memory import bound_heap, limit_arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bound_heap_takes_on_glibc_and_allocations_still_work():
    assert bound_heap() is True
    big = bytearray(8 << 20)  # above the threshold: mapped, and returned when freed
    assert len(big) == 8 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_limit_arenas_takes_on_glibc():
    assert limit_arenas() is True


def test_without_glibc_the_heap_is_left_alone(monkeypatch):
    monkeypatch.setattr("pipelines.memory._mallopt", lambda: None)
    assert (limit_arenas(), bound_heap()) == (False, False)
