"""warehouse/output.py: an output file appears whole or not at all; a device is written in place.

The same paths through `ew query --output` (directories, FIFOs, full disks, permissions) are in test_formats.py.
"""
import os
import stat
from pathlib import Path

import pytest

from warehouse import QueryError
from warehouse.output import atomic_output


def test_atomic_output_removes_only_its_own_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(QueryError):  # as a query failing halfway through the result would
        with atomic_output(target, "wb") as handle:
            handle.write(b"partial")
            (tmp_path / "other.ew-tmp").write_text("not ours")
            raise QueryError("the query failed")
    assert sorted(os.listdir(tmp_path)) == ["other.ew-tmp", "out.bin"]
    assert target.read_bytes() == b"old"


def test_atomic_output_writes_into_a_character_device(tmp_path):
    with atomic_output(Path("/dev/null"), "wb") as handle:
        handle.write(b"nothing")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
