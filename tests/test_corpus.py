import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines import corpus as corpus_module
from pipelines.cli import cli
from pipelines.corpus import (
    MAX_CORPUS_NAME,
    MAX_LINE_BYTES,
    MAX_NESTING,
    REJECTED_PREFIX_BYTES,
    FieldTypes,
    Record,
    Rejected,
    check_corpus_name,
    corpus_name,
    read_corpus,
)
from warehouse import EwError, Warehouse


def write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def test_reads_plain_and_gzip(tmp_path):
    lines = [json.dumps({"id": "a", "text": "first", "topic": "x"}), json.dumps({"id": 2, "text": "second"})]
    plain = write(tmp_path / "c.jsonl", lines)
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        records = list(read_corpus(path))
        assert [(r.line, r.id, r.text, r.fields) for r in records] == [(1, "a", "first", {"topic": "x"}), (2, "2", "second", {})]


def test_every_bad_line_is_rejected_with_its_line_and_reason(tmp_path):
    path = write(
        tmp_path / "bad.jsonl",
        [
            '{"id": 1, "text": "ok"}',
            "{not json",
            "[1, 2]",
            '{"id": 3}',
            '{"id": 4, "text": ""}',
            '{"id": 5, "text": 7}',
            b'{"id": 6, "text": "caf\xe9"}\n',
            '{"id": 7.5, "text": "float id"}',
            '{"id": 8, "text": "reserved", "doc_hash": "x"}',
            "",
            '{"id": 9, "text": "fine again"}',
        ],
    )
    items = list(read_corpus(path))
    rejected = {item.line: item.reason for item in items if isinstance(item, Rejected)}
    assert [item.line for item in items if isinstance(item, Record)] == [1, 11]
    assert "not valid JSON" in rejected[2]
    assert "not an object" in rejected[3]
    assert "no 'text' field" in rejected[4]
    assert "is empty" in rejected[5]
    assert "not a string" in rejected[6]
    assert "not valid UTF-8" in rejected[7]
    assert "ids must be strings or integers" in rejected[8]
    assert "doc_hash" in rejected[9]


def test_missing_ids_are_stable_and_derived_from_the_line(tmp_path):
    path = write(tmp_path / "c.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    moved = write(tmp_path / "d.jsonl", ['{"text": "zero"}', '{"text": "two"}', '{"text": "one"}'])
    first = {r.text: r.id for r in read_corpus(path)}
    second = {r.text: r.id for r in read_corpus(moved)}
    assert first["one"] == second["one"] and first["two"] == second["two"]
    assert first["one"].startswith("line-")


def test_field_types_stay_consistent(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        ['{"text": "a", "n": 1, "tags": ["x"]}', '{"text": "b", "n": 2.5}', '{"text": "c", "n": "three"}'],
    )
    types = FieldTypes()
    items = list(read_corpus(path, field_types=types))
    assert isinstance(items[0], Record) and items[0].fields == {"n": 1, "tags": '["x"]'}
    assert isinstance(items[1], Rejected) and "column is int64" in items[1].reason
    assert isinstance(items[2], Rejected)


def test_custom_fields_and_corpus_name(tmp_path):
    path = write(tmp_path / "news.jsonl.gz", [])
    path.write_bytes(gzip.compress(b'{"key": "k1", "body": "hello"}\n'))
    [record] = read_corpus(path, text_field="body", id_field="key")
    assert (record.id, record.text) == ("k1", "hello")
    assert corpus_name(path) == "news"


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(EwError, match="does not exist"):
        list(read_corpus(tmp_path / "none.jsonl"))


def test_field_names_differing_only_in_case_are_rejected(tmp_path):
    path = write(tmp_path / "c.jsonl", ['{"text": "a", "topic": "x"}', '{"text": "b", "Topic": "y"}', '{"text": "c", "Text": "z"}'])
    items = list(read_corpus(path))
    assert isinstance(items[0], Record)
    assert isinstance(items[1], Rejected) and "only in case" in items[1].reason
    assert isinstance(items[2], Rejected) and "only in case" in items[2].reason


# -- hostile input: every case is a rejected line, never a crash --------------------------------
def test_a_line_over_the_limit_is_rejected_unread_and_the_next_line_is_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_SKIP_BLOCK", 64)  # read the rest of the long line in many blocks
    long_line = json.dumps({"id": "long", "text": "x" * 9000})
    for limit in (970, REJECTED_PREFIX_BYTES + 10):
        at_limit = json.dumps({"id": "edge", "text": "y" * (limit - 26)})
        assert len(at_limit) == limit
        lines = ['{"id": 1, "text": "before"}', long_line, at_limit, '{"id": 3, "text": "after"}', long_line.encode()]
        plain = write(tmp_path / "c.jsonl", lines)  # the last line has no newline
        packed = tmp_path / "c.jsonl.gz"
        packed.write_bytes(gzip.compress(plain.read_bytes()))
        for path in (plain, packed):
            items = list(read_corpus(path, max_line_bytes=limit))
            assert [(type(i).__name__, i.line) for i in items] == [
                ("Record", 1), ("Rejected", 2), ("Record", 3), ("Record", 4), ("Rejected", 5)
            ]
            for rejected in (items[1], items[4]):
                assert rejected.reason == (
                    f"the line is 9,026 bytes, over the limit of {limit:,} bytes per line; shorten its text "
                    "(only its first max_length tokens are embedded anyway) or split it into several records"
                )
                # The rejects file keeps only a bounded prefix.
                assert rejected.raw == long_line[: min(limit, REJECTED_PREFIX_BYTES)]
            assert items[3].text == "after"


def test_the_line_limit_defaults_to_8_mib():
    assert MAX_LINE_BYTES == 8 * 1024 * 1024


def nested(levels, inner="1"):
    return "[" * levels + inner + "]" * levels


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": "x", "a": ' + nested(100_000) + "}", "lists or objects nested more than 100 levels deep"),
        (nested(100_000), "lists or objects nested more than 100 levels deep"),
        ('{"text": "x", "a": ' + nested(MAX_NESTING + 1) + "}", "field 'a' is nested more than 100 levels deep"),
        ('{"text": "x", "a": {"b": ' + nested(MAX_NESTING) + "}}", "field 'a' is nested more than 100 levels deep"),
        ('{"text": "x", "n": 123456789012345678901234567890}',
         "field 'n' holds the integer 12345678901234567890... (30 digits), which exceeds 64 bits; quote it as a string"),
        ('{"text": "x", "n": 9223372036854775808}', "field 'n' holds the integer 9223372036854775808, which exceeds 64 bits"),
        ('{"text": "x", "n": -9223372036854775809}', "which exceeds 64 bits"),
        ('{"text": "x", "m": {"k": [1, 99999999999999999999]}}', "field 'm' holds the integer 99999999999999999999"),
        ('{"text": "x", "n": ' + "9" * 5000 + "}", "an integer of over 4,300 digits, too long to read; quote it as a string"),
        ('{"text": "x", "m": [1.5, NaN]}', "field 'm' holds NaN or Infinity, which its column of JSON text cannot store"),
        ('{"text": "x", "m": {"k": -Infinity}}', "NaN or Infinity"),
        ('{"text": "half \\ud800 a pair"}', "a \\u escape of a lone UTF-16 surrogate"),
        ('{"text": "x", "s": ["\\udc00"]}', "a \\u escape of a lone UTF-16 surrogate"),
        ('{"text": "x", "\\udc00": 1}', "a \\u escape of a lone UTF-16 surrogate"),
        ('{"text": "x", "' + "k" * 500 + '": 1, "doc_hash": "h"}', "field 'doc_hash' is a column ew keeps itself"),
    ],
)
def test_hostile_values_are_rejected_with_a_reason(tmp_path, line, reason):
    path = write(tmp_path / "c.jsonl", [line, '{"text": "fine"}'])
    rejected, record = list(read_corpus(path))
    assert isinstance(rejected, Rejected) and reason in rejected.reason and rejected.raw == line
    assert isinstance(record, Record) and record.text == "fine"


def test_values_at_the_limits_are_kept(tmp_path):
    lines = [
        '{"text": "a", "a": ' + nested(MAX_NESTING) + "}",
        '{"text": "b", "n": 9223372036854775807, "low": -9223372036854775808}',
        '{"id": 123456789012345678901234567890, "text": "a huge integer id is kept as its digits"}',
        '{"text": "emoji from a surrogate pair \\ud83d\\ude00"}',
        '{"text": "c", "f": NaN, "g": Infinity}',  # a float column stores them as they are
    ]
    items = list(read_corpus(write(tmp_path / "c.jsonl", lines)))
    assert all(isinstance(item, Record) for item in items), items
    assert items[0].fields["a"] == nested(MAX_NESTING)
    assert items[1].fields == {"n": 2**63 - 1, "low": -(2**63)}
    assert items[2].id == "123456789012345678901234567890"
    assert items[3].text.endswith("\U0001F600")
    assert math.isnan(items[4].fields["f"]) and items[4].fields["g"] == math.inf


def test_a_long_field_name_is_cut_in_the_reason(tmp_path):
    path = write(tmp_path / "c.jsonl", ['{"text": "a", "' + "k" * 5000 + '": [NaN]}'])
    [rejected] = read_corpus(path)
    assert "(5,000 characters)" in rejected.reason and len(rejected.reason) < 300


# -- corpus names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["news", "news-2026", "a.b_c", "_x", "N" * MAX_CORPUS_NAME, "0"])
def test_good_corpus_names_pass(name):
    assert check_corpus_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../../X", "/abs/dir", "a/b", "N" * (MAX_CORPUS_NAME + 1), ".hidden", "-x", "a b", "café", "x\n", "a=b", "a%2F"]
)
def test_bad_corpus_names_are_errors(name):
    with pytest.raises(EwError, match="is not allowed: use 1 to 100 letters"):
        check_corpus_name(name)


@pytest.mark.parametrize(
    "file_name, expected",
    [
        ("news.jsonl.gz", "news"),
        ("Les Misérables.jsonl", "Les-Mis-rables"),
        ("-x.ndjson", "x"),
        ("..jsonl", "corpus"),
        (".jsonl", "jsonl"),
        ("n" * 300 + ".jsonl", "n" * MAX_CORPUS_NAME),
        ("a=b%c.json", "a-b-c"),
    ],
)
def test_default_corpus_names_are_made_valid(file_name, expected):
    assert corpus_name(Path("/data") / file_name) == expected


@pytest.mark.parametrize("name", ["../../X", "/tmp/elsewhere/dir", "N" * 300])
def test_cli_refuses_a_bad_corpus_name_before_writing(tmp_path, name):
    corpus = write(tmp_path / "c.jsonl", ['{"text": "fine"}', "[1]"])
    # Checked before the model is even looked up.
    result = run_ew(tmp_path / "wh", "ingest", corpus, "--model", "nobody/none", "--corpus", name, "--on-error", "skip")
    shown = repr(name) if len(name) <= 60 else f"{name[:60]!r}... ({len(name):,} characters)"
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: corpus name {shown} is not allowed: use 1 to 100 letters (a-z, A-Z), digits, '.', '_' or '-', "
        "not starting with '.' or '-'; e.g. --corpus news-2026\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # not even the warehouse was created


# -- the CLI on each kind of bad line: --on-error fail writes nothing, skip keeps the good lines --
BASE = '{"id": "base", "text": "the base line", "n": 1}'
LINE_LIMIT = 250_000  # above every other case, the 100,000-deep one included
LONG = '{"id": 2, "text": "' + "x" * LINE_LIMIT + '"}'
HOSTILE = [
    ("invalid-json", "{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("not-an-object", "[1, 2]", "a JSON list, not an object"),
    ("missing-text", '{"id": 2}', "no 'text' field (choose another with --text-field)"),
    ("empty-text", '{"id": 2, "text": "  "}', "field 'text' is empty"),
    ("text-not-a-string", '{"id": 2, "text": 7}', "field 'text' is int, not a string"),
    ("bad-utf8", b'{"id": 2, "text": "caf\xe9"}\n', "not valid UTF-8 (byte 22)"),
    ("bad-id-type", '{"id": 2.5, "text": "x"}', "field 'id' is float; ids must be strings or integers"),
    ("reserved-field", '{"id": 2, "text": "x", "doc_hash": "h"}', "field 'doc_hash' is a column ew keeps itself"),
    ("case-clash", '{"id": 2, "text": "x", "N": 2}', "field 'N' differs from the column 'n' only in case"),
    ("type-clash", '{"id": 2, "text": "x", "n": "three"}', "field 'n' holds str \"three\" but its column is int64"),
    ("over-the-line-limit", LONG, f"the line is {len(LONG):,} bytes, over the limit of {LINE_LIMIT:,} bytes per line"),
    ("nested-100000-deep", '{"text": "x", "a": ' + nested(100_000) + "}", "lists or objects nested more than 100 levels"),
    ("field-nested-too-deep", '{"text": "x", "a": ' + nested(MAX_NESTING + 1) + "}", "field 'a' is nested more than 100"),
    ("int-beyond-int64", '{"text": "x", "big": 123456789012345678901234567890}', "field 'big' holds the integer"),
    ("int-of-5000-digits", '{"text": "x", "big": ' + "9" * 5000 + "}", "an integer of over 4,300 digits"),
    ("nan-in-a-list", '{"text": "x", "m": [NaN]}', "field 'm' holds NaN or Infinity"),
    ("lone-surrogate", '{"text": "x \\ud800"}', "a \\u escape of a lone UTF-16 surrogate"),
]


def run_ew(warehouse, *args):
    return CliRunner().invoke(cli, ["-w", str(warehouse)] + [str(a) for a in args])


@pytest.fixture(scope="module")
def base_warehouse(tmp_path_factory, tiny_bert_dir):
    """A warehouse with the tiny model exported and one line ingested, copied by each case."""
    root = tmp_path_factory.mktemp("hostile") / "wh"
    corpus = write(root.parent / "base.jsonl", [BASE])
    assert run_ew(root, "ingest", corpus, "--model", tiny_bert_dir).exit_code == 0
    return root


@pytest.mark.parametrize("bad, reason", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_cli_on_a_hostile_line(base_warehouse, tiny_bert_dir, tmp_path, monkeypatch, bad, reason):
    monkeypatch.setattr(corpus_module, "MAX_LINE_BYTES", LINE_LIMIT)
    root = tmp_path / "wh"
    shutil.copytree(base_warehouse, root)
    before = Warehouse.open(root).latest_version()
    corpus = write(tmp_path / "hostile.jsonl", ['{"id": "g1", "text": "good one"}', bad, '{"id": "g3", "text": "good three"}'])

    failed = run_ew(root, "ingest", corpus, "--model", tiny_bert_dir)
    assert failed.exit_code == 1
    assert failed.stderr.startswith(f"Error: {corpus}, line 2: {reason}")
    assert failed.stderr.endswith("; fix the line, or pass --on-error skip to skip such lines and write them to a rejects file\n")
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert Warehouse.open(root).latest_version() == before and not (root / "rejects").exists()

    skipped = run_ew(root, "ingest", corpus, "--model", tiny_bert_dir, "--on-error", "skip", "--json")
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads(skipped.stdout)
    assert (summary["read"], summary["new_documents"], summary["rejected"]) == (3, 2, 1)
    [reject] = [json.loads(line) for line in Path(summary["rejects_file"]).read_text().splitlines()]
    assert (reject["file"], reject["line"]) == (str(corpus), 2) and reject["reason"].startswith(reason)
    assert Path(summary["rejects_file"]).parent == root / "rejects"
    ids = Warehouse.open(root).query("select id from documents where corpus = 'hostile' order by id").read_all()
    assert ids.column("id").to_pylist() == ["g1", "g3"]
