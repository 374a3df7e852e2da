import gzip
import json

import pytest

from pipelines.corpus import FieldTypes, Record, Rejected, corpus_name, read_corpus
from warehouse import EwError


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
