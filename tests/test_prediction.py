import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.head_catalog import list_heads
from pipelines.prediction import predict
from warehouse import EwError
from pipelines.errors import HeadError


def test_predict_a_corpus_file_embeds_only_new_documents(fitted_copy, labelled_corpus, tmp_path):
    [head] = list_heads(fitted_copy)
    lines = labelled_corpus.read_text().splitlines()[:5]
    lines.append(json.dumps({"id": "brand-new", "text": "a brand new package description"}))
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "predictions.parquet"
    count = "select count(*), count(section) from documents"
    before = fitted_copy.query(count).read_all().to_pylist()
    result = predict(fitted_copy, head.head, corpus_file=corpus, output=out)
    assert (result.rows, result.embedded, result.reused) == (6, 1, 5)
    assert fitted_copy.query(count).read_all().to_pylist() == before  # scoring leaves documents alone
    table = pq.read_table(out)
    assert table.column_names[:4] == ["id", "doc_hash", "predicted_section", "probability"]
    assert table.column_names[4:] == [f"p_{c}" for c in head.classes]
    assert sorted(table.column("id").to_pylist()) == sorted(json.loads(line)["id"] for line in lines)


def test_predict_stored_documents_with_where_to_csv(fitted_copy, tmp_path):
    [head] = list_heads(fitted_copy)
    out = tmp_path / "p.csv"
    result = predict(fitted_copy, head.head, where="section = 'python'", output=out)
    table = pacsv.read_csv(out)
    expected = fitted_copy.query("select count(*) from documents where section = 'python'").read_all().column(0)[0].as_py()
    assert result.rows == table.num_rows == expected and result.embedded == 0


def test_unknown_head_and_bad_output(fitted_copy, tmp_path):
    with pytest.raises(HeadError, match="no head named 'nope'"):
        predict(fitted_copy, "nope", where="true", output=tmp_path / "p.parquet")
    [head] = list_heads(fitted_copy)
    with pytest.raises(EwError, match=".parquet or .csv"):
        predict(fitted_copy, head.head, where="true", output=tmp_path / "p.txt")
    assert not (tmp_path / "p.parquet").exists()


def test_unlabelled_file_named_like_the_training_corpus_keeps_the_labels(fitted_copy, labelled_corpus, tmp_path):
    [head] = list_heads(fitted_copy)
    (tmp_path / "same").mkdir()
    unlabelled = tmp_path / "same" / labelled_corpus.name
    rows = [json.loads(line) for line in labelled_corpus.read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows) + "[1]\n")
    result = predict(fitted_copy, head.head, corpus_file=unlabelled, output=tmp_path / "p.parquet", on_error="skip")
    assert (result.rows, result.rejected, result.embedded) == (len(rows), 1, 0)
    labelled = fitted_copy.query("select count(section) from documents").read_all().column(0)[0].as_py()
    assert labelled == len(rows)


def test_predict_where_at_a_pinned_version(fitted_copy, tmp_path):
    [head] = list_heads(fitted_copy)
    result = predict(fitted_copy, head.head, where="section = 'perl'", version=1, output=tmp_path / "p.parquet")
    assert result.version == 1 and result.embedded == 0 and result.rows > 0
    assert pq.read_table(tmp_path / "p.parquet").column_names[:3] == ["corpus", "id", "doc_hash"]
