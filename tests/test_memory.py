import sys

import pytest

from pipelines.memory import bound_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bound_heap_takes_on_glibc_and_allocations_still_work():
    assert bound_heap() is True
    big = bytearray(8 << 20)  # above the threshold: mapped, and returned when freed
    assert len(big) == 8 << 20
