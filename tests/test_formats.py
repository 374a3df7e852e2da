import errno
import io
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import click.testing
import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from warehouse import EwError, Warehouse
from warehouse.formats import _write_table, escape_controls, write_records, write_result

UUID = "5e4330e2-c48b-4b8d-81c0-ecdef1d59c59"
ESC = "\x1b"


@pytest.fixture
def wh(tmp_path):
    return Warehouse.open(tmp_path / "wh", create=True)  # no version yet (-1): the queries read no table


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# -- the output cases: every finding about `ew query --output`, one row each ---------------------


@dataclass(frozen=True)
class OutputCase:
    sql: str
    args: tuple[str, ...] = ("-o", "{out}")  # "{out}" becomes the target's path, "{dir}" its directory
    target: str = "file"  # what {out} is: file, existing, fifo, dev-null, directory, read-only, missing-dir
    fault: str | None = None  # planted-link, full-disk, tty
    exit_code: int = 0
    stderr: str = "wrote 1 rows to {out} (warehouse version -1)\n"
    written: str | None = None  # exactly what lands on stdout or in the target (Parquet: read back as text)
    name: str = "out.csv"  # the target's file name


IN_PLACE = "wrote 1 rows to {out}, in place (not a regular file) (warehouse version -1)\n"
FULL = "no space left on the device; free some space or write somewhere else (nothing was written)"
CASES = {
    # 1. temp files: created exclusively, never through a planted name; normal permissions
    "planted-link-is-not-followed": OutputCase("select 1 as a", fault="planted-link", written='"a"\n1\n'),
    "new-file-respects-umask": OutputCase("select 1 as a", written='"a"\n1\n'),
    "existing-file-keeps-its-permissions": OutputCase("select 1 as a", target="existing", written='"a"\n1\n'),
    # 2. FIFOs and devices are written in place, a directory refused
    "fifo-is-written-in-place": OutputCase(
        "select 1 as a", target="fifo", stderr=IN_PLACE, written='"a"\n1\n',
    ),
    "dev-null-stays-a-device": OutputCase(
        "select 1 as a", args=("--format", "parquet", "-o", "{out}"), target="dev-null", stderr=IN_PLACE,
    ),
    "directory-is-refused": OutputCase(
        "select 1 as a", target="directory", exit_code=1,
        stderr="Error: cannot write {out}: it is a directory; give a file name, e.g. {out}/result\n",
    ),
    # 3. unwritable places: one Error line, nothing left behind
    "read-only-directory": OutputCase(
        "select 1 as a", target="read-only", exit_code=1,
        stderr="Error: cannot write {out}: permission denied in {dir}; write somewhere you can write to\n",
    ),
    "missing-directory": OutputCase(
        "select 1 as a", target="missing-dir", exit_code=1,
        stderr="Error: cannot write {out}: the directory {dir} does not exist; create it, or write somewhere else\n",
    ),
    **{
        f"full-disk-{fmt}": OutputCase(
            "select 1 as a", args=("--format", fmt, "-o", "{out}"), target="existing", fault="full-disk",
            exit_code=1, stderr=f"Error: cannot write {{out}}: {FULL}\n", written="old\n", name=f"out.{extension}",
        )
        for fmt, extension in (("table", "txt"), ("csv", "csv"), ("json", "json"), ("nl", "jsonl"), ("parquet", "parquet"))
    },
    # 5. control characters: escaped in a table and in CSV on a terminal, kept in a CSV file
    "table-escapes-controls": OutputCase(
        f"select chr(27) || '[31mred' || chr(155) || chr(8238) as \"c{ESC}]0;x\"", args=(), stderr="",
        written="c\\x1b]0;x\n---------------------\n\\x1b[31mred\\x9b\\u202e\n(1 row)\n",
    ),
    "csv-on-a-terminal-escapes-controls": OutputCase(
        f"select chr(27) || '[2J' as \"c{ESC}\"", args=("--format", "csv"), fault="tty", stderr="",
        written='"c\\x1b"\n"\\x1b[2J"\n',
    ),
    "csv-file-is-faithful": OutputCase(f"select chr(27) || '[2J' as \"c{ESC}\"", written=f'"c{ESC}"\n"{ESC}[2J"\n'),
    "json-escapes-c1-controls": OutputCase(
        "select chr(27) || chr(155) as c", args=("--format", "json"), stderr="", written='[{"c": "\\u001b\\u009b"}]\n',
    ),
    # 6. sqlite-utils' conventions: --json is one array, --nl one object per line, --csv; the
    # format follows the output's extension, and one the extension contradicts is refused
    "json-is-one-array": OutputCase(
        "select * from range(3) r(a)", args=("--json",), stderr="", written='[{"a": 0},\n {"a": 1},\n {"a": 2}]\n',
    ),
    "json-of-no-rows-is-an-empty-array": OutputCase("select 1 as a where false", args=("--json",), stderr="", written="[]\n"),
    "nl-is-one-object-per-line": OutputCase(
        "select * from range(2) r(a)", args=("--nl",), stderr="", written='{"a": 0}\n{"a": 1}\n',
    ),
    "csv-flag": OutputCase("select 1 as a", args=("--csv",), stderr="", written='"a"\n1\n'),
    "json-file-is-one-array": OutputCase("select 1 as a", name="out.json", written='[{"a": 1}]\n'),
    "jsonl-file-is-one-object-per-line": OutputCase("select 1 as a", name="out.jsonl", written='{"a": 1}\n'),
    "ndjson-file-is-one-object-per-line": OutputCase("select 1 as a", name="out.ndjson", written='{"a": 1}\n'),
    "txt-file-is-a-table": OutputCase("select 1 as a", name="out.txt", written="a\n-\n1\n(1 row)\n"),
    "format-contradicting-the-extension": OutputCase(
        "select 1 as a", args=("--format", "csv", "-o", "{out}"), name="x.parquet", exit_code=1,
        stderr="Error: --format csv writes a .csv file, but {out} names a parquet file; "
               "name it {dir}/x.csv, or leave out --format to write parquet\n",
    ),
    "flag-contradicting-the-extension": OutputCase(
        "select 1 as a", args=("--nl", "-o", "{out}"), name="x.json", exit_code=1,
        stderr="Error: --format nl writes a .jsonl or .ndjson file, but {out} names a json file; "
               "name it {dir}/x.jsonl, or leave out --format to write json\n",
    ),
    "format-with-another-extension": OutputCase(
        "select 1 as a", args=("--format", "csv", "-o", "{out}"), name="out.data", written='"a"\n1\n',
    ),
}

# 4. DuckDB types: (sql, the table's cell, the CSV's cell, the JSON value, the Parquet value read back as text)
NESTED = (
    f"{{'i': interval 3 day, 'b': 'abc'::blob, 'u': '{UUID}'::uuid, 't': 'infinity'::timestamp, "
    "'l': ['-infinity'::date], 'm': map {'k': '12:30:00'::time}, 'v': 12345678901234567890::varint}"
)
NESTED_JSON = (
    f'{{"i": "3 days", "b": "abc", "u": "{UUID}", "t": "infinity", "l": ["-infinity"], "m": [["k", "12:30:00"]], '
    '"v": "12345678901234567890"}'
)
TYPES = {
    "interval": ("interval 3 day", "3 days", '"3 days"', '"3 days"', "3 days"),
    "infinite-timestamp": ("'infinity'::timestamp", "infinity", '"infinity"', '"infinity"', "infinity"),
    "infinite-timestamp-s": ("'-infinity'::timestamp_s", "-infinity", '"-infinity"', '"-infinity"', "-infinity"),
    "infinite-timestamptz": ("'infinity'::timestamptz", "infinity", '"infinity"', '"infinity"', "infinity"),
    "minus-infinite-date": ("'-infinity'::date", "-infinity", '"-infinity"', '"-infinity"', "-infinity"),
    "max-date": ("'5881580-07-10'::date", "5881580-07-10", '"5881580-07-10"', '"5881580-07-10"', "5881580-07-10"),
    "time-24h": ("'24:00:00'::time", "24:00:00", '"24:00:00"', '"24:00:00"', "24:00:00"),
    "blob": ("'\\x1B\\xFFabc'::blob", "\\x1B\\xFFabc", '"\\x1B\\xFFabc"', '"\\\\x1B\\\\xFFabc"', "\\x1B\\xFFabc"),
    # DuckDB exports BIT as its bytes (unless arrow_lossless_conversion is set, see below)
    "bit": ("'101'::bit", "\\x05\\xFD", '"\\x05\\xFD"', '"\\\\x05\\\\xFD"', "\\x05\\xFD"),
    "union": ("union_value(k := 1)", "1", '"1"', "1", "1"),
    "varint": (
        "123456789012345678901234567890::varint", "123456789012345678901234567890",
        '"123456789012345678901234567890"', '"123456789012345678901234567890"', "123456789012345678901234567890",
    ),
    "uuid": (f"'{UUID}'::uuid", UUID, f'"{UUID}"', f'"{UUID}"', UUID),
    "hugeint": (
        "170141183460469231731687303715884105727::hugeint", "170141183460469231731687303715884105727",
        "170141183460469231731687303715884105727", '"170141183460469231731687303715884105727"',
        "170141183460469231731687303715884105727",
    ),
    "timetz": ("'12:00:00+00'::timetz", "12:00:00", '"12:00:00"', '"12:00:00"', "12:00:00"),
    "decimal-38": ("1.5::decimal(38, 10)", "1.5000000000", "1.5000000000", '"1.5000000000"', "1.5000000000"),
    "nested": (
        NESTED, "{'i': '3 days', 'b': 'abc', 'u': '5e433…", '"' + NESTED_JSON.replace('"', '""') + '"', NESTED_JSON,
        f"{{'i': 3 days, 'b': abc, 'u': {UUID}, 't': infinity, 'l': [-infinity], 'm': {{k='12:30:00'}}, "
        "'v': 12345678901234567890}",
    ),
    "list-of-unions": ("[union_value(k := 1), union_value(k := 2)]", "[1, 2]", '"[1, 2]"', "[1, 2]", "[1, 2]"),
}


def _table(cell: str) -> str:
    return f"x\n{'-' * max(1, len(cell))}\n{cell}\n(1 row)\n"


for name, (sql, cell, csv_cell, json_value, parquet_text) in TYPES.items():
    CASES[f"{name}-table"] = OutputCase(f"select {sql} as x", args=(), stderr="", written=_table(cell))
    CASES[f"{name}-csv"] = OutputCase(f"select {sql} as x", written=f'"x"\n{csv_cell}\n')
    CASES[f"{name}-nl"] = OutputCase(
        f"select {sql} as x", args=("--format", "nl"), stderr="", written=f'{{"x": {json_value}}}\n'
    )
    CASES[f"{name}-parquet"] = OutputCase(f"select {sql} as x", args=("-o", "{dir}/out.parquet"), written=parquet_text)


def _prepare(case: OutputCase, tmp_path: Path, monkeypatch) -> Path:
    """Make the case's target, and its fault; returns the target's path."""
    out = {
        "dev-null": Path("/dev/null"),
        "missing-dir": tmp_path / "missing" / "out.csv",
        "read-only": tmp_path / "locked" / "out.csv",
        "directory": tmp_path / "adir",
    }.get(case.target, tmp_path / "out" / case.name)
    if out.parent != Path("/dev") and case.target != "missing-dir":
        out.parent.mkdir(exist_ok=True)
    if case.target == "existing":
        out.write_text("old\n")
        out.chmod(0o640)
    elif case.target == "fifo":
        os.mkfifo(out)
    elif case.target == "directory":
        out.mkdir()
    elif case.target == "read-only":
        out.parent.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: refuse as the kernel would for anyone else
            def denied(*args, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

            monkeypatch.setattr(tempfile, "mkstemp", denied)
    if case.fault == "planted-link":
        # What another local user could plant, knowing ew's old temporary name.
        (tmp_path / "victim").write_text("precious\n")
        (out.parent / f".{out.name}.ew-tmp-{os.getpid()}").symlink_to(tmp_path / "victim")
    elif case.fault == "full-disk":
        real_fdopen = os.fdopen

        class FullDisk(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def full_disk(descriptor, mode="r", **kwargs):
            if "w" not in mode:
                return real_fdopen(descriptor, mode, **kwargs)
            raw = FullDisk(descriptor, "w")
            return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw), **kwargs)

        monkeypatch.setattr(os, "fdopen", full_disk)
    elif case.fault == "tty":
        # CliRunner's stdout stands in for a terminal.
        monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True)
    return out


def _read_fifo(path: Path, into: list) -> threading.Thread:
    def read():
        with open(path, "rb") as fifo:
            into.append(fifo.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_cases(name, wh, tmp_path, monkeypatch, umask_022):
    case = CASES[name]
    out = _prepare(case, tmp_path, monkeypatch)
    args = [a.format(out=out, dir=out.parent) for a in case.args]
    target = Path(args[args.index("-o") + 1]) if "-o" in args else None
    before = sorted(os.listdir(target.parent)) if target is not None and target.parent.is_dir() else None
    received: list[bytes] = []
    reader = _read_fifo(out, received) if case.target == "fifo" else None

    result = CliRunner().invoke(cli, ["-w", str(wh.root), "query", case.sql, *args])
    if reader is not None:
        reader.join(timeout=10)

    assert result.exit_code == case.exit_code, (result.output, result.exception)
    assert result.stderr == case.stderr.format(out=target, dir=out.parent)
    if case.target == "read-only":
        out.parent.chmod(0o755)
    if target is not None and target.parent.is_dir() and target.parent != Path("/dev"):
        # Nothing but the target itself may be new: no temporary file stays behind.
        after = sorted(os.listdir(target.parent))
        assert after == (before if case.exit_code else sorted(set(before) | {target.name}))
    if case.target == "missing-dir":
        assert not out.parent.exists()
    if case.target == "dev-null":
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if case.target == "fifo":
        assert stat.S_ISFIFO(out.lstat().st_mode) and received == [case.written.encode()]
        return
    if case.target == "directory":
        assert out.is_dir() and os.listdir(out) == []
    if case.fault == "planted-link":
        assert (tmp_path / "victim").read_text() == "precious\n"
    if case.written is None:
        return
    if target is None:
        assert result.stdout == case.written
    elif target.suffix == ".parquet" and case.exit_code == 0:
        assert duckdb.sql(f"select x::varchar from read_parquet('{target}')").fetchall() == [(case.written,)]
    else:
        assert target.read_text() == case.written
        assert not target.is_symlink()
        expected_mode = 0o640 if case.target == "existing" else 0o644
        assert stat.S_IMODE(target.stat().st_mode) == expected_mode


# -- the pieces, as a Python user calls them ----------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "text"),
    [
        ("'101'::bit", "101"),
        ("340282366920938463463374607431768211455::uhugeint", "340282366920938463463374607431768211455"),
        ("'12:00:00+02'::timetz", "12:00:00+02"),
        ("{'a': '101'::bit}", "{'a': '101'}"),
    ],
)
def test_duckdb_lossless_types_are_written_as_their_text(sql, text):
    # With arrow_lossless_conversion DuckDB exports BIT, UHUGEINT and TIMETZ as its own extension types.
    con = duckdb.connect(config={"arrow_lossless_conversion": True})
    out = io.StringIO()
    write_result(con.sql(f"select {sql} as x").to_arrow_reader(), fmt="table", output=None, stdout=out)
    assert out.getvalue() == f"x\n{'-' * len(text)}\n{text}\n(1 row)\n"


def test_escape_controls():
    assert escape_controls("a\tb\nc\x1b[0m\x7f\u202e") == "a\\tb\\nc\\x1b[0m\\x7f\\u202e"
    assert escape_controls("plain é ✓") == "plain é ✓"


def test_a_result_with_no_rows_keeps_its_columns(tmp_path):
    reader = duckdb.connect().sql("select interval 1 day as i, union_value(k := 1) as u where false").to_arrow_reader()
    write_result(reader, fmt="parquet", output=tmp_path / "empty.parquet", stdout=io.StringIO())
    described = duckdb.sql(f"describe select * from read_parquet('{tmp_path / 'empty.parquet'}')").fetchall()
    assert [(name, kind) for name, kind, *_ in described] == [("i", "VARCHAR"), ("u", "VARCHAR")]


def test_an_unconvertible_column_is_one_clear_error():
    schema = pa.schema([pa.field("x", pa.struct([pa.field("", pa.month_day_nano_interval())]))])
    batch = pa.RecordBatch.from_arrays([pa.nulls(1, schema.field(0).type)], schema=schema)
    with pytest.raises(EwError) as caught:
        write_result(pa.RecordBatchReader.from_batches(schema, [batch]), fmt="json", output=None, stdout=io.StringIO())
    assert str(caught.value).startswith("cannot write the column(s) 'x' as json: ")


def _batches(*widths: int) -> pa.RecordBatchReader:
    schema = pa.schema([pa.field("name", pa.string()), pa.field("n", pa.int64())])
    batches = [pa.RecordBatch.from_pydict({"name": ["x" * w], "n": [i]}, schema=schema) for i, w in enumerate(widths)]
    return pa.RecordBatchReader.from_batches(schema, batches)


def test_a_table_is_aligned_over_every_batch():
    out = io.StringIO()
    write_result(_batches(1, 6), fmt="table", output=None, stdout=out)
    assert out.getvalue() == "name    n\n------  -\nx       0\nxxxxxx  1\n(2 rows)\n"


def test_a_long_table_keeps_the_widths_of_its_first_rows():
    # Past TABLE_ALIGN_ROWS rows, held back to align them, the rest streams with their widths.
    out = io.StringIO()
    _write_table(_batches(1, 2, 6), out, align_rows=1)
    assert out.getvalue() == "name  n\n----  -\nx     0\nxx    1\nxxxxxx  2\n(3 rows)\n"


def test_rows_a_command_builds_as_csv_json_and_nl():
    records = [{"version": 0, "pins": {"documents": -1}}, {"version": 1, "pins": {"documents": 0}}]
    written = {}
    for fmt in ("csv", "json", "nl"):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # as stdout: CSV is written to its bytes
        write_records(records, fmt=fmt, stdout=out)
        out.flush()
        written[fmt] = out.buffer.getvalue().decode()
    assert written == {
        "csv": '"version","pins"\n0,"{""documents"": -1}"\n1,"{""documents"": 0}"\n',
        "json": '[{"version": 0, "pins": {"documents": -1}},\n {"version": 1, "pins": {"documents": 0}}]\n',
        "nl": '{"version": 0, "pins": {"documents": -1}}\n{"version": 1, "pins": {"documents": 0}}\n',
    }
